"""Find the residual stream: the space R1 rotates, from embeddings to the readers of every norm.

Walk forward in graph order from each embedding lookup through ops that commute with any
transform of the channel dim (channel-keeping views, scalar or per-token scales, residual adds).
At each residual add, the operand that is not yet on the stream is traced back to the linears that
write it (through views, scales and adds of several writers). Every consumer of a stream value must
be a norm, a linear reader or another stream op; anything else is Blocked with the op named.
Entry point: `find_residual_stream(cg, norms) -> (ResidualStream, blocked, stream_nodes)`.
"""
from __future__ import annotations

from fxquant.analysis.dataflow import (
    Node, linear_input, linear_site, module_of, param_ref, real_users, shape_of, users_outside,
)
from fxquant.analysis.norms import NormMatch
from fxquant.analysis.structure import NORM_FOLD, RESIDUAL, Blocked, NormGroup, ResidualStream, StreamSource, scope
from fxquant.ir import CapturedGraph
from fxquant.ops import OpClass, carried_input, classify, keeps_channels


_STREAM = frozenset({RESIDUAL})  # what an unproven writer or stream reader blocks: folding R1 only


def find_residual_stream(cg: CapturedGraph, norms: list[NormMatch]):
    inside_norm = {n: m for m in norms for n in m.nodes}
    stream, sources, adds, blocked, writers = {}, [], [], [], {}
    for node in cg.graph.nodes:
        if node in inside_norm or node.op != "call_function":
            continue
        cls = classify(node)
        if cls is OpClass.EMBEDDING and param_ref(cg, node.args[0], node) is not None:
            own = _own_norm(cg, node, inside_norm)
            stream[cg.node(own.node) if own else node] = True  # the stream starts after the embedding's norm
            sources.append(_source(cg, node, own))
        elif _extends_stream(node, cls, stream):
            stream[node] = True
            if cls is OpClass.RESIDUAL_ADD:
                adds.append(node.name)
                for operand in node.args[:2]:
                    if operand not in stream:
                        _trace_writers(cg, operand, node, inside_norm, writers, blocked)
    groups = _reader_groups(cg, stream, inside_norm, blocked)
    width = shape_of(next(iter(stream)))[-1] if stream else 0
    result = ResidualStream(width, tuple(sources), tuple(adds), tuple(writers.values()), tuple(groups))
    return result, blocked, set(stream)


def _extends_stream(node, cls, stream) -> bool:
    """Does `node` carry the residual stream onwards (same channels, transform commutes)?"""
    args = [a for a in node.args[:2] if isinstance(a, Node)]
    if cls is OpClass.VIEW:
        return node.args[0] in stream and keeps_channels(node, node.args[0])
    if cls is OpClass.COMMUTES_ORTHOGONAL:  # x * s, s per-token or scalar: s commutes with T
        return carried_input(node) in stream
    if cls is OpClass.RESIDUAL_ADD:
        return any(a in stream for a in args)
    return False


def _source(cg, node, norm=None) -> StreamSource:
    """An embedding is a token source when its indices come (through views) from a graph input."""
    idx = node.args[1]
    while classify(idx) is OpClass.VIEW:
        idx = idx.args[0]
    kind = "token" if idx.op == "placeholder" and idx.name not in cg.params else "position"
    return StreamSource(node.name, module_of(node), param_ref(cg, node.args[0], node), kind, norm)


def _own_norm(cg, embedding, inside_norm):
    """The norm that is the lookup's only reader (through channel-keeping views) and owns its module:
    norm(E[ids]) == norm(E)[ids] row by row, so the table can absorb it. None otherwise."""
    node = embedding
    while len(users := real_users(node)) == 1 and users[0] not in inside_norm and classify(users[0]) is OpClass.VIEW \
            and keeps_channels(users[0], node):
        node = users[0]
    matches = {id(m): m for m in (inside_norm.get(u) for u in users)} if users else {0: None}
    match = next(iter(matches.values())) if len(matches) == 1 else None  # every reader inside one norm
    if match is None or match.site.input != node.name or not match.site.owns_module:
        return None
    return match.site

