"""fxquant's custom ops: one torch.library definition each, with its reference math and fake impl.

Entry points: `torch.ops.fxquant.hadamard`, `torch.ops.fxquant.fake_quant`,
`torch.ops.fxquant.quantized_linear`, and their `OpOverload`s (`HADAMARD`, `FAKE_QUANT`,
`QUANTIZED_LINEAR`) that the op table and lowering match on. The one idea: each op is registered
with a fake implementation, so eager runs, `torch.export` and `torch.compile` all see one named node
whose reference implementation is the numerics every kernel must match (fxquant.hadamard,
fxquant.quant.numerics).
"""
from __future__ import annotations

import torch

from fxquant.hadamard import hadamard_transform, kronecker_hadamard
from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import QuantizedWeight, fake_quantize, fake_quantize_ste, integer_linear
from fxquant.quant.packed import unpack_int4


@torch.library.custom_op("fxquant::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x @ H^T / sqrt(n) over the last dim (n = m * 2^k from fxquant.hadamard), laid out like x,
    in the arithmetic of the device's kernel (`online_transform`), so a 4-bit quantizer after it sees
    the same bits in the reference model and the lowered one."""
    out = torch.empty_like(x)  # q and k arrive as transposed views: keep their strides, as the fake does
    return out.copy_(online_transform(x.device)(x))


def online_transform(device: torch.device):
    """The online Hadamard's arithmetic on `device`: on CPU the Kronecker GEMMs its kernel runs
    (`kronecker_hadamard`); elsewhere the butterfly (`hadamard_transform`), whose stages the Triton
    kernel runs in the same order (bit-exact for n = 2^k). The two agree to float32 rounding."""
    return kronecker_hadamard if torch.device(device).type == "cpu" else hadamard_transform


@hadamard.register_fake
def _hadamard_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _hadamard_backward(ctx, grad: torch.Tensor):
    """y = x H^T / sqrt(n)  =>  dL/dx = dL/dy H / sqrt(n): the transposed transform (rotations learn through it)."""
    return hadamard_transform(grad, transpose=True)


hadamard.register_autograd(_hadamard_backward, setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("fxquant::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    """Round x to its nearest `bits`-bit value, one scale per row of the last dim (per token, per
    (token, head)); one named op for export and compile, whose numerics are fxquant.quant.numerics."""
    out = torch.empty_like(x)
    return out.copy_(fake_quantize(x, QuantFormat(bits, symmetric, None, "int"), clip_ratio))  # per row, int zero


@fake_quant.register_fake
def _fake_quant_fake(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    return torch.empty_like(x)


def _fake_quant_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.quantizer = inputs[1:]


def _fake_quant_backward(ctx, grad: torch.Tensor):
    """Straight through the rounding, exact through the per-row scale and zero (numerics.fake_quantize_ste):
    what QAT and learned rotations train through; without the scale's term a rotation's gradient
    would not see the outliers it is there to spread."""
    (x,) = ctx.saved_tensors
    bits, symmetric, clip_ratio = ctx.quantizer
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        y = fake_quantize_ste(leaf, QuantFormat(bits, symmetric, None, "int"), clip_ratio)
        (dx,) = torch.autograd.grad(y, leaf, grad)
    return dx, None, None, None


fake_quant.register_autograd(_fake_quant_backward, setup_context=_fake_quant_setup)


def packs_two_per_byte(bits: int) -> bool:
    """Codes of at most 4 bits are stored two per byte."""
    return bits <= 4


def stored_codes(codes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The stored (unsigned, code - qmin) codes [out, in] of a packed layer's `codes` buffer."""
    return unpack_int4(codes)[..., :in_features] if packs_two_per_byte(bits) else codes


def dequantized_weight(codes, scale, zero, bits, symmetric, group_size, float_zero, in_features) -> torch.Tensor:
    """The [out, in] weight that packed `codes` with `scale` / `zero` stand for, in the format the op's
    primitive arguments spell (`group_size` 0: per row; `float_zero`: the float zero point)."""
    unpacked = stored_codes(codes, bits, in_features)
    fmt = QuantFormat.from_float_zero(bits, symmetric, group_size, float_zero)
    return QuantizedWeight(unpacked, scale, zero, fmt).values()


@torch.library.custom_op("fxquant::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     bias: torch.Tensor | None, bits: int, symmetric: bool, group_size: int, float_zero: bool,
                     in_features: int, transposed: bool, act_bits: int = 0, act_symmetric: bool = True,
                     act_clip_ratio: float = 1.0) -> torch.Tensor:
    """y = x W^T + b with W dequantized from `codes` (`group_size` 0: one scale per output row);
    `transposed`: the product as transformers' Conv1D computes it (addmm with W^T stored contiguous).
    `act_bits` > 0: x is first quantized per token (`act_bits`, `act_symmetric`, `act_clip_ratio`), and
    y is the exact integer product of the codes, scaled once (numerics.integer_linear; symmetric
    per-channel weights only): what the integer kernels compute, bit for bit."""
    if act_bits:
        if not symmetric or group_size or transposed:
            raise ValueError("quantized_linear: a quantized input needs symmetric per-channel weights, not transposed")
        signed = stored_codes(codes, bits, in_features).to(torch.int16) - 2 ** (bits - 1)
        return integer_linear(x, signed, scale[:, 0].float(), bias, (act_bits, act_symmetric, act_clip_ratio), bits)
    w = dequantized_weight(codes, scale, zero, bits, symmetric, group_size, float_zero, in_features)
    if transposed:
        return torch.addmm(bias, x.reshape(-1, in_features), w.t().contiguous()).view(*x.shape[:-1], w.shape[0])
    return torch.nn.functional.linear(x, w, bias)


@quantized_linear.register_fake
def _quantized_linear_fake(x, codes, scale, zero, bias, bits, symmetric, group_size, float_zero, in_features,
                           transposed, act_bits=0, act_symmetric=True, act_clip_ratio=1.0):
    return x.new_empty(*x.shape[:-1], scale.shape[0])


HADAMARD = torch.ops.fxquant.hadamard.default
FAKE_QUANT = torch.ops.fxquant.fake_quant.default
QUANTIZED_LINEAR = torch.ops.fxquant.quantized_linear.default
