"""The frozen result of analysis: what a model's graph offers to rotation and equalization passes.

`Structure` is pure data (frozen, hashable); transforms consume it and never re-derive it. Every
item names graph nodes and module paths, and every place analysis could not prove is a `Blocked`
entry with its reason, never a silent gap. `str(structure)` is a one-line summary; the tables
`fxquant inspect` shows are `fxquant.viz.format_structure(structure)`.
"""
from __future__ import annotations

from dataclasses import dataclass

from fxquant.errors import UnsupportedPatternError
from fxquant.ir import ParamRef


@dataclass(frozen=True)
class LinearSite:
    """A linear layer as the graph uses it. `transposed`: weight stored [in, out] (GPT-2 Conv1D).
    `experts`: the weight is a stack of that many expert matrices ([E, out, in]; 0 = a plain matrix)."""

    node: str
    module: str
    weight: ParamRef
    bias: ParamRef | None
    in_features: int
    out_features: int
    transposed: bool = False
    experts: int = 0


@dataclass(frozen=True)
class NormSite:
    """A norm read from ops: out = normalize(x) * (offset + weight) + bias."""

    node: str  # the node that carries the norm's output
    input: str  # the node it normalizes
    module: str
    kind: str  # "rms" | "layer"
    eps: float
    width: int
    weight: ParamRef | None
    bias: ParamRef | None = None
    offset: float = 0.0  # 1.0 for Gemma-style (1 + w) norms
    owns_module: bool = True  # the module computes this norm and nothing else (it may be swapped whole)


@dataclass(frozen=True)
class NormGroup:
    """A reader of the residual stream: a norm (None when a linear reads the stream directly) and
    the linears that read its output."""

    norm: NormSite | None
    readers: tuple[LinearSite, ...]


@dataclass(frozen=True)
class StreamSource:
    """An embedding lookup whose output starts the residual stream; `norm`: the embedding's own norm
    between the lookup and the stream (BLOOM's word_embeddings_layernorm), a function of each table
    row that `fold_norms` folds into the table."""

    node: str
    module: str
    weight: ParamRef
    kind: str  # "token" | "position"
    norm: NormSite | None = None


@dataclass(frozen=True)
class ResidualStream:
    """Embeddings -> residual adds -> norms/readers: the space R1 rotates."""

    width: int
    sources: tuple[StreamSource, ...]
    adds: tuple[str, ...]
    writers: tuple[LinearSite, ...]
    groups: tuple[NormGroup, ...]


@dataclass(frozen=True)
class HeadMap:
    """One KV head: its rows of v's output, the query heads that read it, their o input columns."""

    kv_head: int
    v_rows: tuple[int, int]
    q_heads: tuple[int, ...]
    o_cols: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class VOChain:
    """v -> attention -> o: per KV head, a rotation of v's rows is undone by o's columns (R2)."""

    v: LinearSite
    o: LinearSite
    attention: str
    head_dim: int
    heads: tuple[HeadMap, ...]

    @property
    def num_kv_heads(self) -> int:
        return len(self.heads)

    @property
    def num_q_heads(self) -> int:
        return sum(len(h.q_heads) for h in self.heads)


@dataclass(frozen=True)
class MLPChain:
    """up (and gate) -> activation -> down. `up_rows`: rows of `up`'s output that form down's input."""

    down: LinearSite
    up: LinearSite
    up_rows: tuple[int, int]
    gate: LinearSite | None
    act: str
    commutes: str  # "diag" (gated: any scale on up), "positive-diag" (ReLU), "none"


@dataclass(frozen=True)
class OnlineSite:
    """A linear whose input space no neighbour weight can absorb: a rotation there must be an op."""

    linear: LinearSite
    after: str  # the node that blocks folding
    reason: str


# What an unproven place prevents (`Blocked.blocks`): a pass refuses only when a place it would edit
# or rely on is blocked. A scope is a kind, or `kind:place` for one norm, attention or linear.
RESIDUAL = "residual rotation"  # rotating the residual stream by folding (R1), centring it (LayerNorm)
NORM_FOLD = "norm fold"  # folding one norm's weight into its readers: `norm fold:<norm module>`
VALUE_ROTATION = "value rotation"  # R2 at one attention: `value rotation:<attention node>`
INPUT = "input transform"  # an online rotation or equalization scale of one linear's input: `input transform:<module>`
EVERYTHING = frozenset({"*"})  # an unclassified Blocked blocks every transform (the safe default)


