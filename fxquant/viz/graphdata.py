"""Graph data for the HTML dump: a captured graph as plain lists the page draws, and the diff between steps.

Entry points: `Strings` (the one string table a page shares), `graph_record(snapshot, strings, structure)`
and `link(before, after)`. The one idea: the page never sees torch. Each node becomes a short row
`[name, op, module, inputs, shape, flags, origin]` (strings as indices into `Strings`), with flags
for what the page pulls out of the layout (parameters, shared inputs such as rotary tables and
masks, asserts with no users) and for what a step did (created, erased by the next step, weight
edited). Nodes of two steps are matched per module by their op sequence (`difflib`), since a
re-capture renames every node; a node keeps the step that created it as its `origin`.
"""
from __future__ import annotations

import difflib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from fxquant.ir import META_MODULE, META_PARAM
from fxquant.viz.names import fold_indices
from fxquant.viz.text import _shape, op_name

PARAM, INPUT, SHARED, CREATED, EDITED, ERASED, FXQUANT, HIDDEN, OUTPUT, BLOCKED = (1 << i for i in range(10))
FLAGS = {"param": PARAM, "input": INPUT, "shared": SHARED, "created": CREATED, "edited": EDITED,
         "erased": ERASED, "fxquant": FXQUANT, "hidden": HIDDEN, "output": OUTPUT, "blocked": BLOCKED}
NAME, OP, MODULE, INPUTS, SHAPE, FLAG, ORIGIN = range(7)  # the columns of a node row


class Strings:
    """Interned strings: ops, module paths and shapes repeat thousands of times, the page stores each once."""

    def __init__(self):
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if text not in self._index:
            self._index[text] = len(self.items)
            self.items.append(text)
        return self._index[text]


@dataclass
class GraphRecord:
    """One step of a run as the page reads it; `nodes` rows gain flags when the next step is linked."""

    index: int
    step: str
    lines: tuple[str, ...]
    nodes: list[list]
    modules: list[str]  # module path per node (params: their owner), uninterned, for matching
    tokens: list[str]  # what a node is, independent of its name: the op, or the parameter it reads
    chains: list[list] = field(default_factory=list)
    blocked: list[list] = field(default_factory=list)
    changes: list[list] = field(default_factory=list)
    note: str = ""
    diff: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)  # parameter name -> fingerprint, to tell which a step edited
    repeats: dict | None = None  # repeat_classes, kept once the next step is linked (flags then final)


def graph_record(snapshot, strings: Strings, chains=None, current=None) -> GraphRecord:
    """Rows for every node of `snapshot.cg`; the chains of the Structure `chains` (this graph's analysis
    `current`, or an earlier step's, then matched by module path); the residual adds of `current`;
    the step's changes and blocked places."""
    cg = snapshot.cg
    nodes = list(cg.gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    live = _live(nodes)
    modules, tokens, rows = [], [], []
    for n in nodes:
        ref = n.meta.get(META_PARAM) or cg.params.get(n.name) if n.op == "placeholder" else None
        module = ref.module if ref is not None else n.meta.get(META_MODULE, "")
        token = _token(n, ref)
        flags = _flags(n, ref, token) | (HIDDEN if n.op == "call_function" and n not in live else 0)
        modules.append(module)
        tokens.append(token)
        rows.append([n.name, strings(token), strings(module), [pos[a] for a in n.all_input_nodes],
                     strings(_shape(n.meta.get("val"))), flags, 0])
    record = GraphRecord(snapshot.index, snapshot.step, tuple(snapshot.lines), rows, modules, tokens,
                         weights=fingerprints(cg))
    _mark_shared(record, nodes, pos)
    if snapshot.result is not None:
        record.changes = [[c.kind, c.target, c.detail] for c in snapshot.result.changes]
    names = {n.name: i for i, n in enumerate(nodes)}
    _add_chains(record, chains, names if chains is current else {})
    _add_stream(record, current, names)
    for item in getattr(snapshot.result, "blocked", ()):
        _add_blocked(record, item, names, snapshot.step)
    return record


def _token(n, ref) -> str:
    if n.op == "placeholder":
        return f"param {ref}" if ref is not None else "input"
    if n.op == "output":
        return "output"
    if n.op == "call_function":
        return op_name(n.target)
    return f"{n.op} {n.target}"


def _flags(n, ref, token: str) -> int:
    if n.op == "placeholder":
        return PARAM if ref is not None else INPUT
    if n.op == "output":
        return OUTPUT
    return FXQUANT if token.startswith("fxquant.") else 0


def _live(nodes) -> set:
    """Nodes the output depends on; the rest (asserts, dead index arithmetic) are hidden from the layout."""
    live, stack = set(), [n for n in nodes if n.op == "output"]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack += n.all_input_nodes
    return live


@torch.no_grad()
def fingerprints(cg) -> dict[str, tuple[float, float]]:
    """Per parameter, (sum, sum of every 7th value) in float64: a rotation keeps norms but not these, so a
    changed fingerprint between two steps means the step edited that weight."""
    out = {}
    for ref in set(cg.params.values()):
        try:
            t = cg.param(ref).detach().reshape(-1)
        except AttributeError:  # a parameter the model no longer holds (replaced by packed codes)
            continue
        if t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int32):  # accumulate in float64, no copy
            out[str(ref)] = (float(t.sum(dtype=torch.float64)), float(t[::7].sum(dtype=torch.float64)))
    return out


