"""Analysis: a captured graph -> a frozen Structure. Pure: reads the graph, never mutates it.

Entry point: `analyse(cg)`. The finders run in data-flow order (norms, residual stream, v->o
chains, MLP chains); then every linear must have an explained input space (a stream reader, an
attention output, an MLP activation) or it is reported as Blocked, so nothing is silently skipped.
"""
from __future__ import annotations

from fxquant.analysis.attention import find_vo_chains
from fxquant.analysis.dataflow import linear_input, linear_site, module_of, trace_views_back
from fxquant.analysis.mlp import find_mlp_chains
from fxquant.analysis.norms import find_norms
from fxquant.analysis.stream import find_residual_stream
from fxquant.analysis.structure import (
    Blocked, HeadMap, LinearSite, MLPChain, NormGroup, NormSite, OnlineSite, ResidualStream,
    StreamSource, Structure, VOChain,
)
from fxquant.ir import CapturedGraph
from fxquant.ops import OpClass, classify

__all__ = [
    "analyse", "Blocked", "HeadMap", "LinearSite", "MLPChain", "NormGroup", "NormSite", "OnlineSite",
    "ResidualStream", "StreamSource", "Structure", "VOChain",
]


def analyse(cg: CapturedGraph) -> Structure:
    """Find the residual stream, norm groups, writers, v->o and MLP chains of a captured graph."""
    norms, blocked = find_norms(cg)
    stream, stream_blocked, _ = find_residual_stream(cg, norms)
    vo_chains, vo_blocked = find_vo_chains(cg)
    readers = {r.node for g in stream.groups for r in g.readers}
    o_inputs = {c.o.node for c in vo_chains}
    mlp_chains, online, mlp_blocked = find_mlp_chains(cg, skip=readers | o_inputs)
    explained = readers | o_inputs | {c.down.node for c in mlp_chains}
    blocked += stream_blocked + vo_blocked + mlp_blocked + _unexplained_linears(cg, explained, mlp_blocked)
    return Structure(
        stream=stream,
        norms=tuple(m.site for m in norms),
        vo_chains=tuple(vo_chains),
        mlp_chains=tuple(mlp_chains),
        online_sites=tuple(online),
        blocked=tuple(dict.fromkeys(blocked)),
        tied=cg.tied,
    )


def _unexplained_linears(cg, explained, already) -> list[Blocked]:
    reported = {b.node for b in already}
    out = []
    for node in cg.graph.nodes:
        if classify(node) is not OpClass.LINEAR or node.name in explained or node.name in reported:
            continue
        if classify(trace_views_back(linear_input(node))[0]) is OpClass.ONLINE:
            continue  # its input is rotated online (R4): explained by the op fxquant inserted
        if linear_site(cg, node) is None:
            why = "its weight is not a parameter of the model, so no transform can be folded into it"
        else:
            why = ("its input is neither a reader of the residual stream, an attention output nor an MLP "
                   "activation: fxquant does not know which transforms its input space allows")
        out.append(Blocked(node.name, module_of(node), why))
    return out