def _trace_writers(cg, start, add, inside_norm, writers, blocked):
    """Collect the linears whose outputs reach `add` through `start`; block what cannot be rotated."""
    stack, path = [start], []
    while stack:
        node = stack.pop()
        path.append(node)
        cls = classify(node)
        if node in inside_norm:
            norm = inside_norm[node].site
            blocked.append(Blocked(node.name, norm.module, (
                f"norm '{norm.module}' sits on a residual writer's output before add '{add.name}' "
                "(a post-norm block): a rotation of the stream cannot pass through it"), _STREAM))
        elif cls is OpClass.LINEAR and (site := linear_site(cg, node)) is not None:
            writers.setdefault(node.name, site)
        elif cls is OpClass.VIEW and keeps_channels(node, node.args[0]):
            stack.append(node.args[0])
        elif cls is OpClass.COMMUTES_ORTHOGONAL and carried_input(node) is not None:
            stack.append(carried_input(node))
        elif cls is OpClass.RESIDUAL_ADD:
            stack.extend(node.args[:2])
        else:
            blocked.append(Blocked(node.name, module_of(node), (
                f"residual add '{add.name}' adds the output of {_op_name(node)} ({cls.value}), "
                "which is not a linear layer: fxquant cannot rotate what it writes"), _STREAM))
    for outside in users_outside(path, {add}):
        blocked.append(Blocked(outside.name, module_of(outside), (
            f"reads a residual writer's output before add '{add.name}': rotating the writer would change it"), _STREAM))


def _reader_groups(cg, stream, inside_norm, blocked) -> list[NormGroup]:
    groups, seen_norms, direct = [], set(), {}
    for node in stream:
        for user in real_users(node):
            if user in stream:
                continue
            match = inside_norm.get(user)
            if match is not None and match.site.input == node.name:
                if match.site.node not in seen_norms:
                    seen_norms.add(match.site.node)
                    groups.append(NormGroup(match.site, _norm_readers(cg, match, blocked)))
            elif classify(user) is OpClass.LINEAR and linear_input(user) is node and (site := linear_site(cg, user)):
                direct.setdefault(node, []).append(site)
            else:
                what = "the graph output" if user.op == "output" else f"{_op_name(user)} ({classify(user).value})"
                blocked.append(Blocked(user.name, module_of(user), (
                    f"the residual stream (at '{node.name}') is read by {what}, which fxquant does not "
                    "know to commute with a rotation of the stream"), _STREAM))
    groups.extend(NormGroup(None, tuple(readers)) for readers in direct.values())
    return groups


def _norm_readers(cg, match: NormMatch, blocked) -> tuple:
    """Linears that read a norm's output through channel-keeping views."""
    out = cg.node(match.site.node)
    readers, frontier = [], [out]
    while frontier:
        node = frontier.pop(0)
        for user in real_users(node):
            if user in match.nodes:
                continue
            cls = classify(user)
            if cls is OpClass.LINEAR and linear_input(user) is node and (site := linear_site(cg, user)):
                readers.append(site)
            elif cls is OpClass.VIEW and keeps_channels(user, node):
                frontier.append(user)
            elif cls is OpClass.COMMUTES_ORTHOGONAL and carried_input(user) is node:
                frontier.append(user)  # a per-token scale (a router's weight on its experts' input) commutes
            else:
                blocked.append(Blocked(user.name, module_of(user), (
                    f"reads the output of norm '{match.site.module}' but is {_op_name(user)}, not a "
                    "linear layer: the norm's weight cannot be folded past it"),
                    frozenset({RESIDUAL, scope(NORM_FOLD, match.site.module)})))
    position = {n.name: i for i, n in enumerate(cg.graph.nodes)}  # graph order is topological
    return tuple(sorted(readers, key=lambda r: position[r.node]))


def _op_name(node) -> str:
    return "the graph output" if node.op == "output" else str(getattr(node.target, "__name__", node.target))
