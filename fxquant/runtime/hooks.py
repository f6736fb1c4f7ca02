"""Forward pre-hooks that run fxquant's ops on a layer's input at inference.

Entry points: `OnlineHadamard` (R4: x -> fxquant::hadamard(x)), `InputScale` (an equalization scale
no weight could absorb: x -> x * s), `ActivationFakeQuant` (x -> fxquant::fake_quant(x) per token), `AbsorbedActivationQuant` (one a
packed layer runs itself),
and `hooks_of(model, kind)` to list what is installed (installing them is transform work:
`fxquant.install`). The one idea: a hook
lives on the model itself, so `generate()`, the KV cache and a re-capture all see it (torch.export
records its op as a graph node); nothing in the graph is patched by hand.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.runtime.library import fake_quant, hadamard

INPUT_SCALE = "fxquant_input_scale"  # the parameter an InputScale hook reads, saved with the weights


def _floating_input(args: tuple) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()


@dataclass(frozen=True)
class OnlineHadamard:
    """Forward pre-hook: the layer's first input x -> fxquant::hadamard(x)."""

    def __call__(self, module: torch.nn.Module, args: tuple):
        return (hadamard(args[0]), *args[1:]) if _floating_input(args) else None


@dataclass(frozen=True)
class InputScale:
    """Forward pre-hook: the layer's first input x -> x * module.fxquant_input_scale (per channel).

    An equalization scale whose inverse no neighbouring weight can absorb (a GELU MLP, an online
    Hadamard before the layer) runs as this explicit multiply, one `aten.mul` node in a re-capture.
    """

    def __call__(self, module: torch.nn.Module, args: tuple):
        if not _floating_input(args):
            return None
        return (args[0] * getattr(module, INPUT_SCALE).to(args[0].dtype), *args[1:])


@dataclass(frozen=True)
class ActivationFakeQuant:
    """Forward pre-hook: x -> fxquant::fake_quant(x) over the last dim (per token), symmetric or not."""

    bits: int = 8
    symmetric: bool = True
    clip_ratio: float = 1.0

    def __call__(self, module: torch.nn.Module, args: tuple):
        if not _floating_input(args):
            return None
        return (fake_quant(args[0], self.bits, self.symmetric, self.clip_ratio), *args[1:])


@dataclass(frozen=True)
class AbsorbedActivationQuant(ActivationFakeQuant):
    """The activation quantizer of a packed layer that quantizes its input itself (its product is the
    exact integer product of the codes: `QuantizedLinear.act`): the hook stands aside, lists and
    saves as the quantizer it is."""

    def __call__(self, module, args):
        return None


HOOK_TYPES = {cls.__name__: cls for cls in (OnlineHadamard, InputScale, ActivationFakeQuant)}


def hooks_of(model: torch.nn.Module, kind: type) -> dict[str, object]:
    """Module path -> the (first) hook of type `kind` installed on that module's input."""
    found = {}
    for name, module in model.named_modules():
        hook = next((h for h in module._forward_pre_hooks.values() if isinstance(h, kind)), None)
        if hook is not None:
            found[name] = hook
    return found


def online_hooks(model: torch.nn.Module) -> list[str]:
    """Paths of the modules that carry an online Hadamard on their input."""
    return list(hooks_of(model, OnlineHadamard))


def input_scale_hooks(model: torch.nn.Module) -> list[str]:
    """Paths of the modules that carry an explicit input scale."""
    return list(hooks_of(model, InputScale))


def activation_hooks(model: torch.nn.Module) -> dict[str, ActivationFakeQuant]:
    """Module path -> the activation fake-quant hook installed on it."""
    return hooks_of(model, ActivationFakeQuant)


def remove_activation_hooks(module: torch.nn.Module) -> int:
    """Drop the activation fake-quant hooks of one module (a new config replaces them), and the
    quantizer a packed layer absorbed from one; how many."""
    keys = [k for k, hook in module._forward_pre_hooks.items() if isinstance(hook, ActivationFakeQuant)]
    for key in keys:
        del module._forward_pre_hooks[key]
    if isinstance(getattr(module, "act", None), ActivationFakeQuant):  # a QuantizedLinear's (other modules' act differ)
        module.act = None
    return len(keys)
