"""The activation quantizers: per-token fake-quant of each linear's input, and the KV cache.

    y = linear(x)   ->   y = linear(dequant(quant(x)))   with one scale per token (row of x)

`quantize_activations` hooks each linear's input; `quantize_kv_cache` fake-quantizes keys (after
R3, when present) and values per (token, head) inside fxquant's attention implementation.

A hook sits on the module that owns a linear only when that module's input *is* the linear's input
(nn.Linear, GPT-2's Conv1D); a linear inside a larger module (a stacked-expert MoE block) is
reported as blocked, never silently skipped. The output layer stays in float.
"""
from __future__ import annotations

from fxquant.analysis.dataflow import hookable_modules, weight_sites
from fxquant.analysis.structure import Blocked
from fxquant.config import ActQuantConfig, KVQuantConfig
from fxquant.install import install_in_attention
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.runtime.hooks import ActivationFakeQuant, activation_hooks, remove_activation_hooks


@fxpass(invalidates={"outputs", "graph"}, provides={"activations_quantized"})
def quantize_activations(cg, structure, cfg: ActQuantConfig | None) -> PassResult:
    """Install a per-token fake-quant hook on the input of every linear but the output layer."""
    cfg = cfg or ActQuantConfig()
    sites = weight_sites(cg)
    hookable = hookable_modules(cg)
    installed = activation_hooks(cg.model)
    changes, blocked = [], []
    for site in sites:
        module = cg.model.get_submodule(site.module)
        if site.module not in hookable:
            blocked.append(Blocked(site.node, site.module, "linear runs inside a larger module: its input "
                                                            "cannot be quantized by a hook on the module"))
            continue
        hook = ActivationFakeQuant(cfg.bits, cfg.symmetric, float(cfg.clip_ratio))
        if installed.get(site.module) == hook:
            continue
        replaced = remove_activation_hooks(module)
        module.register_forward_pre_hook(hook)
        changes.append(Change("act-quant", site.module, f"int{cfg.bits} per token" + (" (replaced)" if replaced else "")))
    return PassResult(tuple(changes), tuple(blocked))


@fxpass(invalidates={"outputs", "graph"}, provides={"kv_quantized"})
def quantize_kv_cache(cg, structure, cfg: KVQuantConfig | None) -> PassResult:
    """Fake-quantize keys (after R3, when present) and values per (token, head) as they enter attention."""
    cfg = cfg or KVQuantConfig()
    return install_in_attention(cg, "KV", lambda node: f"int{cfg.bits} per (token, head)",
                                kv_bits=cfg.bits, kv_symmetric=cfg.symmetric)
