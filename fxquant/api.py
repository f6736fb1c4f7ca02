"""The public entry point: `quantize(model, recipe, calibration=None) -> model`.

The same model object comes back, transformed in place (a Hugging Face model keeps `generate()`
and its KV cache; `fxquant.save` / `fxquant.load` round-trip it with its online ops and quantizers). The one idea: decide before doing, and undo on failure. The
recipe and calibration data are validated before capture; passes refuse before they edit; and if
anything still fails mid-way, every parameter, submodule and hook is restored, so an error leaves
the model exactly as it was. Float-preserving passes are verified on the capture's example inputs
(max |diff| <= tolerance * max |logit|): random token ids for a transformers causal LM, the first
calibration sequence for a plain PyTorch model (whose forward takes `input_ids`).

Example::

    model = fxquant.quantize(model, "rotate-r1r2")            # same function, rotated weights
    model = fxquant.quantize(model, {"preset": "w4a16", "group_size": 64})
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from fxquant.calibration import calibration_batches, token_count
from fxquant.capture import capture, is_causal_lm
from fxquant.errors import RecipeError
from fxquant.pipeline import Pipeline, PipelineResult
from fxquant.quant import records
from fxquant.runtime.linear import QuantizedLinear
from fxquant.recipes import load_recipe
from fxquant.viz.dump import Dumpers, TextDumper
from fxquant.viz.html import HtmlDumper

TOLERANCE = 2e-4  # float passes: max |diff| <= TOLERANCE * max |logit| on the example inputs (float32)
INITIAL_FACTS = frozenset({"weights_float"})  # what every model is before a recipe: folds require it


def quantize(model: torch.nn.Module, recipe, calibration=None, *, verify: bool = True,
             rollback: bool = True, dump_dir: str | os.PathLike | None = None) -> torch.nn.Module:
    """Apply `recipe` (preset name, dict, TOML/YAML path) to `model` in place and return it.

    `calibration`: token ids ([n, seq] or a list of them), input dicts, or text with a tokenizer, as
    `fxquant.Calibration(data, batch_size=, tokenizer=, seq_len=, windows=)` says; however it is
    batched, the passes see the same sequences in batches of `batch_size` (default 1), so their
    result and cost do not depend on the batching (fxquant.calibration).
    `rollback=False` skips the snapshot (a host-memory copy of every weight) that restores the
    model when a pass fails: for models too large to copy, at the price of a half-edited model on error.
    `dump_dir` (or env FXQUANT_DUMP) receives `NN_<step>.txt` graph dumps, the input and one per pass;
    a path ending in `.html` receives one HTML page with the graph before and after every pass.
    """
    _apply(model, recipe, calibration, _Run(verify, rollback, dump_dir=dump_dir))
    return model


def apply_recipe(model, recipe, calibration=None, *, verify: bool = True, rollback: bool = True,
                 progress: bool = False) -> PipelineResult:
    """`quantize`, returning the PipelineResult (per-pass changes and the log) instead of the model;
    `progress` shows a bar over the passes on stderr; env FXQUANT_DUMP=dir writes the graph dumps."""
    return _apply(model, recipe, calibration, _Run(verify, rollback, progress))


def apply_on_inputs(model, recipe, example_inputs: tuple, *, verify: bool = True) -> PipelineResult:
    """`apply_recipe` without calibration data or a snapshot, the model captured and its float passes
    verified on `example_inputs`: what the compile backend runs on the copy of a graph's weights it owns."""
    return _apply(model, recipe, None, _Run(verify, rollback=False, example_inputs=example_inputs))


@dataclasses.dataclass(frozen=True)
class _Run:
    """How a recipe is applied, beside what: verify float passes, snapshot to roll back, show a bar, dump."""

    verify: bool = True
    rollback: bool = True
    progress: bool = False
    dump_dir: str | os.PathLike | None = None
    example_inputs: tuple | None = None

    def dumper(self, recipe=None):
        """Where `dump_dir` (else env FXQUANT_DUMP) points: a `.html` path gets the one-page HTML dump
        (titled with the model and the name of `recipe`, a Recipe), a directory the text dumps `NN_<step>.txt`, plus
        `dump.html` when env FXQUANT_DUMP_FORMAT=both (`html`: the page alone); none without either."""
        target = self.dump_dir or os.environ.get("FXQUANT_DUMP")
        if not target:
            return None
        name = recipe.name if recipe else None  # the name only: the pass chain is the page's step list
        if str(target).endswith(".html"):
            return HtmlDumper(target, recipe=name)
        form = os.environ.get("FXQUANT_DUMP_FORMAT", "text")
        if form not in ("text", "html", "both"):
            raise RecipeError(f"FXQUANT_DUMP_FORMAT={form!r} is not one of ['text', 'html', 'both']")
        page = HtmlDumper(os.path.join(target, "dump.html"), recipe=name)
        return {"text": TextDumper(target), "html": page, "both": Dumpers((TextDumper(target), page))}[form]


