"""The activation quantizers: per-token fake-quant of each linear's input, and the KV cache.

    y = linear(x)   ->   y = linear(dequant(quant(x)))   with one scale per token (row of x)

`quantize_activations` hooks each linear's input; `quantize_kv_cache` fake-quantizes keys (after
R3, when present) and values per (token, head) inside fxquant's attention implementation.

A hook sits on the module that owns a linear only when that module's input *is* the linear's input
(nn.Linear, GPT-2's Conv1D); a linear inside a larger module (a stacked-expert MoE block) is
reported as blocked, never silently skipped. The output layer stays in float unless
`output_layer_bits` is given; the inputs an online Hadamard rotates (R4) may take their own
`rotated_input_bits` (mixed precision). The KV quantizer may work in groups of channels within a
head and keep the first `sink_tokens` positions (attention sinks) float. With `act_clip_search`
each layer's clip ratio is chosen on calibration data (the pass is then calibrated).
"""
from __future__ import annotations

import torch

from fxquant.analysis.dataflow import hookable_modules, linear_input, linear_sites, shape_of, trace_views_back
from fxquant.analysis.structure import Blocked
from fxquant.calibrate import SiteGroup, observe, require_calibration, sweep
from fxquant.config import ActQuantConfig, KVQuantConfig
from fxquant.errors import RecipeError
from fxquant.install import attention_nodes, install_in_attention
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.quant.format import QuantFormat
from fxquant.ops import OpClass, classify
from fxquant.runtime.kernels.ops import FAST_FAKE_QUANT
from fxquant.runtime.library import FAKE_QUANT
from fxquant.quant.numerics import CLIP_GRID, clip_errors
from fxquant.runtime.hooks import ActivationFakeQuant, OnlineHadamard, activation_hooks, remove_activation_hooks
from fxquant.weights import canonical


def _bits_of(cfg: ActQuantConfig, module, role: tuple[bool, bool]) -> int | None:
    """The activation bits of one linear's input, `role` = (is the output layer, is an R4 site): the
    output layer's own (None: float), those of an MLP input an online Hadamard rotates (R4) when
    given (not a reader R1 rotates online), else `bits`."""
    is_output, r4_site = role
    if is_output:
        return cfg.output_layer_bits
    if cfg.rotated_input_bits is not None and r4_site and any(isinstance(h, OnlineHadamard)
                                                              for h in module._forward_pre_hooks.values()):
        return cfg.rotated_input_bits
    return cfg.bits


def _rotated_mlp_input(cg, site) -> bool:
    """Is this linear's input an online Hadamard of MLP activations (R4), read from the graph? (R1
    online rotates a norm's output instead: those readers keep `bits`.)"""
    x = trace_views_back(linear_input(cg.node(site.node)))[0]
    if x.target in (FAKE_QUANT, FAST_FAKE_QUANT):  # the quantizer an earlier config installed after it
        x = trace_views_back(x.args[0])[0]
    if classify(x) is not OpClass.ONLINE:
        return False
    return classify(trace_views_back(x.args[0])[0]) in (OpClass.ELEMENTWISE, OpClass.COMMUTES_DIAG)


SEARCH_TOKENS = 8192  # act_clip_search: the calibration tokens each layer's clip ratio is chosen on


def _check_act(cg, structure, cfg: ActQuantConfig | None) -> None:
    """Before any pass runs: a clip search needs calibration data."""
    if cfg is not None and cfg.act_clip_search:
        require_calibration(cg, structure, cfg)


