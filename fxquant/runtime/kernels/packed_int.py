"""Integer linears on fxquant's C kernel (packed_int.c, CPU): quantizer, product and epilogue in one call.

The exact integer product of integer.py, with the weights in memory at their bit width (4-bit:
half a byte per weight, where oneDNN and torch._int_mm read a byte) and the per-token quantizer
and the epilogue inside the same call: a decode step reads every weight once and runs some two
hundred linears, so bytes and per-call overhead are its cost. The C code repeats row_codes' and
the epilogue's float steps in their order, so the result is bit-identical to torch._int_mm's
(tested against it). It computes in float32: other activation dtypes are converted (exactly) and
the scale rounded to theirs in C, as row_codes does; the output is cast back.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from fxquant.runtime.kernels import integer
from fxquant.runtime.kernels.define import define
from fxquant.runtime.kernels.native import library, refusal

BLOCK = 64  # weights per block of the 4-bit layout (packed_int.c); rows are padded to a multiple
SCALE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def _function(extra_flags: tuple[str, ...] = ()):
    """The C entry point, its argument types set (NativeUnavailable where it cannot be built)."""
    fn = library("packed_int", extra_flags).fxq_packed_int_linear
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    fn.argtypes = [p, i64, i64, i64, p, i32, i64, p, p, p, i32, i32, f32, i32, p, i32]
    fn.restype = i32
    return fn


def unavailable() -> str | None:
    """Why the C kernel cannot run here (None: it can)."""
    return refusal(_function)


def packed_int_refusal(layer) -> str | None:
    """Why this kernel cannot run `layer` (a LoweredLinear candidate), or None when it can."""
    reason = integer.integer_refusal(layer)
    if reason is not None:
        return reason
    if layer.fmt.bits not in (4, 8) or layer.act.bits > 8:
        return f"{layer.fmt.bits}-bit weights, {layer.act.bits}-bit activations (the C kernel: 4/8-bit, up to 8)"
    return unavailable()


def padded_k(in_features: int) -> int:
    return -(-in_features // BLOCK) * BLOCK


def to_packed_int(layer) -> dict[str, torch.Tensor]:
    """The weight codes at their width ([out, Kp / 2] nibbles or [out, Kp] bytes, unsigned: code +
    8 / + 128, zero-padded codes past K), float32 scales [out] and int32 code sums [out]."""
    codes = layer.signed_codes()
    padded = torch.nn.functional.pad(codes, (0, padded_k(layer.in_features) - layer.in_features))
    if layer.fmt.bits == 4:
        u = (padded.to(torch.int16) + 8).to(torch.uint8).view(codes.shape[0], -1, 2, BLOCK // 2)
        weight = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(codes.shape[0], -1)
    else:
        weight = (padded.to(torch.int16) + 128).to(torch.uint8)
    return {"weight": weight.contiguous(), "scale": layer.scale[:, 0].float().contiguous(),
            "colsum": integer.code_sums(codes)}


def _packed_int_linear(x: torch.Tensor, weight: torch.Tensor, scale_colsum: list[torch.Tensor],
                       bias: torch.Tensor | None, fmt: list[int], clip_ratio: float) -> torch.Tensor:
    """Quantize x per token, then (q_x - z_x) q_w^T s_x s_w + b, all in the C kernel. `weight`: the
    codes as `to_packed_int` lays them out; `scale_colsum`: [scales, code sums]; `fmt`: [weight
    bits, activation bits, 1 if the activations are symmetric else 0]."""
    wbits, xbits, symmetric = fmt
    if x.device.type != "cpu" or weight.dtype != torch.uint8:
        raise ValueError(f"fxquant's C integer linear takes CPU tensors and uint8 codes, got x on {x.device}, "
                         f"codes in {weight.dtype}: lower the model again where it runs")
    k, n = x.shape[-1], weight.shape[0]
    flat = x.reshape(-1, k).float().contiguous()
    scale, colsum = scale_colsum[0].float().contiguous(), scale_colsum[1].to(torch.int32).contiguous()  # model.to(dtype) casts buffers
    kp = weight.shape[1] * (2 if wbits == 4 else 1)
    y = torch.empty(flat.shape[0], n, dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    status = _function()(flat.data_ptr(), flat.shape[0], k, kp, weight.data_ptr(), wbits, n, scale.data_ptr(),
                         colsum.data_ptr(), None if b is None else b.data_ptr(), xbits, symmetric, clip_ratio,
                         SCALE_DTYPES.get(x.dtype, 0), y.data_ptr(), torch.get_num_threads())
    if status == -2:
        raise TypeError("this build of fxquant's C integer linear has no float16 (its compiler lacks _Float16): "
                        "run the model in float32 or bfloat16, or lower it with a newer compiler")
    if status != 0:
        raise MemoryError(f"fxquant's C integer linear could not allocate its buffers ({flat.shape[0]} x {kp})")
    return y.to(x.dtype).view(*x.shape[:-1], n)


def _packed_int_linear_fake(x, weight, scale_colsum, bias, fmt, clip_ratio):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


packed_int_linear = define("fxquant::packed_int_linear", _packed_int_linear, _packed_int_linear_fake)
