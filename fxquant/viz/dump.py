"""Dumpers: what the Pipeline calls with a `DumpSnapshot` of the graph before the first pass and after each.

Entry point: `Pipeline(steps, dumper=TextDumper("dumps"))`. The one idea: the Pipeline owns *when*
a dump happens and what it hands over (the step, its PassResult and log lines, a freshly re-captured
graph); a dumper, any callable that takes a snapshot, owns how the dump looks and where it goes.
So an HTML or diff dumper is a new class here, not an edit to the Pipeline.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fxquant.pipeline import DumpSnapshot
from fxquant.viz.text import graph_text


class Dumper(Protocol):
    """Anything the Pipeline can hand snapshots to: called once for the input and once per step."""

    def __call__(self, snapshot: DumpSnapshot) -> None: ...


@dataclass(frozen=True)
class TextDumper:
    """Writes `NN_<step>.txt` into `directory`: the step's log lines as `# ` comments, then `graph_text`.

    Example::

        Pipeline([fold_norms, rotate_residual], dumper=TextDumper("dumps")).run(cg)
        # dumps/00_input.txt  dumps/01_fold_norms.txt  dumps/02_rotate_residual.txt
        # 01_fold_norms.txt starts "# fold_norms: 10 scaled, 5 folded, 0 blocked"
    """

    directory: str | os.PathLike

    def __call__(self, snapshot: DumpSnapshot) -> None:
        path = Path(self.directory) / f"{snapshot.index:02d}_{snapshot.step}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        comment = "".join(f"# {line}\n" for text in snapshot.lines for line in text.splitlines())
        path.write_text(comment + graph_text(snapshot.cg) + "\n")


@dataclass(frozen=True)
class Dumpers:
    """Several dumpers as one: each gets every snapshot, in order (text files and the HTML page)."""

    dumpers: tuple

    def __call__(self, snapshot: DumpSnapshot) -> None:
        for dumper in self.dumpers:
            dumper(snapshot)
