"""Refusing what one graph cannot hold: a recipe on part of a model, or on attention that reads a KV cache.

Entry point: `check_scope(module, recipe, inputs)`. The one idea: dynamo hands the backend one graph
per stretch between graph breaks, and each is compiled alone. R1 edits the embedding, every writer
and every reader of the residual stream together; done on the stretch before a break and not on the
stretch after it, the model would be silently wrong. So before any pass runs, a recipe with a
whole-stream pass is refused unless this graph starts the stream at the embedding and keeps it inside.
Likewise a graph whose attention reads a KV cache cannot show what wrote the cached keys and
values, so a recipe with a pass through attention (R2, R3, the KV quantizer) is refused there before
it runs (analysis would only leave those places out), and `cache_refusal` says the same when the
analysis refuses such a graph: quantize first, then compile, to generate.
"""
from __future__ import annotations

import torch

from fxquant.analysis.dataflow import trace_views_back
from fxquant.analysis.norms import find_norms
from fxquant.analysis.stream import find_residual_stream
from fxquant.capture import capture
from fxquant.errors import RecipeError
from fxquant.ops import OpClass, attention_value, classify

WHOLE_STREAM = frozenset({"residual_rotated"})  # facts of passes that edit the whole residual stream
THROUGH_ATTENTION = frozenset({"values_rotated", "online_r3", "kv_quantized"})  # passes that act inside attention


def check_scope(module, recipe, inputs: tuple) -> None:
    """Raise RecipeError when `recipe` has a whole-stream pass and this graph holds only part of the stream."""
    steps = [s.name for s in recipe.pipeline_steps() if s.info.provides & WHOLE_STREAM]
    inside = [s.name for s in recipe.pipeline_steps() if s.info.provides & THROUGH_ATTENTION]
    cg = capture(module, inputs) if steps or inside else None
    cache = cache_reason(cg) if inside else None
    if cache is not None:
        raise _cached(recipe, cache, f"pass '{inside[0]}' works inside attention")
    reason = split_reason(cg) if steps else None
    if reason is not None:
        raise RecipeError(
            f"recipe {recipe.name!r}: pass '{steps[0]}' (R1) rotates the whole residual stream, but {reason}, "
            "so dynamo split the model (a graph break) and R1 could only be half-applied; nothing was changed. "
            "Remove the graph break (TORCH_LOGS=graph_breaks shows where it is), or run "
            f"fxquant.quantize(model, {recipe.name!r}) first and compile the quantized model")


def cache_refusal(module, recipe, inputs: tuple, exc: Exception) -> RecipeError | None:
    """The refusal to raise instead of the analysis's `exc` when this graph's attention reads a KV
    cache (what the analysis could not prove is then the cache), or None."""
    cache = cache_reason(capture(module, inputs))
    return None if cache is None else _cached(recipe, cache, f"the analysis said: {str(exc).splitlines()[0]}")


def _cached(recipe, cache: str, why: str) -> RecipeError:
    return RecipeError(
        f"recipe {recipe.name!r} at compile time: {cache}, and one graph cannot show what wrote the cache, so no "
        "rotation through attention can be proven; nothing of your model was changed. Call the model with "
        f"use_cache=False, or run fxquant.quantize(model, {recipe.name!r}) first and compile the quantized model "
        f"(generate() works there); {why}")


def cache_reason(cg) -> str | None:
    """Which attention reads keys or values concatenated onto others (a KV cache: a graph input, or at
    the first step the empty tensor transformers starts a cache with), or None."""
    for node in cg.graph.nodes:
        if classify(node) is not OpClass.ATTENTION:
            continue
        for operand in (node.args[1], attention_value(node)):  # SDPA's k and v; eager attention's v
            producer, _ = trace_views_back(operand)
            if producer.target is torch.ops.aten.cat.default:
                return f"attention '{cg.module_of(node)}' reads a KV cache ('{producer.name}' joins past and new tokens)"
    return None


def split_reason(cg) -> str | None:
    """Why this graph holds only part of the residual stream, or None when it holds all of it."""
    norms, _ = find_norms(cg)
    stream, _, nodes = find_residual_stream(cg, norms)
    if not stream.sources:
        return "this graph has no token embedding (it starts after a graph break)"
    for node in nodes:
        if any(user.op == "output" for user in node.users):
            where = cg.module_of(node) or "the top level"
            return f"the stream leaves this graph at node '{node.name}' (in '{where}')"
    return None
