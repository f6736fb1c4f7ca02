"""GPTQ weight quantization over calibration data, block by block (the solver is fxquant.quant.gptq).

For each decoder block: run it on its calibration inputs with hooks that accumulate each quantized
linear's input Hessian (H = 2/n X^T X, never holding X), quantize every linear of the block with
GPTQ in the target quantizer's numerics, then run the quantized block to make the next block's
inputs (so later blocks see, and compensate, the error of earlier ones). Online Hadamards already
on the model are active (their pre-hooks run before the hooks see the input); recipes put GPTQ
before activation and KV quantizers, QuaRot's order. A linear whose input no hook can see (a stack
of experts) is rounded to nearest instead, and the change says so.
"""
from __future__ import annotations

from fxquant.analysis.dataflow import quantized_sites
from fxquant.calibrate import SiteGroup, observe, require_calibration, sweep
from fxquant.config import GPTQConfig
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.quant.gptq import gptq_quantize, gram, hessian_update
from fxquant.quant.rtn import apply_quantized, check_group_size, quantize_site
from fxquant.weights import canonical


def _check(cg, structure, cfg: GPTQConfig | None) -> None:
    require_calibration(cg, structure, cfg)
    check_group_size(cg, structure, cfg or GPTQConfig())


@fxpass(invalidates={"outputs", "weights_float"}, provides={"weights_quantized"}, check=_check)
def gptq(cg, structure, cfg: GPTQConfig | None) -> PassResult:
    """Quantize every linear weight but the output layer's with GPTQ, block by block."""
    cfg = cfg or GPTQConfig()
    hookable, hidden = quantized_sites(cg)
    changes, seen = [], set()
    for block, here in sweep(cg, [SiteGroup(s) for s in hookable]):
        # last: (key, x^T x, x) for linears that read one input; holding x keeps its memory from
        # being reused, so an equal key means the same tensor
        hessians, last = {}, [None, None, None]

        def accumulate(path):
            def add(x):
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                if last[0] != key:
                    last[:] = [key, gram(x), x]
                hessians[path] = hessian_update(*hessians.get(path, (None, 0)), x, last[1])
            return add

        observe(block, each_input={g.readers[0].module: accumulate(g.readers[0].module) for g in here})
        for g in here:
            site = g.readers[0]
            weight = cg.param(site.weight)
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            qw = gptq_quantize(canonical(weight.detach(), site.transposed), hessians[site.module][0], cfg.format,
                               cfg.options)
            apply_quantized(cg.owner(site.weight), site.weight.name, qw, site.transposed)
            changes.append(Change("quantized", site.module, f"{cfg.format.describe()} GPTQ"))
    for site in hidden:  # inputs no hook sees: round to nearest
        weight = cg.param(site.weight)
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        quantize_site(cg, site, cfg)
        changes.append(Change("quantized", site.module, f"{cfg.format.describe()} RTN (no hook sees this input)"))
    return PassResult(tuple(changes))
