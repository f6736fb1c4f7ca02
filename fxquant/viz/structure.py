"""Text tables of a Structure: what `fxquant inspect` prints.

Entry point: `format_structure(structure, full=False)`. Repeated per-layer rows are folded into one
row with the layer index as `*` and a count (`fold_indices`, the rule every table shares; pass
`full=True` for every row); Blocked items are never folded. `str(structure)` is only a one-line
summary: analysis cannot import the renderers that run after it.
"""
from __future__ import annotations

import re
from collections import Counter

from fxquant.analysis.structure import Structure
from fxquant.viz.names import fold_indices, leaf


def format_structure(s: Structure, full: bool = False) -> str:
    """The counts line, then one table per item kind (stream, norm groups, writers, v->o and MLP chains,
    online sites), Blocked items with their reasons, and tied parameters.

    Example::

        print(format_structure(analyse(capture(tiny_model("llama")))))
        # Norm -> linear groups (5):
        #   model.layers.*.input_layernorm           rms, eps 1e-06  q_proj k_proj v_proj  x2
    """
    lines = [_counts_line(s), "", f"Residual stream: width {s.stream.width}, {len(s.stream.adds)} residual adds"]
    lines += [f"  source  {src.module}  ({src.kind} embedding, weight {src.weight})" for src in s.stream.sources]
    lines += _section("Norm -> linear groups", [
        (g.norm.module if g.norm else "(no norm)", _norm_desc(g.norm), " ".join(_site_name(r) for r in g.readers))
        for g in s.stream.groups], full)
    lines += _section("Residual writers", [(w.module, f"{w.in_features}->{w.out_features}", "") for w in s.stream.writers], full)
    lines += _section("v -> o chains (per KV head: query heads, o columns)", [
        (f"{c.v.module} -> {leaf(c.o.module)}", f"head_dim {c.head_dim}, {c.num_kv_heads} kv / {c.num_q_heads} q",
         " ".join(f"kv{h.kv_head}:v[{h.v_rows[0]}:{h.v_rows[1]}]->q{list(h.q_heads)}" for h in c.heads))
        for c in s.vo_chains], full)
    lines += _section("MLP chains", [
        (f"{c.up.module}[{c.up_rows[0]}:{c.up_rows[1]}] -> {leaf(c.down.module)}",
         f"{'gated ' if c.gate else ''}{c.act}", f"commutes: {c.commutes}") for c in s.mlp_chains], full)
    lines += _section("Inputs needing an online transform", [
        (o.linear.module, f"after {o.after if full else _fold_node(o.after)}", o.reason) for o in s.online_sites], full)
    lines += ["", f"Blocked ({len(s.blocked)}):"] + ([f"  {b.with_scopes()}" for b in s.blocked] or ["  none"])
    if s.tied:
        lines += ["", "Tied parameters: " + "; ".join(" = ".join(g) for g in s.tied)]
    return "\n".join(lines)


def _counts_line(s: Structure) -> str:
    return ", ".join(f"{v} {k}" for k, v in s.counts().items())


def _norm_desc(norm) -> str:
    if norm is None:
        return ""
    parts = [norm.kind, f"eps {norm.eps:g}"]
    if norm.offset:
        parts.append(f"scale {norm.offset:g}+w")
    if norm.weight is None:
        parts.append("no weight")
    if norm.bias is not None:
        parts.append("bias")
    return ", ".join(parts)


def _section(title, rows, full) -> list[str]:
    rows = [(*r, 1) for r in rows] if full else _fold(rows)
    out = ["", f"{title} ({sum(n for *_, n in rows)}):"]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    for a, b, c, n in rows:
        count = f"  x{n}" if n > 1 else ""
        out.append(f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c}{count}".rstrip())
    return out


def _fold(rows):
    """Merge rows equal up to layer indices (digits in dotted paths) into one row with a count."""
    counts = Counter(tuple(fold_indices(x) for x in row) for row in rows)
    return [(*row, n) for row, n in counts.items()]


def _fold_node(name: str) -> str:
    """mul_12 -> mul_* (export numbers repeated nodes)."""
    return re.sub(r"_\d+$", "_*", name)


def _site_name(site) -> str:
    """q_proj; for stacked MoE experts, experts.gate_up_proj (the module holds several weights)."""
    return f"{leaf(site.module)}.{site.weight.name}" if site.experts else leaf(site.module)
