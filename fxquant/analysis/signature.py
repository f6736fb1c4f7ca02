"""The op signature of a captured graph: the ops that carry the model's meaning, counted.

Entry points: `op_signature(cg) -> {op name: count}` and `signature_diff(expected, actual)`. The one
idea: count only the nodes on the hidden state's path (descendants of the token embedding, or of
the graph inputs when there is none, that reach the output) and leave out views, dtype casts and
runtime asserts (`OpClass.VIEW` / `IGNORE`). Every linear, matmul, norm reduction, activation,
residual add, rotary multiply and fxquant op is counted; mask and position bookkeeping, shape
asserts and layout ops that a transformers or torch release may add are not. Golden snapshots pin
this signature, so a pass that inserts or drops an op fails them and a dependency release does not.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from fxquant.ir import CapturedGraph
from fxquant.ops import OpClass, classify

_LAYOUT = (OpClass.VIEW, OpClass.IGNORE)


def op_signature(cg: CapturedGraph) -> dict[str, int]:
    """Counts of the call nodes on the hidden state's path, by op name, sorted by name."""
    nodes = _hidden_path(cg.graph)
    counts = Counter(op_name(n.target) for n in nodes if classify(n) not in _LAYOUT)
    return dict(sorted(counts.items()))


def signature_diff(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    """One line per op whose count differs: `aten.mul.Tensor: 20 -> 21 (+1)`; empty when equal."""
    lines = []
    for op in sorted(set(expected) | set(actual)):
        before, after = expected.get(op, 0), actual.get(op, 0)
        if before != after:
            lines.append(f"{op}: {before} -> {after} ({after - before:+d})")
    return lines


def op_name(target) -> str:
    """`aten.linear.default` for an OpOverload, the function's name otherwise (`getitem`)."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", None) or str(target)


def _hidden_path(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Call nodes reachable from the embedding lookups (or the inputs) that the output depends on."""
    sources = [n for n in graph.nodes if classify(n) is OpClass.EMBEDDING]
    if not sources:
        sources = [n for n in graph.nodes if n.op == "placeholder"]
    below = _reach(sources, lambda n: n.users)
    above = _reach([n for n in graph.nodes if n.op == "output"], lambda n: n.all_input_nodes)
    return [n for n in graph.nodes if n.op == "call_function" and n in below and n in above]


def _reach(start, step) -> set[torch.fx.Node]:
    seen, todo = set(start), list(start)
    while todo:
        for nxt in step(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
