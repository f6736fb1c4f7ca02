"""The torch.compile backend: `torch.compile(model, backend="fxquant", options={...})`.

Entry point: `fxquant_backend(gm, example_inputs, *, options=None, mode=None)`, registered once,
through the `torch_dynamo_backends` entry point in pyproject.toml (never `@register_backend`: torch
asserts on a duplicate name). For each graph dynamo hands over it:

    raise    the graph back into a module tree at the model's paths (weights, linears, hooks, SDPA)
    recipe   options["recipe"]: the recipe's passes on that tree's copies of the weights (the user's
             module is never edited); a recipe that needs calibration data is refused
    lower    packed linears, hooks and attention onto the kernels (fxquant.lowering.lower)
    inductor compile_fx, with `FxquantGraphPass` as the post-grad pass and `mode`'s options

The one idea: the backend runs the same passes and the same lowering as `fxquant.quantize` and
`fxquant.lower`, on a model rebuilt from the graph, instead of a second graph-level implementation.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import torch

from fxquant.api import apply_on_inputs
from fxquant.backend import reuse
from fxquant.backend.graph_pass import FxquantGraphPass, pending
from fxquant.backend.modules import output_linear, raise_graph
from fxquant.backend.report import CompileReport, collect, explain, publish
from fxquant.backend.scope import cache_refusal, check_scope
from fxquant.errors import CalibrationError, RecipeError, UnsupportedPatternError
from fxquant.lowering import PLANS, lower, lowering_report
from fxquant.recipes import load_recipe
from fxquant.runtime.kernels.define import inline_kernels

__all__ = ["fxquant_backend", "BackendOptions", "CompileReport", "collect", "explain"]
_GRAPHS = itertools.count()


@dataclass(frozen=True)
class BackendOptions:
    """`options=` of torch.compile: `recipe` (preset name, dict or file) applied at compile time,
    `lower` onto kernels, the lowering `plan` (fxquant.lowering.PLANS), `verify` the recipe's float
    passes on dynamo's example inputs, and inductor's `mode` (torch.compile refuses `mode=` beside
    `options=`, so with options the mode goes here)."""

    recipe: object = None
    lower: bool = True
    plan: str = "measure"
    verify: bool = True
    mode: str | None = None

    def __post_init__(self):
        if self.plan not in PLANS:
            raise RecipeError(f"backend option plan={self.plan!r} is not one of {list(PLANS)}")
        if self.recipe is not None:
            object.__setattr__(self, "recipe", load_recipe(self.recipe))

    @classmethod
    def parse(cls, options: dict | None) -> BackendOptions:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            raise RecipeError(f"torch.compile(backend='fxquant') options {unknown} are not among {known}")
        return cls(**(options or {}))


def fxquant_backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None,
                    mode: str | None = None):
    """Compile one dynamo graph: raise, apply the recipe, lower, then inductor (see the module doc)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    opts = BackendOptions.parse(options)
    mode = mode or opts.mode
    raised = raise_graph(gm, example_inputs, clone=opts.recipe is not None)
    inputs = tuple(example_inputs[i] for i in raised.user_positions)
    graph, key = next(_GRAPHS), repr((opts.recipe, opts.lower, opts.plan, opts.verify))
    done = reuse.find(key, raised)
    if done is not None:  # a decode graph after its prefill graph: the same recipe, lowered once
        reuse.transplant(raised, done[0])
        recipe_log = (f"the recipe's and lowering's result of graph {done[1]} (the same weights and options), reused",)
    else:
        recipe_log = _apply(raised.module, opts, _concrete(inputs)) if opts.recipe is not None else ()
        if opts.lower:
            lower(raised.module, plan=opts.plan, output_layer=output_linear(raised.module))
        reuse.remember(key, raised, graph)
    lowering = lowering_report(raised.module).summary() if opts.lower else ""
    graph_pass = FxquantGraphPass({"lower": opts.lower})
    patches = {**(list_mode_options(mode) if mode else {}), "post_grad_custom_pre_pass": graph_pass if opts.lower else None}
    with inline_kernels():  # inductor sees each kernel's aten ops: no Python custom op per call
        compiled = compile_fx(raised.module, list(inputs), config_patches=patches)
    publish(CompileReport(graph, len(example_inputs) - len(inputs), raised.linears, raised.attentions,
                          recipe_log, lowering, dict(pending(raised.module.graph)) if opts.lower else {},
                          dict(graph_pass.counts), raised.left))
    return _UserInputs(compiled, raised)


def _apply(module, opts: BackendOptions, inputs: tuple) -> tuple[str, ...]:
    """The recipe on the raised tree (its own copies of the weights), refused when it needs
    calibration data or more of the model than this graph holds (a graph break, a KV cache)."""
    check_scope(module, opts.recipe, inputs)
    try:
        result = apply_on_inputs(module, opts.recipe, inputs, verify=opts.verify)
    except UnsupportedPatternError as exc:
        refusal = cache_refusal(module, opts.recipe, inputs, exc)
        if refusal is None:
            raise
        raise refusal from exc
    except CalibrationError as exc:
        raise RecipeError(
            f"recipe {opts.recipe.name!r} measures activations on calibration data, and the compile backend never "
            f"calibrates on dynamo's example inputs: run fxquant.quantize(model, {opts.recipe.name!r}, "
            f"calibration=...) first, then torch.compile(model, backend='fxquant'). ({exc})") from exc
    return result.log


def _concrete(inputs: tuple) -> tuple:
    """Dynamo's inputs with each symbolic size (a dynamic-shape graph) as the value it has now:
    what capturing the raised tree for the recipe needs (the compiled graph stays dynamic)."""
    return tuple(int(x.node.hint) if isinstance(x, torch.SymInt) else x for x in inputs)


class _UserInputs:
    """The compiled tree, called with dynamo's inputs: the weights it owns are dropped from them.
    It keeps the raised tree alive, so a later graph of the same model can reuse it."""

    def __init__(self, compiled, raised):
        self.compiled, self.positions, self.tree = compiled, raised.user_positions, raised.module

    def __call__(self, *args):
        return self.compiled(*(args[i] for i in self.positions))
