"""Where a per-channel equalization scale can go: the linears sharing one input, and its producer.

An equalization scale s rewrites x W^T = (x / s)(W diag(s))^T. The readers absorb diag(s) in their
input columns; the 1/s must be absorbed by whatever produces x, found from the Structure:

- a norm's weight (and bias): norm -> q/k/v, norm -> gate/up;
- a linear's output rows, when only per-channel-safe ops lie between: v -> attention -> o (one scale
  per v row, repeated over the o columns of every query head that reads it under GQA), up -> act(gate)
  * up -> down (any scale), fc1 -> ReLU -> fc2 (positive scales only);
- nothing (a GELU MLP, an online Hadamard, a weightless norm): the scale needs an explicit multiply.

Entry point: `scale_groups(cg, structure) -> list[ScaleGroup]`. The output layer is never part of a
group (it stays in float, and scaling a tied lm_head would scale the embeddings too).
"""
from __future__ import annotations

from dataclasses import dataclass

from fxquant.analysis.dataflow import linear_sites
from fxquant.analysis.structure import LinearSite, NormSite, Structure
from fxquant.ir import CapturedGraph

Span = tuple[int, int]


@dataclass(frozen=True)
class ScaleGroup:
    """Linears reading one input, and where the inverse of a scale of that input is folded.

    `width`: the scale's length. `columns[c]`: the scale index of reader input column c (None: the
    identity, width == in_features). `fold`: "norm" (into `norm`), "rows" (into `rows` of the
    linear `producer`, in scale order) or "none" (`reason` says why; an explicit multiply is needed).
    `positive`: only positive scales commute with what lies between (ReLU).
    """

    kind: str  # "norm" | "vo" | "mlp" | "input"
    readers: tuple[LinearSite, ...]
    width: int
    fold: str
    norm: NormSite | None = None
    producer: LinearSite | None = None
    rows: tuple[Span, ...] = ()
    columns: tuple[int, ...] | None = None
    positive: bool = False
    reason: str = ""

    @property
    def name(self) -> str:
        """The readers' modules: `model.layers.0.self_attn.q_proj+k_proj+v_proj`."""
        first, *rest = [r.module for r in self.readers]
        return "+".join([first, *(m.rsplit(".", 1)[-1] for m in rest)])

    @property
    def target(self) -> str:
        """Where the 1/s goes, in words."""
        if self.fold == "norm":
            return self.norm.module
        if self.fold == "rows":
            return f"{self.producer.module} rows"
        return "an inserted multiply"


def scale_groups(cg: CapturedGraph, structure: Structure) -> list[ScaleGroup]:
    """Every group of quantizable linears sharing an input, in graph order, with its fold target."""
    outputs = {site.node for site, is_output in linear_sites(cg) if is_output}
    groups, covered = [], set()

    def add(group):
        if any(r.node in outputs for r in group.readers):
            return
        groups.append(group)
        covered.update(r.node for r in group.readers)

    for g in structure.stream.groups:
        width = g.readers[0].in_features
        if g.norm is not None and g.norm.weight is not None:
            add(ScaleGroup("norm", g.readers, width, "norm", norm=g.norm))
        else:
            why = "it reads the residual stream directly" if g.norm is None else f"{g.norm.module} has no weight"
            add(ScaleGroup("norm", g.readers, width, "none", reason=why))
    for chain in structure.vo_chains:
        add(_vo_group(chain))
    for chain in structure.mlp_chains:
        if chain.commutes == "none":
            add(ScaleGroup("mlp", (chain.down,), chain.down.in_features, "none",
                           reason=f"{chain.act} between {chain.up.module} and it is not per-channel linear"))
        else:
            add(ScaleGroup("mlp", (chain.down,), chain.down.in_features, "rows", producer=chain.up,
                           rows=(chain.up_rows,), positive=chain.commutes == "positive-diag"))
    for site in structure.online_sites:
        if site.linear.node not in covered:
            add(ScaleGroup("input", (site.linear,), site.linear.in_features, "none", reason=site.reason))
    return groups


def _vo_group(chain) -> ScaleGroup:
    """One scale per v output row; o column c of query head q gets the scale of the v row it reads."""
    columns = [0] * chain.o.in_features
    offset, rows = 0, []
    for head in chain.heads:
        rows.append(head.v_rows)
        for start, end in head.o_cols:
            for c in range(start, end):
                columns[c] = offset + (c - start)
        offset += head.v_rows[1] - head.v_rows[0]
    return ScaleGroup("vo", (chain.o,), offset, "rows", producer=chain.v, rows=tuple(rows), columns=tuple(columns))
