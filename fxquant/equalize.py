"""Equalization: choose the scale groups a pass edits, and fold per-channel scales into the model.

    x W^T = (x / s)(W diag(s))^T      readers' input columns * s; the producer's output * 1/s

Entry points: `select_groups(cg, structure, scope)` (the groups in scope, each with where hooks see
its input, and a Blocked entry for each group left out) and `fold_scale(cg, group, s)`, the one
place that applies a scale: into a norm's weight (and bias), a producer's output rows, or, when
nothing can absorb it, an explicit multiply on the readers' input (`fxquant.install`). Where 1/s can
go comes from the Structure (`fxquant.analysis.equalize.scale_groups`). Used by the SmoothQuant,
AWQ and cross-layer-equalization passes; every fold leaves the float outputs unchanged.
"""
from __future__ import annotations

import torch

from fxquant.analysis.dataflow import hookable_modules
from fxquant.analysis.equalize import ScaleGroup, scale_groups
from fxquant.analysis.structure import Blocked
from fxquant.install import install_input_scale
from fxquant.pipeline import Change
from fxquant.weights import assign, canonical, scale_in, scale_out, shared_names


def in_scope(group: ScaleGroup, scope: str) -> bool:
    """"norms": inputs a norm makes; "foldable": any the producer absorbs; "all": every group."""
    if scope == "norms":
        return group.kind == "norm" and group.fold != "none"
    return scope == "all" or group.fold != "none"


def reduce_columns(values: torch.Tensor, group: ScaleGroup, how: str = "amax") -> torch.Tensor:
    """Per reader input column -> per scale index (several o columns share one v row's scale)."""
    if group.columns is None:
        return values
    index = torch.tensor(group.columns)
    out = torch.zeros(group.width, dtype=values.dtype)
    return out.scatter_reduce(0, index, values, reduce=how, include_self=False)


def column_scale(s: torch.Tensor, group: ScaleGroup) -> torch.Tensor:
    """Per scale index -> per reader input column."""
    return s if group.columns is None else s[list(group.columns)]


def weight_abs_max(cg, group: ScaleGroup) -> torch.Tensor:
    """max |W[:, j]| over every reader's rows (and experts), per scale index."""
    cols = [_canonical(cg, r).abs().flatten(0, -2).amax(0) for r in group.readers]
    return reduce_columns(torch.stack(cols).amax(0).double(), group)


def _canonical(cg, site) -> torch.Tensor:
    return canonical(cg.param(site.weight).detach(), site.transposed)


@torch.no_grad()
def fold_scale(cg, group: ScaleGroup, s: torch.Tensor, precision=torch.float64) -> Change:
    """Apply x -> x / s to the group's input: readers' columns * s, and 1/s into the producer."""
    if group.positive and bool((s <= 0).any()):
        raise ValueError(f"{group.name}: a non-positive scale does not commute with the ReLU before it")
    s = s.to(precision)
    cols, seen = column_scale(s, group), set()
    for r in group.readers:
        weight = cg.param(r.weight)
        if id(weight) not in seen:
            seen.add(id(weight))
            scale_in(weight, cols, transposed=r.transposed, precision=precision)
    if group.fold == "norm":
        norm = group.norm
        weight = cg.param(norm.weight)
        assign(weight, (weight.detach().to(precision) + norm.offset) / s - norm.offset)
        if norm.bias is not None:
            bias = cg.param(norm.bias)
            assign(bias, bias.detach().to(precision) / s)
    elif group.fold == "rows":
        p, offset = group.producer, 0
        weight, bias = cg.param(p.weight), cg.param(p.bias) if p.bias is not None else None
        for start, end in group.rows:
            scale_out(weight, bias, 1 / s[offset:offset + end - start], transposed=p.transposed, rows=(start, end),
                      precision=precision)
            offset += end - start
    else:
        for r in group.readers:
            install_input_scale(cg.model.get_submodule(r.module), (1 / cols).float())
        return Change("inserted", group.name, f"per-channel multiply on the input ({group.reason})")
    return Change("scaled", group.name, f"1/s folded into {group.target}")


def select_groups(cg, structure, scope: str, need_observer: bool = True):
    """The groups a pass edits, each with where hooks see its input (`observer`; None when not
    needed), and a Blocked entry for each group it leaves (out of scope, tied, unobservable)."""
    hookable = hookable_modules(cg)
    shared = shared_names(cg.model)
    chosen, blocked = [], []
    for group in scale_groups(cg, structure):
        first = group.readers[0]
        where = observer(cg, group, hookable) if need_observer else None
        if not in_scope(group, scope) and group.fold != "none":
            blocked.append(Blocked(first.node, group.name, f"its input is not made by a norm (scope={scope!r}); "
                                                             "scope='foldable' folds it into " + group.target))
        elif not in_scope(group, scope):
            blocked.append(Blocked(first.node, group.name, f"no weight absorbs 1/s ({group.reason}); "
                                                             "scope='all' inserts a multiply"))
        elif any(len(shared.get(id(cg.param(r.weight)), ())) > 1 for r in group.readers):
            blocked.append(Blocked(first.node, group.name, "a reader's weight is tied to another module"))
        elif need_observer and where is None:
            blocked.append(Blocked(first.node, group.name, "no reader is a module whose input is the linear's input"))
        else:
            chosen.append((group, where))
    return chosen, blocked


def observer(cg, group: ScaleGroup, hookable: set[str]) -> tuple[str, str] | None:
    """Where hooks see the group's input: (reader module, "in") when a reader's forward input is the
    linear's input (`hookable`: fxquant.analysis.dataflow.hookable_modules), else (norm module, "out")
    for a norm's readers; None when neither holds."""
    reader = next((r.module for r in group.readers if r.module in hookable), None)
    if reader is not None:
        return reader, "in"
    if group.norm is not None and _is_leaf_norm(cg.model.get_submodule(group.norm.module)):
        return group.norm.module, "out"
    return None


def _is_leaf_norm(module) -> bool:
    """A module that is only the norm (no children, parameters at most weight and bias): its output
    is the norm's output."""
    return not list(module.children()) and {n for n, _ in module.named_parameters()} <= {"weight", "bias"}


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|x|^alpha / max|W|^(1-alpha), 1 where a channel is never active or has no weight."""
    s = x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))