def block_of(module: str, numbered: set[str]) -> str | None:
    """`model.layers.3.mlp` -> `model.layers.3` when `model.layers.3` is one of several numbered siblings."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and ".".join(parts[:i + 1]) in numbered:
            return ".".join(parts[:i + 1])
    return None


def numbered_blocks(modules) -> set[str]:
    """Module paths ending in an index whose parent has at least two indexed children (decoder blocks)."""
    children = defaultdict(set)
    for m in set(modules):
        parts = m.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                children[".".join(parts[:i])].add(".".join(parts[:i + 1]))
    return {b for kids in children.values() if len(kids) >= 2 for b in kids}


def _mark_shared(record: GraphRecord, nodes, pos) -> None:
    """Shared inputs: nodes outside every block read by several blocks (rotary tables, masks), and the
    nodes outside blocks they depend on (position ids); the page lists them apart instead of drawing
    a fan of long edges into every block."""
    numbered = numbered_blocks(record.modules)
    blocks = [block_of(m, numbered) for m in record.modules]
    seeds = [n for n in nodes if blocks[pos[n]] is None and n.op == "call_function"
             and len({blocks[pos[u]] for u in n.users} - {None}) >= 2]
    shared, stack = set(), list(seeds)
    while stack:
        n = stack.pop()
        i = pos[n]
        if i in shared or blocks[i] is not None or n.op != "call_function":
            continue
        shared.add(i)
        stack += n.all_input_nodes
    for i in shared:
        record.nodes[i][FLAG] |= SHARED


def _members(record: GraphRecord, module: str, name: str | None, names: dict) -> list[int]:
    """The node of a linear site: by name when the analysis ran on this graph, else the nodes of `module`
    that read a parameter (a quantized linear reads its codes), else the module's last node."""
    if name is not None and name in names:
        return [names[name]]
    own = [i for i, m in enumerate(record.modules) if m == module and not record.nodes[i][FLAG] & (PARAM | HIDDEN)]
    readers = [i for i in own if any(record.nodes[a][FLAG] & PARAM for a in record.nodes[i][INPUTS])]
    return readers or own[-1:]


def _add_chains(record: GraphRecord, structure, names: dict) -> None:
    """Chains as `[class, label, detail, node indices(, roles)]`: norm -> readers, v -> o (roles: which node
    is v, which o, and per KV head the query heads reading it), up/gate -> down. `names` (node name ->
    row) is empty when the structure is an earlier graph's: its sites are then found by module."""
    if structure is None:
        return
    pick = (lambda site: _members(record, site.module, site.node, names))
    for g in structure.stream.groups:
        norm = g.norm
        nodes = [i for i, m in enumerate(record.modules) if norm and m == norm.module and not record.nodes[i][FLAG] & (PARAM | HIDDEN)]
        nodes += [i for r in g.readers for i in pick(r)]
        label = f"{norm.module if norm else '(no norm)'} -> {' '.join(r.module.rsplit('.', 1)[-1] for r in g.readers)}"
        record.chains.append(["norm", label, f"{norm.kind} norm, eps {norm.eps:g}" if norm else "", nodes])
    for c in structure.vo_chains:
        heads = "; ".join(f"kv{h.kv_head}: v rows {h.v_rows[0]}:{h.v_rows[1]} -> q heads {list(h.q_heads)} -> o cols "
                          + ",".join(f"{a}:{b}" for a, b in h.o_cols) for h in c.heads)
        v, o = pick(c.v), pick(c.o)
        roles = {"v": v, "o": o, "heads": [[h.kv_head, list(h.q_heads)] for h in c.heads]}  # the page's head strips
        record.chains.append(["vo", f"{c.v.module} -> {c.o.module.rsplit('.', 1)[-1]}",
                              f"head_dim {c.head_dim}, {c.num_kv_heads} kv / {c.num_q_heads} q heads. {heads}", v + o, roles])
    for c in structure.mlp_chains:
        sites = [c.up] + ([c.gate] if c.gate else []) + [c.down]
        record.chains.append(["mlp", f"{c.up.module} -> {c.down.module.rsplit('.', 1)[-1]}",
                              f"{'gated ' if c.gate else ''}{c.act}, commutes: {c.commutes}", [i for s in sites for i in pick(s)]])


