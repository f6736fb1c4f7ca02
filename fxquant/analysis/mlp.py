"""Find MLP chains: up (and gate) -> activation -> down, and the down input space they define.

From each linear, trace its input back through views. If it comes from pointwise math, collect
that pointwise region back to the tensors that feed it: one feeder = a plain chain (fc1 -> ReLU/GELU
-> fc2); two feeders joined by a product = a gated chain (act(gate) * up). The rows of `up` that
reach down's input are computed with `channel_labels` (so a fused gate_up split is exact).
Entry point: `find_mlp_chains(cg, skip) -> (chains, online_sites, blocked)`.
"""
from __future__ import annotations

import torch

from fxquant.analysis.dataflow import (
    channel_labels, linear_input, linear_site, module_of, shape_of, trace_views_back, users_outside,
)
from fxquant.analysis.structure import INPUT, Blocked, MLPChain, OnlineSite, scope
from fxquant.ir import CapturedGraph
from fxquant.ops import OpClass, classify

aten = torch.ops.aten
_POINTWISE = {OpClass.ELEMENTWISE, OpClass.COMMUTES_DIAG, OpClass.COMMUTES_ORTHOGONAL, OpClass.RESIDUAL_ADD}


def find_mlp_chains(cg: CapturedGraph, skip: set[str]):
    """MLP chains ending at every linear not named in `skip` whose input is pointwise math."""
    chains, sites, blocked = [], [], []
    for node in cg.graph.nodes:
        if node.name in skip or linear_site(cg, node) is None:
            continue
        producer, views = trace_views_back(linear_input(node))
        if classify(producer) not in _POINTWISE:
            continue
        found = _mlp_chain(cg, node, producer, views)
        if found is None:
            continue  # not fed by linears: the completeness check in analyse() reports it
        if isinstance(found, Blocked):
            blocked.append(found)
            continue
        chains.append(found)
        what = "act(gate) * up" if found.gate else f"{found.act}"
        sites.append(OnlineSite(found.down, producer.name, f"{what} does not commute with a rotation"))
    return chains, sites, blocked


def _mlp_chain(cg, down_node, producer, down_views) -> MLPChain | Blocked | None:
    def fail(why):
        return Blocked(down_node.name, module_of(down_node), f"input of this linear is not an MLP chain: {why}",
                       frozenset({scope(INPUT, module_of(down_node))}))

    region, feeders = _pointwise_region(producer)
    if len(feeders) == 1:
        up_leaf, gate_leaf = feeders[0], None
    elif len(feeders) == 2 and producer.target is aten.mul.Tensor:
        # up is the factor that reaches the product directly; gate goes through the activation
        up_leaf = next((f for f in feeders if f in producer.args[:2]), None)
        gate_leaf = next((f for f in feeders if f is not up_leaf), None)
        if up_leaf is None:
            return fail("neither factor of the product is a linear's output through views alone")
    else:
        return fail(f"the pointwise math before it reads {len(feeders)} tensors, not one (plain) or two (gated)")
    up, up_views, up_node = _linear_behind(cg, up_leaf)
    gate = _linear_behind(cg, gate_leaf)[0] if gate_leaf is not None else None
    if up is None or (gate_leaf is not None and gate is None):
        return None
    leaks = users_outside([*region, *down_views], {down_node})
    if leaks:
        return fail(f"'{leaks[0].name}' also reads the activation, so folding into '{up.module}' would change it")
    rows = _up_rows(up_node, up_views, up_leaf, producer, down_views)
    if isinstance(rows, str):
        return fail(rows)
    act = _act_name(region - {producer} if gate is not None else region)
    commutes = "diag" if gate is not None else ("positive-diag" if _all_relu(region) else "none")
    return MLPChain(linear_site(cg, down_node), up, rows, gate, act, commutes)


def _pointwise_region(producer):
    """Pointwise nodes feeding `producer` (itself included), and the non-pointwise tensors they read."""
    region, feeders, stack = set(), [], [producer]
    while stack:
        node = stack.pop()
        if node in region:
            continue
        region.add(node)
        for arg in node.all_input_nodes:
            shape = shape_of(arg)
            if shape is None or len(shape) == 0 or shape[-1] == 1:
                continue  # scalars and per-token factors do not mix channels
            if classify(arg) in _POINTWISE and shape == shape_of(producer):
                stack.append(arg)
            elif arg not in feeders:
                feeders.append(arg)
    return region, feeders


def _linear_behind(cg, leaf):
    """(LinearSite, views from leaf back to it, linear node) for a feeder reached through views."""
    node, views = trace_views_back(leaf)
    return linear_site(cg, node), views, node


def _up_rows(up_node, up_views, up_leaf, producer, down_views):
    """The contiguous rows of up's output that reach down's input, in order, or a reason why not."""
    try:
        at_leaf = channel_labels(up_node, [up_node, *reversed(up_views)])
        if shape_of(up_leaf) != shape_of(producer):
            return "the activation changes the shape of up's output"
        labels = channel_labels(producer, [producer, *reversed(down_views)], labels=at_leaf)
    except ValueError as exc:
        return str(exc)
    flat = labels.reshape(-1, labels.shape[-1])
    cols = flat[0].long()
    start = int(cols[0])
    if not torch.equal(flat, flat[:1].expand_as(flat)) or not torch.equal(cols, torch.arange(start, start + cols.numel())):
        return "down's input columns do not read one contiguous run of up's rows"
    return (start, start + cols.numel())


def _act_name(region) -> str:
    ops = sorted({getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in region})
    return ops[0] if len(ops) == 1 else "pointwise(" + ",".join(ops) + ")"


def _all_relu(region) -> bool:
    return all(classify(n) is OpClass.COMMUTES_DIAG for n in region)
