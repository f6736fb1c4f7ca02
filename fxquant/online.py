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
