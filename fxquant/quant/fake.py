"""Fake-quant of activations at run time: a forward pre-hook that rounds a layer's input per token.

Entry points: `ActivationFakeQuant` (the hook), `activation_hooks(model)` (what is installed).
The one idea: the hook lives on the model itself, so `generate()`, the KV cache and a re-capture all
see it (torch.export records its ops as graph nodes); nothing in the graph is patched by hand.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from fxquant.quant.numerics import fake_quantize

LINEAR_MODULES = (torch.nn.Linear, Conv1D)  # modules whose forward input is the linear's input


def input_is_hookable(module: torch.nn.Module, linears_in_module: int) -> bool:
    """A pre-hook on `module` sees exactly its linear's input: one linear, and the module is that linear."""
    return isinstance(module, LINEAR_MODULES) and linears_in_module == 1


@torch.library.custom_op("fxquant::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    """Round x to its nearest `bits`-bit value, one scale per row of the last dim (per token, per
    (token, head)); one named op for export and compile, whose numerics are fxquant.quant.numerics."""
    out = torch.empty_like(x)
    return out.copy_(fake_quantize(x, bits, symmetric, None, clip_ratio))


@fake_quant.register_fake
def _fake_quant_fake(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    return torch.empty_like(x)


def _fake_quant_backward(ctx, grad: torch.Tensor):
    """Straight-through estimator: rounding passes the gradient unchanged (what QAT trains through)."""
    return grad, None, None, None


fake_quant.register_autograd(_fake_quant_backward, setup_context=lambda ctx, inputs, output: None)


@dataclass(frozen=True)
class ActivationFakeQuant:
    """Forward pre-hook: x -> fxquant::fake_quant(x) over the last dim (per token), symmetric or not."""

    bits: int = 8
    symmetric: bool = True
    clip_ratio: float = 1.0

    def __call__(self, module: torch.nn.Module, args: tuple):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        return (fake_quant(args[0], self.bits, self.symmetric, self.clip_ratio), *args[1:])


def activation_hooks(model: torch.nn.Module) -> dict[str, ActivationFakeQuant]:
    """Module path -> the activation fake-quant hook installed on it."""
    found = {}
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, ActivationFakeQuant):
                found[name] = hook
    return found


def remove_activation_hooks(module: torch.nn.Module) -> int:
    """Drop the activation fake-quant hooks of one module (a new config replaces them); how many."""
    keys = [k for k, hook in module._forward_pre_hooks.items() if isinstance(hook, ActivationFakeQuant)]
    for key in keys:
        del module._forward_pre_hooks[key]
    return len(keys)