def _apply(model, recipe, calibration, run: _Run) -> PipelineResult:
    """The one body of `quantize` and `apply_recipe`: validate, snapshot, capture, run, roll back on failure."""
    recipe = load_recipe(recipe)
    packed = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if packed:
        raise RecipeError(f"layer '{packed[0]}' is already packed as integer codes (QuantizedLinear), so no pass "
                          "can edit its weight: apply recipes to the float model")
    batches = calibration_batches(calibration)
    snapshot = _Snapshot(model) if run.rollback else None
    try:
        start = time.perf_counter()
        cg = capture(model, _example(model, batches, run.example_inputs))
        pipeline = Pipeline(recipe.pipeline_steps(), verify_inputs=True if run.verify else None,
                            rel_atol=tolerance(model), rtol=0.0, final_capture=False, progress=run.progress,
                            calibration=tuple(batches), dumper=run.dumper(recipe))
        result = pipeline.run(cg, facts=INITIAL_FACTS)
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    seconds = time.perf_counter() - start
    lines = [f"{line}  [{result.seconds[name]:.2f} s]" for name, line in zip(result.seconds, result.log)]
    data = f"; calibration data given: {token_count(batches)} tokens in {len(batches)} batches" if batches else ""
    log = (f"recipe {recipe}", *lines, f"applied in {seconds:.1f} s (capture {cg.capture_seconds:.1f} s, "
                                       f"passes {sum(result.seconds.values()):.1f} s, the rest: re-captures, analysis, "
                                       f"checks){data}")
    return dataclasses.replace(result, log=log)


def tolerance(model: torch.nn.Module) -> float:
    """Relative output tolerance of a float pass: TOLERANCE, or a few roundings of the weights' dtype
    (bfloat16 rounds at 4e-3, so a rotated bf16 model cannot match to 2e-4)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return max(TOLERANCE, 4 * torch.finfo(dtype).eps)


def _example(model, batches: list[dict], given):
    """What a model is captured with: given inputs, else default token ids for a transformers causal
    LM, else the first calibration sequence."""
    if given is not None:
        return given
    return None if is_causal_lm(model) or not batches else _first_row(batches[0])


def _first_row(batch: dict) -> dict:
    """One sequence of a calibration batch: the example a plain PyTorch model is captured with."""
    return {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}


def _slots(module: torch.nn.Module) -> tuple[str, ...]:
    """The dicts a pass may add to: submodules, parameters, buffers and every kind of hook (forward
    pre/post with and without kwargs, backward, state-dict: all the `_*hooks*` dicts torch keeps)."""
    hooks = tuple(k for k, v in vars(module).items() if "hooks" in k and isinstance(v, dict))
    return ("_modules", "_parameters", "_buffers", *hooks)


class _Snapshot:
    """Every submodule, parameter (and its values), buffer and hook of a model, to restore."""

    def __init__(self, model: torch.nn.Module):
        self.saved = [(m, {slot: dict(getattr(m, slot)) for slot in _slots(m)}) for m in model.modules()]
        tensors = [t for _, slots in self.saved for slot in ("_parameters", "_buffers")
                   for t in slots[slot].values() if t is not None]
        self.values = {id(t): (t, t.detach().to("cpu", copy=True)) for t in tensors}  # host copy: spares GPU memory
        self.attributes = [(m, set(vars(m))) for m, _ in self.saved]  # plain attributes a pass may add
        config = getattr(model, "config", None)
        self.config = (config, dict(vars(config))) if config is not None else None
        self.records = records.snapshot(m for m, _ in self.saved)  # codes recorded by quantize steps

    @torch.no_grad()
    def restore(self) -> None:
        for module, slots in self.saved:
            for slot, entries in slots.items():
                getattr(module, slot).clear()
                getattr(module, slot).update(entries)
        for tensor, value in self.values.values():
            tensor.copy_(value)
        for module, names in self.attributes:
            for name in set(vars(module)) - names:
                delattr(module, name)
        if self.config is not None:
            vars(self.config[0]).clear()
            vars(self.config[0]).update(self.config[1])
        records.restore(self.records)
