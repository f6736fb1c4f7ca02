"""Between-pass checks: did a transform keep the model's function, and are its weights finite?

Entry points: `outputs_unchanged(model, inputs, reference)` and `finite_weights(model)`; the Pipeline
calls both after each pass when given `verify_inputs`. The one idea: the model (not the graph) is
the source of truth, so verification runs the nn.Module itself on fixed inputs `(args, kwargs)`.
"""
from __future__ import annotations

import math

import torch


def as_inputs(inputs) -> tuple[tuple, dict]:
    """Normalise inputs to `(args, kwargs)`: accepts that pair, a tensor, a tuple of args or a dict."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2 and isinstance(inputs[1], dict):
        return tuple(inputs[0]), dict(inputs[1])
    return tuple(inputs), {}


def model_outputs(model: torch.nn.Module, inputs) -> torch.Tensor:
    """Run `model` without grad and return its main output: `.logits` for transformers, else the tensor."""
    args, kwargs = as_inputs(inputs)
    with torch.no_grad():
        out = model(*args, **kwargs)
    return main_tensor(out)


def main_tensor(out) -> torch.Tensor:
    """The main output tensor: the tensor itself, `.logits`, or the first item of a tuple (attention)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits", next(iter(out.values()), None))
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find an output tensor in {type(out).__name__}; return a tensor or .logits")
    return logits


def outputs_unchanged(model, inputs, reference: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4):
    """`(ok, max_abs_err)`: whether `model(inputs)` still matches `reference` within atol + rtol*|ref|."""
    out = model_outputs(model, inputs)
    if out.shape != reference.shape:
        return False, math.inf
    out, ref = out.detach().double().cpu(), reference.detach().double().cpu()
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    return bool(torch.allclose(out, ref, rtol=rtol, atol=atol)), err


def finite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the floating parameters and buffers holding NaN or inf (empty when all are finite)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    # a NaN or inf anywhere makes the sum non-finite: one cheap reduction per tensor, the exact test after
    suspects = [(name, t) for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t.sum()))]
    return [name for name, t in suspects if not bool(torch.isfinite(t).all())]