def _add_stream(record: GraphRecord, current, names: dict) -> None:
    """The residual adds this graph's analysis found and, on the input graph, its Blocked places (later
    graphs hold ops analysis is not meant for: quantized linears, online Hadamards)."""
    if current is None:
        return
    adds = [names[a] for a in current.stream.adds if a in names]
    record.chains.append(["stream", "residual stream", f"width {current.stream.width}", adds])
    for b in current.blocked if record.index == 0 else ():
        _add_blocked(record, b, names, "analysis")


def _add_blocked(record: GraphRecord, item, names: dict, source: str) -> None:
    """A Blocked place as `[node index or -1, module, reason, source]`; its node (or its module's first) is flagged."""
    node, module, reason = getattr(item, "node", ""), getattr(item, "module", ""), getattr(item, "reason", str(item))
    index = names.get(node, -1)
    if index < 0:
        index = next((i for i, m in enumerate(record.modules) if m == module and not record.nodes[i][FLAG] & (PARAM | HIDDEN)), -1)
    if index >= 0:
        record.nodes[index][FLAG] |= BLOCKED
    record.blocked.append([index, module, reason, source])


def link(before: GraphRecord, after: GraphRecord) -> None:
    """Match the nodes of two consecutive steps per module by op sequence; flag `after`'s unmatched
    nodes CREATED (origin: this step), `before`'s ERASED, and weights the step changed (and their readers) EDITED."""
    by_module = defaultdict(lambda: ([], []))
    for side, record in enumerate((before, after)):
        for i, module in enumerate(record.modules):
            by_module[module][side].append(i)
    for old, new in by_module.values():
        matcher = difflib.SequenceMatcher(None, [before.tokens[i] for i in old], [after.tokens[j] for j in new], autojunk=False)
        matched_old, matched_new = set(), set()
        for a, b, size in matcher.get_matching_blocks():
            for k in range(size):
                after.nodes[new[b + k]][ORIGIN] = before.nodes[old[a + k]][ORIGIN]
                matched_old.add(old[a + k])
                matched_new.add(new[b + k])
        for i in set(old) - matched_old:
            before.nodes[i][FLAG] |= ERASED
        for j in set(new) - matched_new:
            after.nodes[j][FLAG] |= CREATED
            after.nodes[j][ORIGIN] = after.index
    _mark_edited(before, after)
    weights = Counter(fold_indices(t[len("param "):]) for row, t in zip(after.nodes, after.tokens) if row[FLAG] & PARAM and row[FLAG] & EDITED)
    after.diff = {"created": _rows(after, CREATED), "erased": _rows(before, ERASED), "edited": _edited_rows(after),
                  "weights": [[name, n] for name, n in weights.items()]}


def _mark_edited(before: GraphRecord, after: GraphRecord) -> None:
    """EDITED: a parameter whose values the step changed (fingerprints differ), and the kept nodes reading it."""
    edited = {name for name, fp in after.weights.items() if name in before.weights and before.weights[name] != fp}
    params = {i for i, t in enumerate(after.tokens) if after.nodes[i][FLAG] & PARAM and t[len("param "):] in edited}
    for i, row in enumerate(after.nodes):
        if i in params or (not row[FLAG] & CREATED and params.intersection(row[INPUTS])):
            row[FLAG] |= EDITED


def _rows(record: GraphRecord, flag: int) -> list[list]:
    """Flagged nodes folded over layer indices, parameters left out (the edited list names weights):
    `[["model.layers.*.mlp.down_proj  fxquant.hadamard.default", 30]]`."""
    counts = Counter(f"{fold_indices(m) or '(root)'}  {t}" for row, m, t in zip(record.nodes, record.modules, record.tokens)
                     if row[FLAG] & flag and not row[FLAG] & (HIDDEN | PARAM))
    return [[text, n] for text, n in counts.items()]


def _edited_rows(record: GraphRecord) -> list[list]:
    counts = Counter(f"{kind} {fold_indices(target)}" + (f" ({fold_indices(detail)})" if detail else "")
                     for kind, target, detail in record.changes)
    return [[text, n] for text, n in counts.items()]
