"""int8 weight linear kernels: the reference and the CPU int8-weight kernel.

Reference: `fxquant::quantized_linear` (dequantize, then F.linear). CPU kernel:
`aten._weight_int8pack_mm` with bfloat16 activations and per-output-channel scales (its fast path):
y = (x W_q^T) s, for symmetric per-channel int8 weights, matching the reference to bfloat16
rounding. That kernel crashes or returns garbage unless K is a multiple of 16 (measured here at
K = 8, 24, 40, 56 on AVX-512; the AVX2 build was seen wrong at K % 8 != 0), so K is zero-padded to
a multiple of 16 once for the weight and per call for x (exact: the padded columns add zero).
"""
from __future__ import annotations

import torch

from fxquant.runtime.kernels.define import define

K_MULTIPLE = 16


def int8_refusal(layer) -> str | None:
    """Why the CPU int8 kernel cannot run `layer` (a QuantizedLinear), or None when it can."""
    fmt = layer.fmt
    if fmt.bits != 8:
        return f"{fmt.bits}-bit codes (the kernel is int8)"
    if not fmt.symmetric or fmt.group_size is not None:
        return f"{fmt.describe()}: the int8 kernel takes symmetric per-channel weights only"
    return None


def padded_k(in_features: int) -> int:
    return -(-in_features // K_MULTIPLE) * K_MULTIPLE


def to_int8pack(layer) -> dict[str, torch.Tensor]:
    """Signed int8 codes [out, K padded to 16] and bfloat16 scales [out], converted once."""
    codes = layer.signed_codes()
    codes = torch.nn.functional.pad(codes, (0, padded_k(layer.in_features) - layer.in_features))
    return {"weight": codes.contiguous(), "scales": layer.scale[:, 0].to(torch.bfloat16).contiguous()}


def _int8_weight_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x (W_q s)^T + b through the CPU int8-weight kernel (bfloat16 activations), in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if weight.shape[1] != flat.shape[1]:
        flat = torch.nn.functional.pad(flat, (0, weight.shape[1] - flat.shape[1]))
    y = torch.ops.aten._weight_int8pack_mm(flat, weight, scales).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])


def _int8_weight_mm_fake(x, weight, scales, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


int8_weight_mm = define("fxquant::int8_weight_mm", _int8_weight_mm, _int8_weight_mm_fake, inline=True)
