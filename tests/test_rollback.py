"""A recipe that fails mid-way leaves the model exactly as it was: weights, modules and every hook kind."""
from __future__ import annotations

import importlib

import pytest
import torch

from fxquant import PassError, quantize
from fxquant.models import tiny_model


def test_a_failed_recipe_removes_hooks_of_every_kind_and_restores_the_weights(monkeypatch):
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
    down = model.model.layers[0].mlp.down_proj
    online = importlib.import_module("fxquant.passes.online_rotations")

    def broken(cg, site, precision):  # a pass that edits, hooks in every way torch allows, then fails
        with torch.no_grad():
            cg.param(site.weight).mul_(3.0)
        down.register_forward_hook(lambda m, a, out: out * 0)
        down.register_forward_pre_hook(lambda m, a, kw: None, with_kwargs=True)
        down.register_full_backward_hook(lambda m, gi, go: None)
        down.register_state_dict_post_hook(lambda m, sd, prefix, local: None)
        raise RuntimeError("simulated failure after hooking")

    monkeypatch.setattr(online, "install_online_hadamard", broken)
    with pytest.raises(PassError, match="simulated failure after hooking"):
        quantize(model, "rotate-r1r2r4")
    hooks = {k: v for k, v in vars(down).items() if "hooks" in k and isinstance(v, dict) and v}
    assert hooks == {}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_a_failed_recipe_forgets_the_codes_its_quantizer_recorded(monkeypatch, tmp_path):
    from fxquant import save
    from fxquant.quant import records

    quantize_activations = importlib.import_module("fxquant.passes.quantize_activations")

    def broken(model):
        raise RuntimeError("simulated failure after the weights were quantized")

    monkeypatch.setattr(quantize_activations, "activation_hooks", broken)
    model = tiny_model("llama")
    with pytest.raises(PassError, match="simulated failure after the weights were quantized"):
        quantize(model, "w8a8")
    assert not any(records.recorded(m) for m in model.modules())
    save(model, tmp_path)  # a float model again: nothing recorded that its weights no longer match
