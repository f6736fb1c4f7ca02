"""Quantization-aware training: `prepare` a model that computes with the target numerics and trains
with a straight-through gradient, train it with any optimizer, then `convert` it.

    model = fxquant.qat.prepare(model, "rotate-r1r2-w4a8")   # rotations folded, quantizers as fake-quant
    ...train: loss.backward(); optimizer.step()...              # latent float weights learn
    model = fxquant.qat.convert(model)                        # weights := their quantized values, packed

`prepare` applies the recipe, except that each weight-quantizer step (`quantize_weights`) becomes a
parametrization (`torch.nn.utils.parametrize`) on every weight that step would quantize: the module
keeps a trainable float weight and computes with `fake_quantize` of it, in the numerics of
`fxquant.quant.numerics` (so before any training the prepared model computes exactly what the
post-training quantized model does). Activation and KV quantizers stay the recipe's hooks; their
`fxquant::fake_quant` op passes gradients straight through too. `convert` bakes each
parametrization: the weight becomes exactly what `quantize_weights` gives for the trained weight,
and (by default) is packed as integer codes, as the PTQ presets' last step does.
"""
from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from fxquant.analysis.dataflow import weight_sites
from fxquant.api import apply_recipe
from fxquant.capture import capture
from fxquant.config import WeightQuantConfig
from fxquant.errors import RecipeError
from fxquant.quant.pack import pack_model
from fxquant.quant.rtn import apply_quantized, check_group_size, quantize_weight, round_weight
from fxquant.recipes import Recipe, load_recipe
from fxquant.weights import canonical

_NOT_TRAINABLE = {"gptq", "awq_clip"}  # they write final weights from calibration: nothing to train through


class _RoundStraightThrough(torch.autograd.Function):
    """Forward: the quantized weight, exactly. Backward: the gradient unchanged (STE)."""

    @staticmethod
    def forward(ctx, w, cfg: WeightQuantConfig, transposed: bool):
        return canonical(round_weight(canonical(w, transposed), cfg), transposed)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class WeightFakeQuant(torch.nn.Module):
    """A parametrization: weight -> its fake-quantized value (straight-through gradient)."""

    def __init__(self, cfg: WeightQuantConfig, transposed: bool = False):
        super().__init__()
        self.cfg, self.transposed = cfg, transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _RoundStraightThrough.apply(weight, self.cfg, self.transposed)


def prepare(model: torch.nn.Module, recipe, calibration=None) -> torch.nn.Module:
    """Apply `recipe` to `model` in place with trainable fake-quant weights; returns the model."""
    recipe = load_recipe(recipe)
    blocked = [key for key, _ in recipe.steps if key in _NOT_TRAINABLE]
    if blocked:
        raise RecipeError(f"qat.prepare: step {blocked[0]!r} writes final weights from calibration data and "
                          "cannot be trained through; use quantize_weights (round to nearest) in a QAT recipe")
    if any(key == "quantize_lm_head" for key, _ in recipe.steps):
        raise RecipeError("qat.prepare: step 'quantize_lm_head' rounds the output layer for good, and training would "
                          "move it off its codes (convert could not pack it); train without it, then apply "
                          "quantize_lm_head to the converted model")
    weights = [cfg for key, cfg in recipe.steps if key == "quantize_weights"]
    if len(weights) > 1:
        raise RecipeError("qat.prepare: the recipe quantizes weights more than once; keep one quantize_weights step")
    if weights:
        check_group_size(capture(model), None, weights[0] or WeightQuantConfig())  # refuse before any change
    rest = Recipe(recipe.name, tuple((k, c) for k, c in recipe.steps if k not in ("quantize_weights", "pack")))
    if rest.steps:
        apply_recipe(model, rest, calibration)
    if weights:
        cfg = weights[0] or WeightQuantConfig()
        seen = set()
        for site in weight_sites(capture(model)):
            module = model.get_submodule(site.module)
            key = (id(module), site.weight.name)
            if key in seen:
                continue
            seen.add(key)
            parametrize.register_parametrization(module, site.weight.name, WeightFakeQuant(cfg, site.transposed))
    return model


def convert(model: torch.nn.Module, pack: bool = True) -> torch.nn.Module:
    """Replace every fake-quant parametrization by its value, the quantized weight (exactly), and
    with `pack` store those layers as packed integer codes (`QuantizedLinear`), as PTQ presets do."""
    for module in list(model.modules()):
        for name in list(getattr(module, "parametrizations", {}) or {}):
            quantizers = [p for p in module.parametrizations[name] if isinstance(p, WeightFakeQuant)]
            if not quantizers:
                continue
            fq = quantizers[0]
            with torch.no_grad():
                latent = module.parametrizations[name].original.detach()
                qw = quantize_weight(canonical(latent, fq.transposed), fq.cfg)
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                apply_quantized(module, name, qw, fq.transposed)
    if pack:
        pack_model(model)
    return model


def prepared_modules(model: torch.nn.Module) -> list[str]:
    """Paths of the modules whose weight is fake-quantized for training."""
    return [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]
