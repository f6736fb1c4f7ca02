"""The table `fxquant quantize` prints: one row per pass, what it changed, where, and how long it took.

Entry point: `result_table(pipeline_result)`. Module names are reduced to their last component
(`down_proj`) and details are folded over layer indices (`fold_indices`, the rule every table
shares), so a 30-layer model reads as one line per pass instead of hundreds.
"""
from __future__ import annotations

from collections import Counter

from fxquant.pipeline import PipelineResult
from fxquant.viz.names import fold_indices, leaf


def module_names(targets, limit: int = 7) -> str:
    """The distinct last components, in order: `["m.layers.0.q_proj", "m.layers.1.q_proj", "m.norm"]`
    -> `q_proj, norm` (at most `limit`, then `+N`): short enough for a table cell, and a layer
    count is already in the `changed` column."""
    names = list(dict.fromkeys(leaf(t.split(" ")[0]) for t in targets))
    rest = len(names) - limit
    return ", ".join(names[:limit]) + (f", +{rest}" if rest > 0 else "")


def _cell(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def result_table(result: PipelineResult) -> str:
    """A fixed-width table: pass | changed (counts by kind) | where | how (the commonest detail) |
    blocked | seconds."""
    rows = [("pass", "changed", "where", "how", "blocked", "seconds")]
    for name, res in result.results.items():
        kinds = Counter(c.kind for c in res.changes)
        changed = ", ".join(f"{n} {kind}" for kind, n in kinds.items()) or "-"
        where = module_names([c.target for c in res.changes]) or "-"
        how = Counter(fold_indices(c.detail) for c in res.changes).most_common(1)
        rows.append((name, changed, where, _cell(how[0][0]) if how else "-", str(len(res.blocked)), f"{result.seconds.get(name, 0.0):.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
