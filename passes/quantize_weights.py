"""Round-to-nearest weight quantization, as fake-quant: each weight is replaced by its nearest
representable value (int8 per output channel, or int4 in groups of input channels), in place.

    W' = dequant(quant(W))   with scales over each row of the canonical [out, in] layout

The output layer (lm_head) stays in float. Every layer's `in_features` is checked against
`group_size` before any weight changes. The numerics are `fxquant.quant.numerics`, the reference
the packed kernels of later passes must match; each layer also keeps its codes and scales
(`weights.assign_quantized`), which the `pack` pass stores as a QuantizedLinear.
"""
from __future__ import annotations

import torch

from fxquant.analysis.dataflow import linear_sites
from fxquant.config import WeightQuantConfig
from fxquant.errors import RecipeError
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.quant.numerics import QuantizedWeight, describe_format, quantize, quantized_weight, weight_qparams
from fxquant.weights import assign_quantized, canonical


def quantize_weight(w: torch.Tensor, cfg) -> QuantizedWeight:
    """Round-to-nearest of a canonical [.., out, in] weight in `cfg`'s numerics (bits, symmetric,
    group_size, zero_point, and the clip search or clip ratio), scales in w's dtype: the one
    definition RTN, GPTQ's fallback and QAT use."""
    scale, zero = weight_qparams(w, cfg.bits, cfg.symmetric, cfg.group_size, cfg.clip_ratio, cfg.clip_search,
                                 float_zero=cfg.float_zero, dtype=w.dtype)
    codes = quantize(w, scale, zero, cfg.bits, cfg.symmetric, cfg.group_size, float_zero=cfg.float_zero)
    return quantized_weight(codes, scale, zero, cfg.bits, cfg.symmetric, cfg.group_size, cfg.float_zero, w.dtype)


def round_weight(w: torch.Tensor, cfg) -> torch.Tensor:
    """The values of `quantize_weight(w, cfg)`, in w's dtype."""
    return quantize_weight(w, cfg).values(w.dtype)


def quantize_site(cg, site, cfg) -> None:
    """Round `site`'s weight to nearest in place and keep its codes on the module that owns it."""
    weight = cg.param(site.weight)
    assign_quantized(cg.owner(site.weight), site.weight.name, quantize_weight(canonical(weight.detach(), site.transposed), cfg),
                     site.transposed)


def describe(cfg) -> str:
    """`int4 asym group 64` / `int8 sym per channel`: a weight quantizer in a Change's words."""
    return describe_format(cfg.bits, cfg.symmetric, cfg.group_size, cfg.float_zero)


def _fitting_groups(sizes: list[int]) -> list[int]:
    return [g for g in (32, 64, 128, 256) if all(n % g == 0 for n in sizes)]


def _quantized_sites(cg):
    return [site for site, is_output in linear_sites(cg) if not is_output]


def check_group_size(cg, structure, cfg: WeightQuantConfig | None) -> None:
    """Raise RecipeError naming the first layer whose input width the group size does not divide."""
    group_size = (cfg or WeightQuantConfig()).group_size
    if group_size is None:
        return
    sites = _quantized_sites(cg)
    for site in sites:
        if site.in_features % group_size:
            fits = _fitting_groups([s.in_features for s in sites])
            best = fits[-1] if fits else None
            raise RecipeError(
                f"group_size={group_size} does not divide in_features={site.in_features} of layer "
                f"'{site.module}' (node '{site.node}'); nothing was changed. Group sizes that fit every "
                f"layer of this model: {fits or 'none of 32/64/128/256'}; set group_size to one of them, or to "
                f"None for one scale per output channel (recipe dict: {{'group_size': {best}}}, "
                f"CLI: --set group_size={best})")


@fxpass(invalidates={"outputs", "weights_float"}, provides={"weights_quantized"}, check=check_group_size)
def quantize_weights(cg, structure, cfg: WeightQuantConfig | None) -> PassResult:
    """Fake-quantize every linear weight but the output layer's (round to nearest)."""
    cfg = cfg or WeightQuantConfig()
    check_group_size(cg, structure, cfg)
    sites = _quantized_sites(cg)
    seen, changes = set(), []
    for site in sites:
        weight = cg.param(site.weight)
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        quantize_site(cg, site, cfg)
        changes.append(Change("quantized", site.module, describe(cfg)))
    return PassResult(tuple(changes))
