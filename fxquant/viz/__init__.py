"""Visualise: readable views of a captured graph (the last room; reads only fxquant.ir).

Entry points: `graph_text(gm_or_cg)` for a text dump, one line per node with its module path, and
`op_counts(gm)` for the call_function histogram that golden snapshots and tests compare.
"""
from fxquant.viz.text import graph_text, op_counts

__all__ = ["graph_text", "op_counts"]
