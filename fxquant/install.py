"""Installing runtime objects on a model: attention transforms (proved by a probe run) and input scales.

Entry points: `install_in_attention(cg, what, describe, **fields)` (R3 and the KV-cache quantizer:
set a field of every attention module's `AttentionTransform`, then prove by one forward that each
module really dispatches through fxquant's attention), `attention_nodes(cg)`, and
`install_input_scale(module, s)` (an equalization scale no weight absorbs). The one idea: what runs
at inference lives in `fxquant.runtime`; deciding where it goes, and proving it took effect, is
transform work and lives here, so passes of different families share it without importing each other.
"""
from __future__ import annotations

import torch

from fxquant.analysis.structure import Blocked
from fxquant.ops import OpClass, classify
from fxquant.pipeline import Change, PassResult
from fxquant.runtime.attention import ATTR, install, record_calls
from fxquant.runtime.hooks import INPUT_SCALE, InputScale
from fxquant.verify import model_outputs
from fxquant.weights import add_parameter, assign


def attention_nodes(cg) -> dict[str, torch.fx.Node]:
    """Module path -> its attention (SDPA) node, read from the graph (not from v->o chains, which an
    earlier quantizer may have made unprovable)."""
    return {cg.module_of(n): n for n in cg.graph.nodes if classify(n) is OpClass.ATTENTION}


def install_in_attention(cg, what: str, describe, **fields) -> PassResult:
    """Set `fields` of every attention module's AttentionTransform, then prove by a probe run that
    each module dispatches through fxquant's attention; a module that does not is reported blocked."""
    modules = attention_nodes(cg)
    before = {path: getattr(cg.model.get_submodule(path), ATTR, None) for path in modules}
    for path in modules:
        install(cg.model, cg.model.get_submodule(path), **fields)
    with record_calls() as seen:
        model_outputs(cg.model, cg.example_inputs)
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
        blocked.append(Blocked(node.name, path, f"{what}: this attention does not dispatch through "
                                                "transformers' AttentionInterface"))
    return PassResult(tuple(changes), tuple(blocked))


def install_input_scale(module: torch.nn.Module, scale: torch.Tensor) -> None:
    """Multiply `module`'s input by `scale` before anything else its pre-hooks do (composes with an
    existing input scale: the two multiply)."""
    existing = getattr(module, INPUT_SCALE, None)
    if existing is not None:
        assign(existing, existing.detach() * scale.to(existing.dtype))
        return
    add_parameter(module, INPUT_SCALE, scale.to(next(module.parameters()).dtype))
    module.register_forward_pre_hook(InputScale(), prepend=True)
