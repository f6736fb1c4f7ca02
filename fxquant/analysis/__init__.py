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
    INPUT, Blocked, HeadMap, LinearSite, MLPChain, NormGroup, NormSite, OnlineSite, ResidualStream,
    StreamSource, Structure, VOChain, scope,
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
    latent = {m.site.node: m.site for m in norms}
    blocked += stream_blocked + vo_blocked + mlp_blocked + _unexplained_linears(cg, explained, mlp_blocked, latent)
    return Structure(
        stream=stream,
        norms=tuple(m.site for m in norms),
        vo_chains=tuple(vo_chains),
        mlp_chains=tuple(mlp_chains),
        online_sites=tuple(online),
        blocked=tuple(dict.fromkeys(blocked)),
        tied=cg.tied,
    )


def _unexplained_linears(cg, explained, already, norm_outputs) -> list[Blocked]:
    reported = {b.node for b in already}
    out = []
    for node in cg.graph.nodes:
        if classify(node) is not OpClass.LINEAR or node.name in explained or node.name in reported:
            continue
        if classify(trace_views_back(linear_input(node))[0]) is OpClass.ONLINE:
            continue  # its input is rotated online (R4): explained by the op fxquant inserted
        norm = norm_outputs.get(trace_views_back(linear_input(node))[0].name)
        if norm is not None and classify(trace_views_back(cg.node(norm.input))[0]) is not OpClass.LINEAR:
            norm = None  # a norm of something else than a down-projection's output: the generic reason
        if linear_site(cg, node) is None:
            why = "its weight is not a parameter of the model, so no transform can be folded into it"
        elif norm is not None:
            why = (f"its input is the output of norm '{norm.module}' on a linear's output (a low-rank latent, as "
                   "multi-head latent attention has), not on the residual stream: R1 does not reach it, so an online "
                   "rotation or equalization of this input is left; weight quantization is not affected")
        else:
            why = ("its input is neither a reader of the residual stream, an attention output nor an MLP "
                   "activation: fxquant does not know which transforms its input space allows")
        out.append(Blocked(node.name, module_of(node), why, frozenset({scope(INPUT, module_of(node))})))
    return out
