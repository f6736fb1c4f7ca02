"""Round-to-nearest weight quantization, as fake-quant: each weight is replaced by its nearest
representable value (int8 per output channel, or int4 in groups of input channels), in place.

    W' = dequant(quant(W))   with scales over each row of the canonical [out, in] layout

The output layer (lm_head) stays in float unless `quantize_lm_head` runs too (about a fifth of a
small model's decode bytes; untied from the embedding first, which stays float). Every layer's `in_features` is checked against
`group_size` before any weight changes. The library is `fxquant.quant.rtn` (numerics:
`fxquant.quant.numerics`, the reference the packed kernels must match); each layer's codes are
recorded (`fxquant.quant.records`), which the `pack` pass stores as a QuantizedLinear.
"""
from __future__ import annotations

from fxquant.analysis.dataflow import linear_sites, weight_sites
from fxquant.config import WeightQuantConfig
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.quant.rtn import check_group_size, quantize_site
from fxquant.weights import untie_shared


@fxpass(invalidates={"outputs", "weights_float"}, provides={"weights_quantized"}, check=check_group_size)
def quantize_weights(cg, structure, cfg: WeightQuantConfig | None) -> PassResult:
    """Fake-quantize every linear weight but the output layer's (round to nearest)."""
    cfg = cfg or WeightQuantConfig()
    check_group_size(cg, structure, cfg)
    seen, changes = set(), []
    for site in weight_sites(cg):
        weight = cg.param(site.weight)
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        quantize_site(cg, site, cfg)
        changes.append(Change("quantized", site.module, cfg.format.describe()))
    return PassResult(tuple(changes))


@fxpass(invalidates={"outputs", "weights_float"}, provides={"lm_head_quantized", "weights_quantized"},
        check=check_group_size)
def quantize_lm_head(cg, structure, cfg: WeightQuantConfig | None) -> PassResult:
    """Fake-quantize the output layer's weight (round to nearest), untied from a tied embedding first."""
    cfg = cfg or WeightQuantConfig()
    changes = []
    for site in [site for site, is_output in linear_sites(cg) if is_output]:
        if untie_shared(cg.model, site.weight.module, site.weight.name):
            changes.append(Change("untied", site.weight.fqn, "the embedding keeps its float values"))
        quantize_site(cg, site, cfg)
        changes.append(Change("quantized", site.module, cfg.format.describe()))
    return PassResult(tuple(changes))
