"""Installing runtime objects on a model: attention transforms (proved by a probe run) and input scales.

Entry points: `install_in_attention(cg, what, describe, **fields)` (R3 and the KV-cache quantizer:
set a field of every attention module's `AttentionTransform`, then prove by one forward that each
module really dispatches through fxquant's attention), `attention_nodes(cg)`, and
`install_input_scale(module, s)` (an equalization scale no weight absorbs),
`install_online_hadamard(cg, site, precision)` (an online Hadamard on a linear's input, R1 online and R4). The one idea: what runs
at inference lives in `fxquant.runtime`; deciding where it goes, and proving it took effect, is
transform work and lives here, so passes of different families share it without importing each other.
"""
from __future__ import annotations

import torch

from fxquant.analysis.structure import Blocked
from fxquant.ops import OpClass, classify
from fxquant.pipeline import Change, PassResult
from fxquant.runtime.attention import ATTR, install, record_calls
from fxquant.hadamard import hadamard_transform
from fxquant.runtime.hooks import INPUT_SCALE, InputScale, OnlineHadamard
from fxquant.verify import model_outputs
from fxquant.weights import add_parameter, assign, rotate_in

PROBE_RTOL = 1e-4  # the probe: fxquant's attention gives the model's logits to this relative error (or the dtype's)


def attention_nodes(cg) -> dict[str, torch.fx.Node]:
    """Module path -> its attention (SDPA) node, read from the graph (not from v->o chains, which an
    earlier quantizer may have made unprovable)."""
    return {cg.module_of(n): n for n in cg.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default}


def eager_attention(cg, what: str) -> list[Blocked]:
    """Attention the model computes itself (softmax(.) @ v, no AttentionInterface call): `what` (R3, the
    KV quantizer) cannot run inside it, reported rather than skipped in silence."""
    return [Blocked(n.name, cg.module_of(n), f"{what}: this attention is computed by the model's own code "
                    "(softmax(q k^T) @ v, e.g. soft-capped scores), not through transformers' AttentionInterface, "
                    "so fxquant cannot run inside it; a model that also supports attn_implementation='sdpa' can "
                    "be loaded with it")
            for n in cg.graph.nodes if classify(n) is OpClass.ATTENTION and n.target in (torch.ops.aten.matmul.default,
                                                                                        torch.ops.aten.bmm.default)]


def install_in_attention(cg, what: str, describe, **fields) -> PassResult:
    """Set `fields` of every attention module's AttentionTransform, then prove by a probe run that
    each module dispatches through fxquant's attention; a module that does not is reported blocked."""
    modules = attention_nodes(cg)
    before = {path: getattr(cg.model.get_submodule(path), ATTR, None) for path in modules}
    seen, why = _probe(cg, modules) if modules else (set(), "")
    for path in modules:
        if id(cg.model.get_submodule(path)) in seen:
            install(cg.model, cg.model.get_submodule(path), **fields)
    changes, blocked = [], []
    for path, node in modules.items():
        module = cg.model.get_submodule(path)
        if id(module) in seen:
            changes.append(Change("inserted", path, f"{what} {describe(node)}"))
            continue
        if before[path] is None:
            delattr(module, ATTR)
        else:
            setattr(module, ATTR, before[path])
        blocked.append(Blocked(node.name, path, f"{what}: {why}"))
    return PassResult(tuple(changes), tuple(blocked + eager_attention(cg, what)))


def _probe(cg, modules) -> tuple[set, str]:
    """Route every attention module through fxquant's implementation with the transform it already has
    (none: the identity) and prove by one forward that each dispatches there and that the model computes
    what it did before; ({ids of the modules that do}, why the others do not). On any failure the
    model's own implementation is put back for all of them."""
    configs = _configs(cg.model, modules)
    implementations = {id(c): c._attn_implementation for c in configs}
    ref = model_outputs(cg.model, cg.example_inputs)
    for path in modules:
        install(cg.model, cg.model.get_submodule(path))
    why = "this attention does not dispatch through transformers' AttentionInterface"
    try:
        with record_calls() as seen:
            out = model_outputs(cg.model, cg.example_inputs)
        err = (out - ref).abs().max().item()
        if err > max(PROBE_RTOL, 4 * torch.finfo(out.dtype).eps) * ref.abs().max().item():
            why = (f"fxquant's attention implementation (SDPA) computes something else than this model's own "
                   f"'{next(iter(implementations.values()), '?')}' attention (max |logit diff| {err:.3g}); load "
                   "the model with attn_implementation='sdpa' if it supports it")
            seen = set()
    except Exception as exc:  # the model's attention code branches on its own implementation's name
        why = (f"this model's attention code does not run under another AttentionInterface implementation "
               f"(the probe forward raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        seen = set()
    if not seen:
        for config in configs:
            config._attn_implementation = implementations[id(config)]
    return set(seen), why


def _configs(model, paths) -> list:
    """The configs `install` may switch to fxquant's attention implementation (the model's, each module's)."""
    found = [getattr(model, "config", None)] + [getattr(model.get_submodule(p), "config", None) for p in paths]
    return list({id(c): c for c in found if c is not None and hasattr(c, "_attn_implementation")}.values())


def install_input_scale(module: torch.nn.Module, scale: torch.Tensor) -> None:
    """Multiply `module`'s input by `scale` before anything else its pre-hooks do (composes with an
    existing input scale: the two multiply)."""
    existing = getattr(module, INPUT_SCALE, None)
    if existing is not None:
        assign(existing, existing.detach() * scale.to(existing.dtype))
        return
    add_parameter(module, INPUT_SCALE, scale.to(next(module.parameters()).dtype))
    module.register_forward_pre_hook(InputScale(), prepend=True)


def install_online_hadamard(cg, site, precision: torch.dtype) -> None:
    """x W^T = hadamard(x) (W H^T / sqrt(n))^T: fold the inverse into `site`'s weight and rotate its input
    online, before any activation quantizer (R4 on down_proj; R1 online on a reader of the stream)."""
    rotate_in(cg.param(site.weight), hadamard_transform, transposed=site.transposed, precision=precision)
    cg.model.get_submodule(site.module).register_forward_pre_hook(OnlineHadamard(), prepend=True)
