"""The examples run, and the example pass really folds (outputs verified by the Pipeline)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_write_your_own_pass_folds_every_norm_and_keeps_outputs():
    # tiny llama: 2 layers x (3 attention + 2 mlp readers) + lm_head = 11 readers, 5 norms
    assert _load("write_your_own_pass").main(["--model", "tiny-llama"]) == "fold_rms_weights: 11 scaled, 5 folded, 0 blocked"


def test_example_pass_runs_in_a_recipe_through_quantize_and_the_backend():
    torch._dynamo.reset()
    model, _ = __import__("fxquant.models", fromlist=["load_model"]).load_model("tiny-llama")
    eager, compiled = _load("write_your_own_pass").in_a_recipe(model)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 * eager.abs().max().item())


def test_example_pass_refuses_tied_readers_instead_of_breaking_the_model():
    from fxquant.capture import capture
    from fxquant.models import tiny_model
    from fxquant.pipeline import Pipeline

    model = tiny_model("llama", tie_word_embeddings=True)
    result = Pipeline([_load("write_your_own_pass").fold_rms_weights], verify_inputs=True).run(capture(model))
    assert str(result) == "fold_rms_weights: 10 scaled, 4 folded, 1 blocked"


def test_quantize_model_example_generates_the_same_tokens_after_rotation():
    before, after = _load("quantize_model").main(["--model", "tiny-llama", "--recipe", "rotate-r1r2"])
    assert torch.equal(before, after)


def test_compile_with_backend_example_gives_the_same_logits_both_ways():
    torch._dynamo.reset()
    tokens, compiled_with_recipe, quantized_then_compiled = _load("compile_with_backend").main(["--model", "tiny-llama"])
    assert tokens.shape[1] > 4
    torch.testing.assert_close(compiled_with_recipe, quantized_then_compiled, rtol=0, atol=1e-5)
