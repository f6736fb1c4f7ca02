"""Online transforms: rotations that cannot be folded into a weight run as an op at inference.

Entry points: the custom op `torch.ops.fxquant.hadamard` (normalized Hadamard transform over the
last dim, x @ H^T / sqrt(n)) and `OnlineHadamard`, a forward pre-hook that applies it to a layer's
input. The one idea: the op is registered with `torch.library` and a fake implementation, so
eager runs, `torch.export` and `torch.compile` all see one named node (`fxquant.hadamard`) whose
reference implementation is the library's fast transform (a Triton kernel replaces it later).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.hadamard import hadamard_transform


@torch.library.custom_op("fxquant::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x @ H^T / sqrt(n) over the last dim (n = m * 2^k from fxquant.hadamard), laid out like x."""
    out = torch.empty_like(x)  # q and k arrive as transposed views: keep their strides, as the fake does
    return out.copy_(hadamard_transform(x))


@hadamard.register_fake
def _hadamard_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@dataclass(frozen=True)
class OnlineHadamard:
    """Forward pre-hook: the layer's first input x -> fxquant::hadamard(x)."""

    def __call__(self, module: torch.nn.Module, args: tuple):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        return (torch.ops.fxquant.hadamard(args[0]), *args[1:])


def online_hooks(model: torch.nn.Module) -> list[str]:
    """Paths of the modules that carry an online Hadamard on their input."""
    return [name for name, m in model.named_modules()
            if any(isinstance(h, OnlineHadamard) for h in m._forward_pre_hooks.values())]


INPUT_SCALE = "fxquant_input_scale"  # the parameter an InputScale hook reads, saved with the weights


@dataclass(frozen=True)
class InputScale:
    """Forward pre-hook: the layer's first input x -> x * module.fxquant_input_scale (per channel).

    An equalization scale whose inverse no neighbouring weight can absorb (a GELU MLP, an online
    Hadamard before the layer) runs as this explicit multiply, one `aten.mul` node in a re-capture.
    """

    def __call__(self, module: torch.nn.Module, args: tuple):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        return (args[0] * getattr(module, INPUT_SCALE).to(args[0].dtype), *args[1:])


def install_input_scale(module: torch.nn.Module, scale: torch.Tensor) -> None:
    """Multiply `module`'s input by `scale` before anything else its pre-hooks do (composes with an
    existing input scale: the two multiply)."""
    existing = getattr(module, INPUT_SCALE, None)
    if existing is not None:
        existing.data = existing.data * scale.to(existing.dtype)
        return
    weight = next(module.parameters())
    module.register_parameter(INPUT_SCALE, torch.nn.Parameter(scale.to(weight.dtype).clone(), requires_grad=False))
    module.register_forward_pre_hook(InputScale(), prepend=True)


def input_scale_hooks(model: torch.nn.Module) -> list[str]:
    """Paths of the modules that carry an explicit input scale."""
    return [name for name, m in model.named_modules()
            if any(isinstance(h, InputScale) for h in m._forward_pre_hooks.values())]
