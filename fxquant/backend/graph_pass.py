"""The inductor pass: fxquant ops left in a post-grad graph go onto their fast kernels, fused where they chain.

Entry point: `FxquantGraphPass(options)`, installed as inductor's `post_grad_custom_pre_pass`. The
one idea: what needs weights (a linear's kernel layout) is done before inductor, on the raised
module tree (`fxquant.lowering.lower`); what is left are weightless ops inside the graph (R3's
Hadamards on q and k, the KV-cache quantizers, quantizers no linear absorbed), rewritten here by
rules as data, each a (target, handler) pair whose handler returns a replacement node or None.
`uuid()` hashes the backend's and the runtime's code and the options, so inductor's FX graph cache stays on.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from fxquant.runtime.kernels import ops as kernel_ops
from fxquant.runtime.library import FAKE_QUANT, HADAMARD


def source_files() -> tuple[str, ...]:
    """Every file of the code a compiled graph runs through: the backend and the runtime (kernels,
    lowered layers, attention). Inductor's caches key a graph whose lowered modules call fxquant ops
    by the graph, not by those modules' code, so a change to any kernel must change `uuid()` (a
    kernel whose arguments changed was once served from a stale cache entry)."""
    root = Path(__file__).resolve().parents[1]
    return tuple(str(f) for d in ("backend", "runtime") for f in sorted((root / d).rglob("*.py")))


def _fused_hadamard_quant(graph: torch.fx.Graph, node: torch.fx.Node):
    # fake_quant(hadamard(x)) -> fast_hadamard_fake_quant(x): rotate and quantize in one pass over memory
    source = node.args[0]
    if not (isinstance(source, torch.fx.Node) and source.target is HADAMARD and len(source.users) == 1):
        return None
    return graph.call_function(kernel_ops.FAST_HADAMARD_FAKE_QUANT, (source.args[0], *_quant_args(node)))


def _fast_quant(graph: torch.fx.Graph, node: torch.fx.Node):
    # fake_quant(x) -> fast_fake_quant(x): the same rounding (bit-identical), one vectorised pass
    return graph.call_function(kernel_ops.FAST_FAKE_QUANT, (node.args[0], *_quant_args(node)))


def _fast_hadamard(graph: torch.fx.Graph, node: torch.fx.Node):
    # hadamard(x) -> fast_hadamard(x): H_m x H_A x H_B as three small GEMMs instead of one n x n
    return graph.call_function(kernel_ops.FAST_HADAMARD, (node.args[0],))


def _quant_args(node: torch.fx.Node) -> tuple:
    """(bits, symmetric[, clip_ratio]) as the quantizer node spelled them: inductor's fallback for a
    custom op expects a node's arguments in the schema's normalised form, defaults left out."""
    return tuple(node.args[1:]) + tuple(node.kwargs.values())


RULES = (  # tried in order on each node; a quantizer fuses with its Hadamard before either goes alone
    (FAKE_QUANT, _fused_hadamard_quant),
    (FAKE_QUANT, _fast_quant),
    (HADAMARD, _fast_hadamard),
)
_TARGETS = {target for target, _ in RULES}


def pending(graph: torch.fx.Graph) -> Counter:
    """The fxquant ops in a graph that RULES rewrite, by op name: what the pass will take (a graph
    inductor finds in its FX graph cache skips the pass, so the report counts these instead)."""
    return Counter(str(n.target.name()) for n in graph.nodes if n.op == "call_function" and n.target in _TARGETS)


def rewrite(graph: torch.fx.Graph) -> Counter:
    """Apply RULES to every node of `graph` in place; counts of rewrites by rule name."""
    counts, erased = Counter(), set()
    for node in reversed(list(graph.nodes)):  # users first: a quantizer meets its Hadamard unrewritten
        if node.op != "call_function" or node in erased or not node.users:
            continue
        for target, handler in RULES:
            if node.target is not target:
                continue
            with graph.inserting_before(node):
                new = handler(graph, node)
            if new is None:
                continue
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            inputs = node.all_input_nodes
            graph.erase_node(node)
            for dead in (n for n in inputs if n.target is HADAMARD and not n.users):
                graph.erase_node(dead)  # the Hadamard a fused quantizer took over
                erased.add(dead)
            counts[handler.__name__.lstrip("_")] += 1
            break
    return counts


class FxquantGraphPass(CustomGraphPass):
    """fxquant's post-grad pass: `rewrite` with the options that shaped the graph, recording counts."""

    def __init__(self, options: dict | None = None):
        self.options = dict(options or {})
        self.counts: Counter = Counter()

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.counts.update(rewrite(graph))

    def uuid(self) -> str:
        code = get_hash_for_files(source_files())
        return f"{code.hex() if isinstance(code, bytes) else code}-{json.dumps(self.options, sort_keys=True, default=str)}"
