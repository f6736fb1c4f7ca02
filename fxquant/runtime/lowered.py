"""What a lowered model runs: packed layers on kernels, and the hooks and attention on fast ops.

Entry points: `LoweredLinear` (a `QuantizedLinear` that dispatches on the token count M between a
decode kernel and a prefill kernel), `FastOnlineHadamard`, `FastActivationQuant`,
`FastHadamardQuant` (R4 and the activation quantizer fused), `FastAttentionTransform`, and `DecodeLinear` (a float
linear decoding on a faster kernel: `GemvLinear`, `Bf16Linear`). The one
idea: every lowered object is a subclass of the portable one it replaces and keeps its state, so
`hooks_of`, `save` and a re-capture see what they always saw; a saved lowered model is the packed
model (a model lowered on CPU loads and lowers on GPU). Kernel layouts are non-persistent buffers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fxquant.runtime.attention import AttentionTransform, quantize_kv
from fxquant.runtime.hooks import ActivationFakeQuant, OnlineHadamard, _floating_input
from fxquant.runtime.kernels.float_gemv import float_gemv, gemv_refusal
from fxquant.runtime.kernels.hadamard import fast_hadamard
from fxquant.runtime.kernels.linear import KERNELS
from fxquant.runtime.kernels.quantize import fast_fake_quant, fast_hadamard_fake_quant
from fxquant.runtime.linear import QuantizedLinear


@dataclass(frozen=True)
class LinearPlan:
    """Which kernel runs a layer: `decode` for M <= `max_decode_m` tokens, `prefill` above."""

    decode: str
    prefill: str
    max_decode_m: int
    why: str = ""  # how the plan was chosen (measured, or the rule used)


class LoweredLinear(QuantizedLinear):
    """A packed linear on kernels: the portable codes stay (they are what `save` writes and what the
    reference reads), each planned kernel's layout is added once as non-persistent buffers."""

    @classmethod
    def lower(cls, layer: QuantizedLinear, plan: LinearPlan, act: ActivationFakeQuant | None = None) -> LoweredLinear:
        """The lowered twin of `layer`, sharing its buffers, with the plan's kernel layouts built;
        `act`: the input quantizer it runs (default: the one `layer` absorbed, if any)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.act = act if act is not None else getattr(layer, "act", None)
        new.in_features, new.out_features, new.fmt, new.transposed = (
            layer.in_features, layer.out_features, layer.fmt, layer.transposed)
        for name in ("codes", "scale", "zero"):
            new.register_buffer(name, getattr(layer, name))
        new.bias = layer.bias
        new.plan, new.kernel_buffers = plan, {}
        for name in dict.fromkeys((plan.decode, plan.prefill)):
            buffers = KERNELS[name].prepare(new)
            new.kernel_buffers[name] = tuple(buffers)
            for key, tensor in buffers.items():
                new.register_buffer(f"{name}_{key}", tensor, persistent=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.numel() // self.in_features
        kernel = KERNELS[self.plan.decode if m <= self.plan.max_decode_m else self.plan.prefill]
        if self.act is not None and not kernel.quantizes_input:
            x = fast_fake_quant(x, self.act.bits, self.act.symmetric, self.act.clip_ratio)
        return kernel.run(self, x)

    def extra_repr(self) -> str:
        plan = self.plan
        act = f", int{self.act.bits} activations quantized inside" if self.act is not None else ""
        return (f"{super().extra_repr()}, decode={plan.decode} (M <= {plan.max_decode_m}), "
                f"prefill={plan.prefill}{act}")


@dataclass(frozen=True)
class FastOnlineHadamard(OnlineHadamard):
    """R4 on the fast Hadamard op (fxquant::fast_hadamard)."""

    def __call__(self, module, args):
        return (fast_hadamard(args[0]), *args[1:]) if _floating_input(args) else None


@dataclass(frozen=True)
class FastActivationQuant(ActivationFakeQuant):
    """The per-token activation quantizer on its fast op (bit-identical to fxquant::fake_quant)."""

    def __call__(self, module, args):
        if not _floating_input(args):
            return None
        return (fast_fake_quant(args[0], self.bits, self.symmetric, self.clip_ratio), *args[1:])


@dataclass(frozen=True)
class FastHadamardQuant(ActivationFakeQuant, OnlineHadamard):
    """An online Hadamard and the activation quantizer after it, in one op: one hook for the two it
    replaced (`portable()` gives them back, in order, for `save`)."""

    def __call__(self, module, args):
        if not _floating_input(args):
            return None
        return (fast_hadamard_fake_quant(args[0], self.bits, self.symmetric, self.clip_ratio), *args[1:])

    def portable(self) -> tuple:
        return OnlineHadamard(), ActivationFakeQuant(self.bits, self.symmetric, self.clip_ratio)


def portable_hooks(hook) -> tuple:
    """The portable hooks a (possibly lowered) hook stands for, as `save` records them."""
    if hasattr(hook, "portable"):
        return hook.portable()
    for base in (OnlineHadamard, ActivationFakeQuant):
        if type(hook) is not base and isinstance(hook, base):
            return (base(**dataclasses.asdict(hook)),)
    return (hook,)


@dataclass(frozen=True)
class FastAttentionTransform(AttentionTransform):
    """R3 and the KV-cache quantizer on the fast ops; the key's Hadamard and quantizer fused when
    whole rows of every position are quantized (no groups, no sinks)."""

    def write(self, key, value, start=0):
        if self.kv_bits is None:
            return (self.rotate(key) if self.rotate_qk else key), value
        if self.rotate_qk and self.kv_group_size is None and not self.kv_sink_tokens:
            key = fast_hadamard_fake_quant(key, self.kv_bits, self.kv_symmetric, self.kv_clip_ratio)
        else:
            key = quantize_kv(self.rotate(key) if self.rotate_qk else key, fast_fake_quant, self, start)
        return key, quantize_kv(value, fast_fake_quant, self, start)

    def rotate(self, x):
        return fast_hadamard(x)


class DecodeLinear(torch.nn.Linear):
    """A float linear the recipe left, decoding on a faster kernel: M <= `max_decode_m` tokens run
    `decode`, more run F.linear on the float32 weight, which stays the parameter it was (`save`
    writes it; a tied embedding keeps reading it). Subclasses add the buffers the kernel reads."""

    BUFFERS: tuple[str, ...] = ()
    max_decode_m = 16

    @classmethod
    def lower(cls, linear: torch.nn.Linear) -> "DecodeLinear":
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.prepare()
        return new

    def prepare(self) -> None:
        """Build the kernel's buffers from the weight (none by default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features > self.max_decode_m or (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)  # prefill, and training: F.linear (gradients reach the weight)
        return self.decode(x)


