"""The HTML dump: one self-contained page per run with the graph before and after every pass.

Entry points: `HtmlDumper(path)`, a dumper the Pipeline hands each `DumpSnapshot` (`quantize(...,
dump_dir="run.html")`, `FXQUANT_DUMP=run.html`, `fxquant dump`), and `dump(model_or_graph, path)` for
one graph. The one idea: Python does the reading (rows, diff, chains, identical blocks:
`graphdata`, `repeats`) and writes it as one inline JSON blob; the page's own script
(`page_layout`, `page_model`, `page_script`: no library, no network) lays out a group only when it
is opened. The page is
rewritten after every step, so a run that fails still leaves the steps before the failure.
"""
from __future__ import annotations

import datetime
import html
import json
import os
from pathlib import Path

import torch

from fxquant.analysis import analyse
from fxquant.capture import capture
from fxquant.ir import CapturedGraph
from fxquant.pipeline import DumpSnapshot
from fxquant.viz.graphdata import FLAGS, Strings, graph_record, link
from fxquant.viz.page_layout import LAYOUT
from fxquant.viz.page_model import MODEL
from fxquant.viz.page_script import SCRIPT
from fxquant.viz.page_style import STYLE
from fxquant.viz.repeats import repeat_classes


class HtmlDumper:
    """Writes one HTML page at `path` holding every snapshot it has been handed so far.

    Example::

        Pipeline([fold_norms, rotate_residual], dumper=HtmlDumper("run.html")).run(cg)
        # run.html: steps input, fold_norms, rotate_residual; open it from file://
    """

    def __init__(self, path: str | os.PathLike, title: str | None = None, recipe: str | None = None):
        self.path, self.title, self.recipe = Path(path), title, recipe
        self.strings, self.records = Strings(), []
        self._last = None  # (structure, step index) of the last graph analysis found chains in

    def __call__(self, snapshot: DumpSnapshot) -> None:
        if self.title is None:
            self.title = f"fxquant dump: {type(snapshot.cg.model).__name__}" + (f", {self.recipe}" if self.recipe else "")
        chains, current, note = self._structure(snapshot)
        record = graph_record(snapshot, self.strings, chains, current)
        record.note = note
        if self.records:
            link(self.records[-1], record)
            self.records[-1].repeats = repeat_classes(self.records[-1])  # its flags are final now
        self.records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(page(self.data()), encoding="utf-8")

    def _structure(self, snapshot: DumpSnapshot):
        """(chains, current, note): this graph's analysis `current`, whose chains the page shows unless it finds
        fewer than an earlier step's (quantized linears are not linears to analysis): then that step's,
        matched by module path, with a note saying so."""
        try:
            structure = analyse(snapshot.cg)
        except Exception as exc:  # a dump must never fail the run it records
            structure, why = None, f"analysis failed here ({type(exc).__name__}: {exc})"
        else:
            why = "analysis finds fewer chains in this graph"
        if structure is not None and (self._last is None or _chain_count(structure) >= _chain_count(self._last[0])):
            self._last = (structure, snapshot.step)
            return structure, structure, ""
        if self._last is None:
            return None, structure, why
        return self._last[0], structure, f"{why}; chains shown as step '{self._last[1]}' found them, matched by module path"

    def data(self) -> dict:
        """What the page reads: the string table, the flag bits and one entry per step."""
        steps = [{"index": r.index, "step": r.step, "lines": r.lines, "nodes": r.nodes, "chains": r.chains,
                  "blocked": r.blocked, "changes": r.changes, "diff": r.diff, "note": r.note,
                  "repeats": r.repeats if r.repeats is not None else repeat_classes(r)} for r in self.records]
        return {"title": self.title or "fxquant dump", "strings": self.strings.items, "flags": FLAGS,
                "steps": steps, "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _chain_count(s) -> int:
    """What the page colours: v -> o and MLP chains, and the linears that read a norm."""
    return len(s.vo_chains) + len(s.mlp_chains) + sum(len(g.readers) for g in s.stream.groups)


def page(data: dict) -> str:
    """The whole page: style, the JSON blob (with `</` escaped so no string can end the script) and the script."""
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(data['title'])}</title>"
            f"<style>{STYLE}</style></head><body>\n"
            f"<script type=application/json id=fxq-data>{blob}</script>\n"
            f"<script>\n\"use strict\";{LAYOUT}{MODEL}{SCRIPT}</script>\n</body></html>\n")


def dump(model_or_graph, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the HTML page of one graph: a model (captured first), a CapturedGraph or a GraphModule.
    For the graph before and after every pass of a recipe, use `quantize(model, recipe, dump_dir="run.html")`.

    Example::

        fxquant.dump(tiny_model("llama"), "llama.html")   # one step, "input", with the analysis's chains
    """
    if isinstance(model_or_graph, CapturedGraph):
        cg = model_or_graph
    elif isinstance(model_or_graph, torch.fx.GraphModule):
        cg = CapturedGraph(model_or_graph, model_or_graph, {})
    elif isinstance(model_or_graph, torch.nn.Module):
        cg = capture(model_or_graph)
    else:
        raise TypeError(f"fxquant.dump needs a model, CapturedGraph or GraphModule, got {type(model_or_graph).__name__}")
    dumper = HtmlDumper(path, title)
    dumper(DumpSnapshot(0, "input", cg))
    return Path(path)
