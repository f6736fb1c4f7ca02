"""QAT: prepare computes exactly what post-training quantization does, trains through a straight-
through gradient, and convert leaves exactly the quantized weights of the trained model."""
from __future__ import annotations

import math

import pytest
import torch

from fxquant import quantize
from fxquant.errors import RecipeError
from fxquant.models import tiny_model
from fxquant.qat import convert, prepare, prepared_modules


W4A8 = {"preset": "w4a8", "group_size": 32}


def _ids(seed=0):
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def _sqnr(reference, other) -> float:
    noise = float(((reference - other) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((reference ** 2).sum()) / noise)


@pytest.mark.parametrize("recipe", [{"preset": "w4a8", "group_size": 32}, {"preset": "rotate-r1r2-w4a16", "group_size": 16},
                                    "w8a8", "quarot-w4a4kv4"])
def test_a_prepared_model_computes_what_post_training_quantization_does(recipe):
    ptq, qat = quantize(tiny_model("llama"), recipe), prepare(tiny_model("llama"), recipe)
    assert len(prepared_modules(qat)) == 14
    with torch.no_grad():
        assert _sqnr(ptq(_ids()).logits, qat(_ids()).logits) >= 45


def test_training_moves_latent_weights_and_convert_is_bit_exact_with_ptq_of_them():
    model = prepare(tiny_model("llama"), W4A8)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(3):
        out = model(_ids(step), labels=_ids(step))
        optimizer.zero_grad()
        out.loss.backward()
        latent = model.model.layers[0].mlp.down_proj.parametrizations.weight.original
        assert latent.grad is not None and latent.grad.abs().sum() > 0  # the STE let the gradient through
        optimizer.step()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        prepared_logits = model(_ids()).logits
    convert(model)
    assert prepared_modules(model) == []
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, prepared_logits)  # SQNR = inf
    # convert == post-training quantization of the trained float weights
    float_model = tiny_model("llama")
    with torch.no_grad():
        for name, p in float_model.named_parameters():
            p.copy_(trained.get(name, trained.get(name.replace(".weight", ".parametrizations.weight.original"))))
    quantize(float_model, W4A8)
    assert all(torch.equal(a, b) for a, b in zip(float_model.state_dict().values(), model.state_dict().values()))


def test_generate_runs_on_a_prepared_model_and_recipes_that_cannot_train_are_refused():
    model = prepare(tiny_model("qwen2"), W4A8)
    assert model.generate(_ids()[:1], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 15)
    with pytest.raises(RecipeError, match="'gptq' writes final weights"):
        prepare(tiny_model("llama"), "gptq-w4a16")
    untouched = tiny_model("llama")
    with pytest.raises(RecipeError, match="group_size=128 does not divide"):
        prepare(untouched, "rotate-r1r2-w4a16")
    assert prepared_modules(untouched) == [] and torch.equal(untouched.lm_head.weight, tiny_model("llama").lm_head.weight)


def test_prepare_refuses_quantize_lm_head_which_training_would_move_off_its_codes():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match="'quantize_lm_head' rounds the output layer for good"):
        prepare(model, {"preset": "w4a16-lm-head", "group_size": 32})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
