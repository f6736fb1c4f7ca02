"""Find v -> o chains: per KV head, which rows of v's output reach which o input columns (R2).

For each attention op, trace its value input back through views to the linear that makes it
(v_proj, or the v slice of a fused qkv / c_attn), and its output forward through views to the
linear that reads it (o_proj). The channel map between them is computed by `channel_labels`, so
GQA repeats and fused-qkv slices need no special cases. Entry point: `find_vo_chains(cg)`.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch

from fxquant.analysis.dataflow import (
    channel_labels, linear_input, linear_site, module_of, real_users, shape_of, trace_views_back, users_outside,
)
from fxquant.analysis.structure import VALUE_ROTATION, Blocked, HeadMap, VOChain, scope
from fxquant.ir import CapturedGraph
from fxquant.ops import OpClass, attention_value, carried_input, classify

aten = torch.ops.aten


def find_vo_chains(cg: CapturedGraph) -> tuple[list[VOChain], list[Blocked]]:
    chains, blocked = [], []
    for node in cg.graph.nodes:
        if classify(node) is OpClass.ATTENTION:
            found = _vo_chain(cg, node)
            (chains if isinstance(found, VOChain) else blocked).append(found)
    return chains, blocked


def _vo_chain(cg, attn) -> VOChain | Blocked:
    def fail(why):
        return Blocked(attn.name, module_of(attn), f"no v->o chain through this attention: {why}",
                       frozenset({scope(VALUE_ROTATION, attn.name)}))

    value = attention_value(attn)
    v_producer, v_views = trace_views_back(value)
    v = linear_site(cg, v_producer)
    if v is None:
        return fail(f"its value input comes from {v_producer.target}, not from a linear layer")
    o_node, o_views = _reader_through_views(attn)
    o = linear_site(cg, o_node) if o_node is not None else None
    if o is None:
        return fail("its output does not reach exactly one linear layer through views")
    chain = [v_producer, *reversed(v_views), attn, *o_views]
    leaks = [u for u in users_outside(v_views + [attn] + o_views, {o_node}) if not _sibling_output(u, chain)]
    if leaks:
        return fail(f"'{leaks[0].name}' also reads the value path, so rotating v would change it")
    try:
        labels = channel_labels(v_producer, chain)
    except ValueError as exc:
        return fail(str(exc))
    heads = _head_maps(labels, head_dim=shape_of(value)[-1])
    if isinstance(heads, str):
        return fail(heads)
    return VOChain(v, o, attn.name, shape_of(value)[-1], heads)


def _sibling_output(user, chain) -> bool:
    """Another part of a fused projection on the path (q or k of a fused qkv): it reads other channels.
    A split's other outputs; a select (BLOOM's [..., 3, head_dim] view) at another index, or a slice
    of a disjoint range, along the same dim as the path's own."""
    if user.args and user.args[0] in chain and user.target is operator.getitem:
        return True
    if not user.args or user.args[0] not in chain or user.target not in (aten.select.int, aten.slice.Tensor):
        return False
    own = [n for n in chain if n.op == "call_function" and n.args and n.args[0] is user.args[0] and n.target is user.target]
    return bool(own) and all(_disjoint(user, n) for n in own)


def _disjoint(a, b) -> bool:
    """Two selects / slices of one tensor along the same dim that read no common index."""
    rank = len(shape_of(a.args[0]) or ())
    dim_a, dim_b = (int(n.args[1]) % rank if len(n.args) > 1 else 0 for n in (a, b))
    if dim_a != dim_b:
        return False
    if a.target is aten.select.int:
        size = shape_of(a.args[0])[dim_a]
        return int(a.args[2]) % size != int(b.args[2]) % size
    (s_a, e_a), (s_b, e_b) = (_span(n, shape_of(a.args[0])[dim_a]) for n in (a, b))
    return e_a <= s_b or e_b <= s_a


def _span(node, size) -> tuple[int, int]:
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    return max(0, start + size if start < 0 else start), min(size, end + size if end < 0 else end)


def _reader_through_views(attn):
    """Follow single-consumer views from the attention output to the linear that reads it; a scale
    constant over the channels (a per-token, per-head output gate) commutes with R2 and is passed too."""
    node, views = attn, []
    while True:
        users = real_users(node)
        if len(users) != 1:
            return None, views
        user = users[0]
        if classify(user) is OpClass.LINEAR and linear_input(user) is node:
            return user, views
        scale = classify(user) is OpClass.COMMUTES_ORTHOGONAL and carried_input(user) is node
        if classify(user) is not OpClass.VIEW and not scale:
            return None, views
        views.append(user)
        node = user


def _head_maps(labels: torch.Tensor, head_dim: int) -> tuple[HeadMap, ...] | str:
    """Group o input columns into query heads and map each to the contiguous v rows it reads."""
    flat = labels.reshape(-1, labels.shape[-1])
    if not torch.equal(flat, flat[:1].expand_as(flat)):
        return "the channel map differs between tokens"
    cols = flat[0].long()
    if cols.numel() % head_dim:
        return f"o input width {cols.numel()} is not a multiple of head_dim {head_dim}"
    base = int(cols.min())
    by_kv = defaultdict(list)
    for q in range(cols.numel() // head_dim):
        rows = cols[q * head_dim:(q + 1) * head_dim]
        start = int(rows[0])
        if (start - base) % head_dim or not torch.equal(rows, torch.arange(start, start + head_dim)):
            return f"o columns of query head {q} do not read one whole v head in order"
        by_kv[start].append(q)
    return tuple(
        HeadMap(
            kv_head=(start - base) // head_dim, v_rows=(start, start + head_dim), q_heads=tuple(qs),
            o_cols=tuple((q * head_dim, (q + 1) * head_dim) for q in qs),
        )
        for start, qs in sorted(by_kv.items())
    )
