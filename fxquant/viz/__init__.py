"""Visualise: every readable view fxquant prints or writes (the renderers' room; it reads results, never edits).

Entry points: `graph_text(gm_or_cg)` for a text dump, one line per node with its module path, and
`op_counts(gm)` for the call_function histogram that golden snapshots and tests compare (`text`);
`format_structure(structure, full=False)` for the tables `fxquant inspect` prints (`structure`);
`result_table(pipeline_result)` for the per-pass table after a recipe (`report`); `TextDumper(dir)`,
a `Dumper` the Pipeline hands a `DumpSnapshot` per step (`dump`); `HtmlDumper(path)` for the
one-page HTML dump (`html`, docs/DUMPS.md; `fxquant.dump` is `html.dump`, not re-exported here, where
`dump` names the dumpers' module). The one idea: all tables fold layer indices with one rule,
`fold_indices` (`names`).
"""
from fxquant.viz.dump import Dumper, Dumpers, TextDumper
from fxquant.viz.html import HtmlDumper
from fxquant.viz.names import fold_indices
from fxquant.viz.report import result_table
from fxquant.viz.structure import format_structure
from fxquant.viz.text import graph_text, op_counts

__all__ = ["graph_text", "op_counts", "format_structure", "result_table", "fold_indices", "Dumper", "Dumpers", "TextDumper",
           "HtmlDumper"]
