"""GPTQ weight quantization over calibration data, block by block (the solver is fxquant.quant.gptq).

For each decoder block: run it on its calibration inputs with hooks that accumulate each quantized
linear's input Hessian (H = 2/n X^T X, never holding X), quantize every linear of the block with
GPTQ in the target quantizer's numerics, then run the quantized block to make the next block's
inputs (so later blocks see, and compensate, the error of earlier ones). Online Hadamards already
on the model are active (their pre-hooks run before the hooks see the input); recipes put GPTQ
before activation and KV quantizers, QuaRot's order. With `act_aware` (GPTAQ-style) GPTQ runs after
`quantize_activations` and solves each layer for the quantized inputs it will read: the target is
the float layer on float inputs (fxquant.quant.gptq.input_aware_target), so the activation
quantizer's error is compensated too. A linear whose input no hook can see (a stack
of experts) is rounded to nearest instead, and the change says so.
"""
from __future__ import annotations

from fxquant.analysis.dataflow import quantized_sites
from fxquant.calibrate import SiteGroup, observe, require_calibration, sweep
from fxquant.config import GPTQConfig
from fxquant.errors import RecipeError
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.quant.gptq import cross_update, gptq_quantize, gram, hessian_update, input_aware_target
from fxquant.quant.rtn import apply_quantized, check_group_size, quantize_site
from fxquant.runtime.hooks import ActivationFakeQuant, activation_hooks, remove_activation_hooks
from fxquant.runtime.library import fake_quant
from fxquant.weights import canonical


def _check(cg, structure, cfg: GPTQConfig | None) -> None:
    require_calibration(cg, structure, cfg)
    check_group_size(cg, structure, cfg or GPTQConfig())


def _input_quantizers(cg, sites) -> dict[str, ActivationFakeQuant]:
    """act_aware: each site's activation quantizer, taken off its module so the sweep sees float
    inputs (it goes back after the sweep); refused before any change when no site has one."""
    quantizers = {s.module: h for s in sites
                  if (h := activation_hooks(cg.model).get(s.module)) is not None and type(h) is ActivationFakeQuant}
    if not quantizers:
        raise RecipeError("GPTQConfig.act_aware needs the activation quantizers on the model: put "
                          "'quantize_activations' before 'gptq' in the recipe (nothing was changed)")
    for path in quantizers:
        remove_activation_hooks(cg.model.get_submodule(path))
    return quantizers


def _observe_inputs(block, paths: list[str], quantizers: dict) -> dict[str, list]:
    """Run the block once; per path [H, n, C]: the Hessian of its inputs (of the quantized inputs
    x~ = q(x) for a path in `quantizers`, with C = sum x~^T x), never holding them all."""
    stats, last = {}, [None, None, None]  # (key, x^T x, x): linears that read one input share x^T x

    def accumulate(path):
        quant = quantizers.get(path)

        def add(x):
            if quant is not None:
                xq = fake_quant(x, quant.bits, quant.symmetric, quant.clip_ratio)
                h, n, cross = stats.get(path, (None, 0, None))
                stats[path] = [*hessian_update(h, n, xq), cross_update(cross, xq, x)]
                return
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))  # holding x keeps its memory from reuse
            if last[0] != key:
                last[:] = [key, gram(x), x]
            h, n, _ = stats.get(path, (None, 0, None))
            stats[path] = [*hessian_update(h, n, x, last[1]), None]
        return add

    observe(block, each_input={path: accumulate(path) for path in paths})
    return stats


@fxpass(invalidates={"outputs", "weights_float"}, provides={"weights_quantized", "weights_compensated"}, check=_check)
def gptq(cg, structure, cfg: GPTQConfig | None) -> PassResult:
    """Quantize every linear weight but the output layer's with GPTQ, block by block."""
    cfg = cfg or GPTQConfig()
    hookable, hidden = quantized_sites(cg)
    quantizers = _input_quantizers(cg, hookable) if cfg.act_aware else {}
    changes, seen = [], set()
    try:
        for block, here in sweep(cg, [SiteGroup(s) for s in hookable]):
            stats = _observe_inputs(block, [g.readers[0].module for g in here], quantizers)
            for g in here:
                site = g.readers[0]
                weight = cg.param(site.weight)
                if id(weight) in seen:
                    continue
                seen.add(id(weight))
                w, (h, n, cross) = canonical(weight.detach(), site.transposed), stats[site.module]
                if cross is not None:  # GPTAQ: solve for the quantized inputs the layer will read
                    w = input_aware_target(w, h, cross * (2.0 / n), cfg.damp)
                qw = gptq_quantize(w, h, cfg.format, cfg.options)
                apply_quantized(cg.owner(site.weight), site.weight.name, qw, site.transposed)
                aware = f" for int{quantizers[site.module].bits} inputs" if cross is not None else ""
                changes.append(Change("quantized", site.module, f"{cfg.format.describe()} GPTQ{aware}"))
    finally:
        for path, hook in quantizers.items():  # the activation quantizers go back after their inputs' sweep
            cg.model.get_submodule(path).register_forward_pre_hook(hook)
    for site in hidden:  # inputs no hook sees: round to nearest
        weight = cg.param(site.weight)
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        quantize_site(cg, site, cfg)
        changes.append(Change("quantized", site.module, f"{cfg.format.describe()} RTN (no hook sees this input)"))
    return PassResult(tuple(changes))