def scope(kind: str, place: str) -> str:
    """`norm fold:model.layers.0.input_layernorm`: one kind of transform at one place."""
    return f"{kind}:{place}"


def scope_words(s: str) -> str:
    """A scope in words for a refusal: `the norm fold of 'model.norm'`."""
    kind, _, place = s.partition(":")
    return "every transform" if s == "*" else f"the {kind}" + (f" of '{place}'" if place else "")


@dataclass(frozen=True)
class Blocked:
    """A place analysis could not prove, the reason, and the scopes it blocks (`blocks`)."""

    node: str
    module: str
    reason: str
    blocks: frozenset = EVERYTHING

    def prevents(self, scopes) -> bool:
        """Does this place block any of `scopes` (exact scopes or bare kinds, which match every place)?"""
        if "*" in self.blocks or "*" in scopes:
            return True
        kinds = {b.partition(":")[0] for b in self.blocks}
        return any(s in self.blocks or s in kinds for s in scopes)

    def with_scopes(self) -> str:
        """`str(self)` and what it blocks: `... [blocks the residual rotation]`."""
        return f"{self} [blocks {', '.join(map(scope_words, sorted(self.blocks)))}]"

    def __str__(self) -> str:
        if not self.node:  # a module-level refusal (pack works on modules, not nodes)
            return f"module '{self.module}': {self.reason}"
        where = f" in module '{self.module}'" if self.module else ""
        return f"node '{self.node}'{where}: {self.reason}"


@dataclass(frozen=True)
class Structure:
    """Everything analysis found in one captured graph."""

    stream: ResidualStream
    norms: tuple[NormSite, ...]
    vo_chains: tuple[VOChain, ...]
    mlp_chains: tuple[MLPChain, ...]
    online_sites: tuple[OnlineSite, ...]
    blocked: tuple[Blocked, ...]
    tied: tuple[tuple[str, ...], ...] = ()

    def counts(self) -> dict[str, int]:
        return {
            "stream sources": len(self.stream.sources),
            "norm->linear groups": len(self.stream.groups),
            "residual writers": len(self.stream.writers),
            "v->o chains": len(self.vo_chains),
            "mlp chains": len(self.mlp_chains),
            "online sites": len(self.online_sites),
            "blocked": len(self.blocked),
        }

    def blocking(self, scopes) -> tuple[Blocked, ...]:
        """The Blocked places that prevent any of `scopes` (kinds or `kind:place` scopes)."""
        return tuple(b for b in self.blocked if b.prevents(scopes))

    def refuse_if_blocked(self, purpose: str, scopes=("*",), *, strict: bool = False, still: str = "") -> None:
        """The one refusal a transform gives before touching a weight: the unproven places it needs.

        Only places that block one of `scopes` (what the pass edits or relies on) refuse; `strict`
        refuses on any unproven place. Raises UnsupportedPatternError naming each place, its module,
        the reason and the scope it blocks; `still` says what would still work.
        """
        found = self.blocked if strict else self.blocking(scopes)
        if not found:
            return
        items = "\n".join(f"  - {b.with_scopes()}" for b in found)
        hint = f"\nWhat still works on this model: {still}." if still and not strict else ""
        raise UnsupportedPatternError(
            f"{purpose} refused, nothing was changed: fxquant could not prove {len(found)} "
            f"place(s) in this model's graph that it needs:\n{items}{hint}\nRun `fxquant inspect --model ...` to "
            "see the structure found; a pattern fxquant does not know needs an entry in fxquant/ops.py or a "
            "finder in fxquant/analysis/ before this transform can be applied safely."
        )

    def group_of(self, norm_module: str) -> NormGroup:
        for g in self.stream.groups:
            if g.norm is not None and g.norm.module == norm_module:
                return g
        raise KeyError(f"no norm group for module {norm_module!r}")

    def __str__(self) -> str:
        """One line of counts; the tables are `fxquant.viz.format_structure(s)` (viz runs after analysis)."""
        summary = ", ".join(f"{n} {kind}" for kind, n in self.counts().items() if kind != "stream sources")
        return f"Structure: {summary} (fxquant.viz.format_structure(s) for the tables)"
