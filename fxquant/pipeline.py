"""The Pipeline: runs passes in order and owns every piece of work between them.

Entry point: `Pipeline(steps).run(cg) -> PipelineResult`. A pass is a plain function
`fn(cg, structure, cfg) -> PassResult` that declares facts with `@fxpass(requires=, provides=,
invalidates=)`. The one idea: a pass only edits the model; the Pipeline checks the facts before
anything runs, re-captures and re-analyses after an invalidation, lints, verifies the float outputs,
logs one line per pass and hands the graph to a dumper, and on failure names the pass and the
passes before it.
"""
from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from tqdm.auto import tqdm

from fxquant.capture import capture as capture_model
from fxquant.errors import FxquantError, PassError, RecipeError
from fxquant.ir import CapturedGraph, RunContext
from fxquant.verify import as_inputs, finite_weights, model_outputs, outputs_unchanged

LOGGER = logging.getLogger("fxquant")
GRAPH = "graph"  # invalidated -> re-capture the model, then re-analyse
STRUCTURE = "structure"  # invalidated -> re-analyse
OUTPUTS = "outputs"  # invalidated -> the pass changes the float outputs on purpose (quantization)


@dataclass(frozen=True)
class Change:
    """One line of "what changed": `rotated model.layers.0.self_attn.v_proj (head 1)`."""

    kind: str
    target: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.target}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class PassResult:
    """What one pass did (`changes`) and what it declined to do, each with a reason (`blocked`).
    `invalidates`: "graph" / "structure" when this run went stale in a way the pass does not always
    (it replaced a module, added a hook), on top of what its @fxpass declares."""

    changes: tuple[Change, ...] = ()
    blocked: tuple = ()
    invalidates: frozenset = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "changes", tuple(self.changes))
        object.__setattr__(self, "blocked", tuple(self.blocked))
        object.__setattr__(self, "invalidates", frozenset(self.invalidates))
        if not self.invalidates <= {GRAPH, STRUCTURE}:
            raise PassError(f"PassResult.invalidates may name {GRAPH!r} and {STRUCTURE!r} only, got "
                            f"{sorted(self.invalidates)}; declare other facts in @fxpass(invalidates=...)")

    @property
    def modified(self) -> bool:
        return bool(self.changes)

    def summary(self) -> str:
        """One line, counts by kind: `2 scaled, 1 folded, 0 blocked`."""
        counts = Counter(c.kind for c in self.changes)
        parts = [f"{n} {kind}" for kind, n in counts.items()] or ["no changes"]
        return ", ".join([*parts, f"{len(self.blocked)} blocked"])


@dataclass(frozen=True)
class PassInfo:
    """The facts a pass declares; attached to the function as `fn.fxpass`."""

    name: str
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()
    check: Callable | None = None


def fxpass(requires=(), provides=(), invalidates=(), check=None):
    """Declare a pass's facts; the Pipeline checks `requires` and acts on `invalidates`.

    `check(cg, structure, cfg)`, when given, raises before *any* pass of the pipeline runs when the
    pass could not succeed on this model (a group size that does not divide a layer): decide
    before doing, so a late failure does not follow earlier edits.

    Example::

        @fxpass(requires={"norms_folded"}, provides={"residual_rotated"}, invalidates={"structure"})
        def rotate_residual(cg, structure, cfg) -> PassResult: ...

        rotate_residual.fxpass.requires  # frozenset({'norms_folded'})
    """

    def attach(fn):
        name = fn.__name__
        fn.fxpass = PassInfo(name, _facts(name, requires), _facts(name, provides), _facts(name, invalidates), check)
        return fn

    return attach


def _facts(name: str, facts) -> frozenset[str]:
    facts = (facts,) if isinstance(facts, str) else tuple(facts)
    bad = [f for f in facts if not isinstance(f, str) or not f]
    if bad:
        raise RecipeError(f"@fxpass on {name!r}: facts must be non-empty strings, got {bad!r}")
    return frozenset(facts)


