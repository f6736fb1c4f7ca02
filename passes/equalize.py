"""Equalization: per-channel scales folded into the op that produces a layer's input.

    x W^T = (x / s)(W diag(s))^T      readers' input columns * s; the producer's output * 1/s

Where the 1/s goes comes from `fxquant.analysis.equalize.scale_groups` (a norm's weight, a linear's
output rows, or an explicit multiply when nothing can absorb it); `fold_scale` is the one place
that applies it. Passes here: `smooth_quant` (SmoothQuant, calibrated) and `cross_layer_equalize`
(Nagel et al. 2019, data-free). AWQ, which searches its scales, is in `awq.py`. Every one leaves
the float model's outputs unchanged.
"""
from __future__ import annotations

from collections import Counter

import torch

from fxquant.analysis.dataflow import hookable_modules, linear_sites
from fxquant.analysis.equalize import ScaleGroup, scale_groups
from fxquant.analysis.structure import Blocked
from fxquant.calibrate import block_of, block_sweep, decoder_blocks, observe
from fxquant.config import CLEConfig, SmoothQuantConfig
from fxquant.errors import CalibrationError
from fxquant.runtime.hooks import install_input_scale
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.weights import assign, canonical, scale_in, scale_out

def require_calibration(cg, structure, cfg) -> None:
    """The `check` of a calibrated pass: refuse before any pass runs when there is no data."""
    if not cg.meta.get("calibration"):
        raise CalibrationError(
            "this pass measures activations and needs calibration data: fxquant.quantize(model, recipe, "
            "calibration=token_ids) with a LongTensor [n, seq] (e.g. fxquant.eval.calibration_windows), "
            "or on the command line any model with a tokenizer (the default text's first windows are used)")


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


class SiteGroup:
    """One linear as a group of one reader: what `sweep` takes for per-linear passes."""

    def __init__(self, site):
        self.readers = (site,)


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
    shared = Counter(id(p) for _, p in cg.model.named_parameters(remove_duplicate=False))
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
        elif any(shared[id(cg.param(r.weight))] > 1 for r in group.readers):
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


def quantized_sites(cg):
    """The linears a weight quantizer edits (all but the output layer), split into those whose
    module's forward input is the linear's input (hooks can observe it) and the others."""
    sites = [site for site, is_output in linear_sites(cg) if not is_output]
    hookable = hookable_modules(cg)
    seen = [s.module in hookable for s in sites]
    return [s for s, ok in zip(sites, seen) if ok], [s for s, ok in zip(sites, seen) if not ok]


def _is_leaf_norm(module) -> bool:
    """A module that is only the norm (no children, parameters at most weight and bias): its output
    is the norm's output."""
    return not list(module.children()) and {n for n, _ in module.named_parameters()} <= {"weight", "bias"}


def sweep(cg, groups: list[ScaleGroup]):
    """Yield (block, its groups) over the calibration data, block by block (see fxquant.calibrate);
    groups outside every block come last, with the whole model as their block."""
    blocks = decoder_blocks(cg.model, [g.readers[0].module for g in groups])
    by_block: dict[str, list[ScaleGroup]] = {}
    for g in groups:
        by_block.setdefault(block_of(g.readers[0].module, blocks), []).append(g)
    batches = cg.meta["calibration"]
    for block in block_sweep(cg.model, batches, blocks, progress=cg.meta.get("progress", False)):
        if by_block.get(block.path):
            yield block, by_block[block.path]
    if blocks and by_block.get(""):
        for block in block_sweep(cg.model, batches, [], progress=False):
            yield block, by_block[""]


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|x|^alpha / max|W|^(1-alpha), 1 where a channel is never active or has no weight."""
    s = x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


@fxpass(requires={"weights_float"}, provides={"equalized"}, invalidates={"graph"}, check=require_calibration)
def smooth_quant(cg, structure, cfg: SmoothQuantConfig | None) -> PassResult:
    """SmoothQuant: move activation outliers into the weights, per input channel of each group."""
    cfg = cfg or SmoothQuantConfig()
    chosen, blocked = select_groups(cg, structure, cfg.scope)
    where, changes = dict(chosen), []
    for block, here in sweep(cg, list(where)):
        stats, _, _ = observe(block, stats_of={where[g] for g in here}, keep_outputs=True)
        for g in here:
            x_max = reduce_columns(stats[where[g]].abs_max.double(), g)
            changes.append(fold_scale(cg, g, smooth_scale(x_max, weight_abs_max(cg, g), cfg.alpha),
                                      getattr(torch, cfg.precision)))
    return PassResult(tuple(changes), tuple(blocked))


@fxpass(requires={"weights_float"}, provides={"equalized"})
def cross_layer_equalize(cg, structure, cfg: CLEConfig | None) -> PassResult:
    """Cross-layer equalization (data-free): for each linear -> per-channel-safe op -> linear pair,
    s = sqrt(r1 / r2) with r1 the range of the producer's row, r2 of the reader's column, so both
    end with sqrt(r1 r2). The producer's bias is scaled with its row."""
    cfg = cfg or CLEConfig()
    chosen, blocked = select_groups(cg, structure, "foldable", need_observer=False)
    changes = []
    for g, _ in chosen:
        if g.fold != "rows":
            continue
        w = _canonical(cg, g.producer).abs()
        w = w.flatten(0, -3).amax(0) if w.dim() > 2 else w  # a stack of experts: the largest of each row
        r1 = torch.cat([w[a:b].amax(-1) for a, b in g.rows]).double()
        r2 = weight_abs_max(cg, g)
        s = torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp(min=1e-12)).sqrt(), torch.ones_like(r1))
        changes.append(fold_scale(cg, g, s, getattr(torch, cfg.precision)))
    return PassResult(tuple(changes), tuple(blocked))
