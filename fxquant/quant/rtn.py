"""Round-to-nearest weight quantization: the one definition RTN, GPTQ's fallback and QAT use.

    W' = dequant(quant(W))   with scales over each row of the canonical [out, in] layout

Entry points: `quantize_weight(w, cfg)` (a canonical weight -> its `QuantizedWeight` in `cfg.format`,
with the config's clip ratio or clip search), `round_weight`, `apply_quantized` (write a quantized
weight's values into a module's parameter and record its codes for `pack`), `quantize_site` (both,
for one linear of a captured graph) and `check_group_size` (refuse a group size some layer's width
does not divide, before any weight changes). The one idea: the values a layer computes with and the
codes `pack` stores come from one `QuantizedWeight`, recorded in `fxquant.quant.records`.
"""
from __future__ import annotations

import torch

from fxquant.analysis.dataflow import weight_sites
from fxquant.config import WeightQuantConfig
from fxquant.errors import RecipeError
from fxquant.quant import records
from fxquant.quant.numerics import QuantizedWeight, quantize, quantized_weight, weight_qparams
from fxquant.weights import assign_quantized, canonical


def quantize_weight(w: torch.Tensor, cfg) -> QuantizedWeight:
    """Round-to-nearest of a canonical [.., out, in] weight in `cfg.format`, with `cfg.clip_ratio` or
    `cfg.clip_search` (a WeightQuantConfig or GPTQConfig); scales in w's dtype."""
    fmt = cfg.format
    scale, zero = weight_qparams(w, fmt, cfg.clip_ratio, cfg.clip_search, dtype=w.dtype)
    return quantized_weight(quantize(w, scale, zero, fmt), scale, zero, fmt, w.dtype)


def round_weight(w: torch.Tensor, cfg) -> torch.Tensor:
    """The values of `quantize_weight(w, cfg)`, in w's dtype."""
    return quantize_weight(w, cfg).values(w.dtype)


def apply_quantized(module: torch.nn.Module, name: str, qw: QuantizedWeight, transposed: bool) -> None:
    """Give `module.name` the values of `qw` (canonical layout) and record `qw` for `pack`."""
    assign_quantized(module, name, qw, transposed)
    records.record(module, name, qw, transposed)


def quantize_site(cg, site, cfg) -> None:
    """Round `site`'s weight to nearest in place and record its codes for the module that owns it."""
    weight = cg.param(site.weight)
    qw = quantize_weight(canonical(weight.detach(), site.transposed), cfg)
    apply_quantized(cg.owner(site.weight), site.weight.name, qw, site.transposed)


def _fitting_groups(sizes: list[int]) -> list[int]:
    return [g for g in (32, 64, 128, 256) if all(n % g == 0 for n in sizes)]


def check_group_size(cg, structure, cfg) -> None:
    """Raise RecipeError naming the first layer whose input width the group size of `cfg` (a config
    with a format; default WeightQuantConfig) does not divide."""
    group_size = (cfg or WeightQuantConfig()).group_size
    if group_size is None:
        return
    sites = weight_sites(cg)
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