@dataclass(frozen=True)
class Step:
    """One named line of a pipeline: an @fxpass function and the config it is called with."""

    fn: Callable
    cfg: Any = None
    name: str | None = None

    def __post_init__(self):
        if not isinstance(getattr(self.fn, "fxpass", None), PassInfo):
            raise RecipeError(
                f"step {self.name or getattr(self.fn, '__name__', self.fn)!r} is not an @fxpass function; "
                "decorate it with @fxpass(requires=..., provides=..., invalidates=...)"
            )
        if self.name is None:
            object.__setattr__(self, "name", self.fn.fxpass.name)

    @property
    def info(self) -> PassInfo:
        return self.fn.fxpass


@dataclass(frozen=True)
class DumpSnapshot:
    """What the Pipeline hands its dumper: the step's position (0 = the input, before any pass), its
    name, its PassResult (None for the input), its log lines (the summary, then one per Change) and
    the graph as it stands after the step, re-captured if the step left it stale."""

    index: int
    step: str
    cg: CapturedGraph
    result: PassResult | None = None
    lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineResult:
    """The final graph and structure, each step's PassResult by name, the facts now true, the log,
    and the seconds each pass took (its own work, not the checks after it)."""

    cg: CapturedGraph
    structure: Any
    results: dict[str, PassResult]
    facts: frozenset[str]
    log: tuple[str, ...]
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return "\n".join(self.log)


def check_order(steps, facts=()) -> None:
    """Raise RecipeError when a step requires a fact that no earlier step (or `facts`) makes true."""
    facts, provider, invalidator = set(facts), {}, {}
    for index, step in enumerate(steps):
        missing = sorted(step.info.requires - facts)
        if missing:
            why = _why_missing(missing[0], step, steps[index + 1:], provider, invalidator)
            raise RecipeError(f"step {step.name!r} requires fact {missing[0]!r}, but {why}")
        for fact in step.info.invalidates - step.info.provides:
            facts.discard(fact)
            invalidator[fact] = step.name
        facts |= step.info.provides
        provider.update(dict.fromkeys(step.info.provides, step.name))


def _why_missing(fact, step, later, provider, invalidator) -> str:
    if fact in invalidator:
        source = f"step {provider[fact]!r} provided it and " if fact in provider else ""
        return (f"{source}step {invalidator[fact]!r} then invalidated it; "
                f"move {step.name!r} before {invalidator[fact]!r} or re-provide {fact!r} after it")
    fixers = [s.name for s in later if fact in s.info.provides]
    if fixers:
        return f"no earlier step provides it; step {fixers[0]!r} does: move it before {step.name!r}"
    return f"no step in this pipeline provides it; add a pass that provides {fact!r} or drop {step.name!r}"


def _after(done) -> str:
    if done is None:
        return "checked before any pass ran"
    return f"after [{', '.join(done)}]" if done else "as the first pass"


@contextmanager
def _blame(name: str, done, what: str = "failed"):
    """Name the pass (and the passes before it) in any error raised inside the block."""
    try:
        yield
    except FxquantError as exc:
        if f"'{name}'" not in str(exc):
            exc.args = (f"pass {name!r} ({_after(done)}): {exc.args[0] if exc.args else ''}", *exc.args[1:])
        raise
    except Exception as exc:  # any bug inside a pass becomes one PassError that names it
        raise PassError(f"pass {name!r} {what} {_after(done)}: {type(exc).__name__}: {exc}") from exc


def _default_analyse(cg):
    from fxquant.analysis import analyse  # analysis is a later room: imported only when used

    return analyse(cg)


