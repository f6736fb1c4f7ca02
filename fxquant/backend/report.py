"""What one compile did, for people: the recipe's passes, the kernels, the graph rewrites, what was left.

Entry points: `CompileReport` (one per graph dynamo handed the backend), `collect()` (a context
manager gathering the reports of the compiles inside it) and `explain(model, *args, **kwargs)`
(compile with the fxquant backend, run once, return the reports). The one idea: every compile
logs its report on the `fxquant` logger; `explain` is the same reports, handed back.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

log = logging.getLogger("fxquant")
_ACTIVE: list[list] = []  # report lists of the collect() blocks now open


@dataclass(frozen=True)
class CompileReport:
    """One graph's compile: how many weights, linears and attentions were raised to modules, the
    recipe's log (one line per pass), the lowering summary, the inductor pass's rewrites, and the
    places left as they were, each with its reason."""

    graph: int
    weights: int
    linears: int
    attentions: int
    recipe: tuple[str, ...] = ()
    lowering: str = ""
    pending: dict = field(default_factory=dict)  # fxquant ops left in the graph for the inductor pass
    rewrites: dict = field(default_factory=dict)  # what the pass did (empty: inductor's cache had the graph)
    left: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"fxquant backend, graph {self.graph}: {self.weights} weights, {self.linears} linears and "
                 f"{self.attentions} attentions raised to modules"]
        lines += [f"  recipe: {line}" for line in self.recipe]
        lines += [f"  kernel: {line.strip()}" for line in self.lowering.splitlines()]
        if self.pending:
            ops = ", ".join(f"{n} x {op}" for op, n in self.pending.items())
            done = (", ".join(f"{n} x {rule}" for rule, n in self.rewrites.items()) if self.rewrites
                    else "the graph came from inductor's FX graph cache, rewritten as when it was compiled")
            lines.append(f"  inductor pass: {ops} in the graph -> {done}")
        lines += [f"  left: {line}" for line in self.left]
        return "\n".join(lines)


def publish(report: CompileReport) -> None:
    """Log `report` and hand it to every open `collect()` block."""
    log.info("%s", report)
    for reports in _ACTIVE:
        reports.append(report)


@contextmanager
def collect():
    """Gather the CompileReports of the compiles that run inside the block (a list, filled as they run)."""
    reports: list[CompileReport] = []
    _ACTIVE.append(reports)
    try:
        yield reports
    finally:
        _ACTIVE.remove(reports)


def explain(model, *args, options: dict | None = None, mode: str | None = None, **kwargs) -> list[CompileReport]:
    """Compile `model` with the fxquant backend (`options`, `mode` as torch.compile takes them), run
    it once on `args` / `kwargs`, and return the report of every graph compiled.

    Example::

        for report in fxquant.explain(model, ids, options={"recipe": "rotate-r1r2-w4a16"}):
            print(report)
        # fxquant backend, graph 0: 23 weights, 15 linears and 2 attentions raised to modules
        #   recipe: fold_norms: 10 scaled, 5 folded, 0 blocked ...
    """
    torch._dynamo.reset()  # a cached compile would report nothing
    compiled = torch.compile(model, backend="fxquant", options=options, mode=mode)
    with collect() as reports:
        compiled(*args, **kwargs)
    return reports