class Bf16Linear(DecodeLinear):
    """plan="fast": the decode in bfloat16, on a bfloat16 copy of the weight made once (half the
    bytes of a float32 decode, which reads every weight once per token); bfloat16 GEMMs are slow
    at large M on CPUs without native bfloat16, hence F.linear above `max_decode_m`. One token runs
    the C GEMV on the bfloat16 copy (x and the sums stay float32; faster than F.linear there,
    measured), more run F.linear in bfloat16."""

    BUFFERS = ("weight_bf16", "bias_bf16")
    gemv_max_m = 1

    def prepare(self) -> None:
        self.register_buffer("weight_bf16", self.weight.detach().to(torch.bfloat16), persistent=False)
        self.register_buffer("bias_bf16", None if self.bias is None else self.bias.detach().to(torch.bfloat16),
                             persistent=False)
        self.gemv = gemv_refusal(self) is None  # the float32 weight on CPU, the C library built

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv and x.numel() // self.in_features <= self.gemv_max_m and x.dtype == torch.float32:
            return float_gemv(x, self.weight_bf16, self.bias)
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight_bf16, self.bias_bf16).to(x.dtype)


class GemvLinear(DecodeLinear):
    """The float32 output layer decoding on fxquant's C GEMV (float_gemv.c), on the weight itself:
    the same bytes as F.linear, read at the memory's speed; float32 rounding apart from it."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return float_gemv(x, self.weight, self.bias)