@dataclass
class _State:
    """What changes as the pipeline runs (private; the result is a frozen PipelineResult)."""

    cg: CapturedGraph
    structure: Any
    facts: set[str]
    inputs: tuple | None
    reference: Any = None
    stale: bool = False  # the graph no longer matches the model: re-capture before it is read
    signature: tuple = ()  # the graph before the running pass: lint and recompile only what changed
    atol: float = 0.0  # the absolute tolerance in force (fixed, or relative to the first reference)
    done: list[str] = field(default_factory=list)
    results: dict[str, PassResult] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of passes plus the checks run between them.

    `verify_inputs` is `(args, kwargs)` (or True for `cg.example_inputs`) to check after each pass
    that the float outputs match those before the first pass, within `atol` (or `rel_atol` times
    the largest reference output) + `rtol`. `dumper` is called with a `DumpSnapshot` of the input
    and after each step (`fxquant.viz.TextDumper(dir)` writes `NN_<step>.txt` graph dumps).
    `analyse` and `capture` default to fxquant's own.
    A pass that changed nothing invalidates nothing; a re-capture is deferred until a later pass
    (or a dump) reads the graph, and `final_capture=False` skips the last one when only the model
    matters (it is then `result.cg` that is stale: call `capture(model)` to see the final graph).

    Example::

        result = Pipeline([Step(fold_norms), Step(rotate_residual, RotationConfig())],
                          verify_inputs=True).run(capture(model))
        # log: "fold_norms: 5 folded, 0 blocked" / "rotate_residual: 33 rotated, 0 blocked"
    """

    steps: tuple[Step, ...]
    analyse: Callable | None = None
    capture: Callable | None = None
    verify_inputs: Any = None
    atol: float = 1e-4
    rel_atol: float | None = None  # when set, atol = rel_atol * max |reference output|
    rtol: float = 1e-4
    dumper: Callable | None = None  # called with a DumpSnapshot of the input and after each step
    log: logging.Logger | None = LOGGER
    final_capture: bool = True
    progress: bool = False  # a tqdm bar over the steps (on stderr), for long runs on real models
    calibration: tuple = ()  # model-input dicts the calibrated passes sweep (cg.context.calibration)

    def __post_init__(self):
        steps = tuple(s if isinstance(s, Step) else Step(s) for s in self.steps)
        names = [s.name for s in steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RecipeError(f"pipeline has several steps named {dupes}; give each a distinct Step(name=...)")
        object.__setattr__(self, "steps", steps)

    def run(self, cg: CapturedGraph, facts=()) -> PipelineResult:
        """Run every step on `cg` (whose model is edited in place); `facts` are already true of it."""
        check_order(self.steps, facts)
        cg.context = RunContext(tuple(self.calibration), self.progress, self.steps)  # what passes read besides the graph
        inputs = self._inputs(cg)
        state = _State(cg, (self.analyse or _default_analyse)(cg), set(facts), inputs)
        for step in self.steps:
            if step.info.check is not None:
                with _blame(step.name, None, "failed its check"):
                    step.info.check(cg, state.structure, step.cfg)
        if inputs is not None:
            state.reference = model_outputs(cg.model, inputs)
            state.atol = self.atol if self.rel_atol is None else self.rel_atol * state.reference.abs().max().item()
        self._dump(state, 0, "input")
        bar = tqdm(total=len(self.steps), desc="passes", unit="pass", disable=not self.progress, leave=False)
        for index, step in enumerate(self.steps, start=1):
            bar.set_postfix_str(step.name)
            self._refresh(state)
            start, state.signature = time.perf_counter(), _signature(state.cg.gm.graph)
            with _blame(step.name, state.done):
                result = step.fn(state.cg, state.structure, step.cfg)
            if not isinstance(result, PassResult):
                raise PassError(f"pass {step.name!r} returned {type(result).__name__}, not a PassResult")
            state.seconds[step.name] = time.perf_counter() - start
            self._settle(step, result, state)
            self._report(index, step, result, state)
            bar.update()
        bar.close()
        if self.final_capture:
            self._refresh(state)
        return PipelineResult(state.cg, state.structure, state.results, frozenset(state.facts), tuple(state.log),
                              dict(state.seconds))

    def _inputs(self, cg):
        if self.verify_inputs is None or self.verify_inputs is False:
            return None
        if self.verify_inputs is True and not cg.example_inputs:
            raise RecipeError("verify_inputs=True needs cg.example_inputs; pass verify_inputs=(args, kwargs)")
        return as_inputs(cg.example_inputs if self.verify_inputs is True else self.verify_inputs)

    def _settle(self, step: Step, result: PassResult, state: _State) -> None:
        """Re-capture / re-analyse as the pass declared, lint and recompile, then verify outputs."""
        gone = (step.info.invalidates | result.invalidates) if result.modified else frozenset()
        with _blame(step.name, state.done, "left a graph the pipeline could not rebuild or lint"):
            state.stale = state.stale or GRAPH in gone
            if _signature(state.cg.gm.graph) != state.signature:  # the pass edited the graph itself
                state.cg.gm.graph.lint()
                state.cg.gm.recompile()
            if STRUCTURE in gone and not state.stale:
                state.structure = (self.analyse or _default_analyse)(state.cg)
        if state.inputs is not None and result.modified:  # a pass that changed nothing cannot move outputs
            with _blame(step.name, state.done, "left a model that verification could not run"):
                self._verify(step, state)
        state.facts = (state.facts - gone) | step.info.provides
        state.results[step.name] = result

    def _refresh(self, state: _State) -> None:
        """Re-capture and re-analyse a graph a pass left stale, blaming that pass on failure."""
        if not state.stale:
            return
        with _blame(state.done[-1], state.done[:-1], "left a model the pipeline could not re-capture"):
            state.cg = self._recapture(state.cg)
            state.structure = (self.analyse or _default_analyse)(state.cg)
        state.stale = False

    def _recapture(self, cg: CapturedGraph) -> CapturedGraph:
        return recapture(cg, capture=self.capture or capture_model)

    def _verify(self, step: Step, state: _State) -> None:
        """Raise PassError when the pass left non-finite weights or changed the float outputs."""
        model, where = state.cg.model, _after(state.done)
        bad = finite_weights(model)
        if bad:
            raise PassError(f"pass {step.name!r} ({where}) left non-finite weights: {bad[:5]}")
        if OUTPUTS in step.info.invalidates:
            state.reference = model_outputs(model, state.inputs)
            return
        ok, err = outputs_unchanged(model, state.inputs, state.reference, state.atol, self.rtol)
        if not ok:
            raise PassError(
                f"pass {step.name!r} ({where}) changed the float outputs: max abs error {err:.3g} "
                f"(atol={state.atol:.3g}, rtol={self.rtol}). A transform must keep the model's function: check "
                f"its math, or declare invalidates={{'{OUTPUTS}'}} if the change is intended (quantization)."
            )

    def _report(self, index: int, step: Step, result: PassResult, state: _State) -> None:
        line = f"{step.name}: {result.summary()}"
        state.log.append(line)
        if self.log is not None:
            self.log.info(line)
            for change in result.changes:
                self.log.debug("  %s", change)
        self._dump(state, index, step.name, result, (line, *map(str, result.changes)))
        state.done.append(step.name)

    def _dump(self, state: _State, index: int, name: str, result: PassResult | None = None, lines=()) -> None:
        """Hand the dumper a snapshot, re-capturing first when a pass left the graph stale."""
        if self.dumper is None:
            return
        self._refresh(state)
        self.dumper(DumpSnapshot(index, name, state.cg, result, tuple(lines)))


def recapture(cg: CapturedGraph, model=None, capture=capture_model) -> CapturedGraph:
    """A fresh capture of `model` (default: cg's own) on cg's example inputs, sharing cg's run context
    (a pass that builds a training copy of the model captures it this way)."""
    model = cg.model if model is None else model
    args, kwargs = as_inputs(cg.example_inputs) if cg.example_inputs else ((), {})
    example = _capture_inputs(model, args, kwargs) if (args or kwargs) else None
    fresh = capture(model, example)
    fresh.context = cg.context
    return fresh


def _signature(graph) -> tuple:
    """Each node's (name, op, target, args, kwargs): equal before and after = the graph was not edited."""
    return tuple((n.name, n.op, n.target, n.args, tuple(n.kwargs.items())) for n in graph.nodes)


def _capture_inputs(model, args, kwargs):
    """(args, kwargs) -> what capture() takes: the args alone, or one dict once keywords are present."""
    if not kwargs:
        return tuple(args)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    return {**dict(zip(names, args)), **kwargs}