@fxpass(invalidates={"outputs", "graph"}, provides={"activations_quantized"}, check=_check_act)
def quantize_activations(cg, structure, cfg: ActQuantConfig | None) -> PassResult:
    """Install a per-token fake-quant hook on the input of every linear but the output layer (and
    on the output layer's when `output_layer_bits` is given)."""
    cfg = cfg or ActQuantConfig()
    hookable = hookable_modules(cg)
    changes, blocked, sites = [], [], {}
    for site, is_output in linear_sites(cg):
        module = cg.model.get_submodule(site.module)
        bits = _bits_of(cfg, module, (is_output, _rotated_mlp_input(cg, site)))
        if bits is None:  # the output layer stays float: a quantizer an earlier config put there goes
            if remove_activation_hooks(module):
                changes.append(Change("act-quant", site.module, "removed: the output layer stays float"))
        elif site.module not in hookable:
            blocked.append(Blocked(site.node, site.module, "linear runs inside a larger module: its input "
                                                            "cannot be quantized by a hook on the module"))
        else:
            sites[site.module] = (site, bits)
    clips = _search_clips(cg, cfg, sites) if cfg.act_clip_search else {}
    installed = activation_hooks(cg.model)
    for path, (site, bits) in sites.items():
        hook = ActivationFakeQuant(bits, cfg.symmetric, float(clips.get(path, cfg.clip_ratio)))
        if installed.get(path) == hook:
            continue
        module = cg.model.get_submodule(path)
        replaced = remove_activation_hooks(module)
        module.register_forward_pre_hook(hook)
        clip = f", clip {hook.clip_ratio:g} searched" if path in clips else ""
        changes.append(Change("act-quant", path, f"int{bits} per token{clip}" + (" (replaced)" if replaced else "")))
    return PassResult(tuple(changes), tuple(blocked))


def _search_clips(cg, cfg: ActQuantConfig, sites: dict) -> dict[str, float]:
    """Per layer, the clip ratio of CLIP_GRID whose rounding of its first SEARCH_TOKENS calibration
    inputs has the least output-weighted error (numerics.clip_errors, channel j weighted by
    ||W[:, j]||^2). Inputs are float activations with the online Hadamards on (earlier activation
    quantizers are taken off first), block by block as GPTQ sees them; ties keep the larger ratio."""
    for path in sites:
        remove_activation_hooks(cg.model.get_submodule(path))
    errors, seen = {}, {}

    def accumulate(site, bits):
        fmt = QuantFormat(bits, cfg.symmetric, None, "int")  # the format fxquant::fake_quant rounds in
        weights = canonical(cg.param(site.weight).detach(), site.transposed).float().pow(2).sum(dim=0)

        def add(x):
            rows = x.reshape(-1, x.shape[-1])[:max(0, SEARCH_TOKENS - seen.get(site.module, 0))]
            if len(rows):
                seen[site.module] = seen.get(site.module, 0) + len(rows)
                errors[site.module] = errors.get(site.module, 0) + clip_errors(rows, fmt, CLIP_GRID, weights)
        return add

    for block, here in sweep(cg, [SiteGroup(site) for site, _ in sites.values()]):
        observe(block, each_input={g.readers[0].module: accumulate(*sites[g.readers[0].module]) for g in here})
    return {path: CLIP_GRID[int(torch.argmin(e))] for path, e in errors.items()}


def check_kv_groups(cg, structure, cfg: KVQuantConfig | None) -> None:
    """Before any pass runs: `kv_group_size` divides every attention's key and value head size."""
    group = (cfg or KVQuantConfig()).kv_group_size
    if group is None:
        return
    sizes = sorted({shape_of(arg)[-1] for node in attention_nodes(cg).values() for arg in node.args[1:3]})
    if any(size % group for size in sizes):
        fits = [g for g in range(1, min(sizes) + 1) if all(size % g == 0 for size in sizes)]
        raise RecipeError(f"KVQuantConfig.kv_group_size = {group} does not divide the key/value head sizes "
                          f"{sizes} of this model; nothing was changed. Group sizes that fit: {fits}")


@fxpass(invalidates={"outputs", "graph"}, provides={"kv_quantized"}, check=check_kv_groups)
def quantize_kv_cache(cg, structure, cfg: KVQuantConfig | None) -> PassResult:
    """Fake-quantize keys (after R3, when present) and values per (token, head) or per (token, head,
    group) as they enter attention, the first `sink_tokens` positions left float."""
    cfg = cfg or KVQuantConfig()
    check_kv_groups(cg, structure, cfg)
    grain = "(token, head)" if cfg.kv_group_size is None else f"(token, head, {cfg.kv_group_size} channels)"
    sinks = f", first {cfg.sink_tokens} positions float" if cfg.sink_tokens else ""
    return install_in_attention(cg, "KV", lambda node: f"int{cfg.bits} per {grain}{sinks}",
                                kv_bits=cfg.bits, kv_symmetric=cfg.symmetric, kv_clip_ratio=float(cfg.kv_clip_ratio),
                                kv_group_size=cfg.kv_group_size, kv_sink_tokens=cfg.sink_tokens)
