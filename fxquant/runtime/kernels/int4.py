"""int4 weight-only linear kernels: the reference, tinygemm on CPU, Triton on CUDA.

Reference: `fxquant::quantized_linear` (dequantize the codes, then F.linear in the model dtype).
CPU kernel: `aten._weight_int4pack_mm_for_cpu` (tinygemm), vectorised for bfloat16 activations:
x and the scales are rounded to bfloat16 and the product comes back in bfloat16, so results
match the reference to bfloat16 rounding (relative ~4e-3), not bit for bit. Every int4 format
maps to its one convention, w = (u - 8) s + z' with the stored codes u in 0..15:

    symmetric      w = q s = (u - 8) s                       z' = 0
    float zero     w = q s + zero = (u - 8) s + zero         z' = zero
    integer zero   w = (u - z) s = (u - 8) s + (8 - z) s     z' = (8 - z) s   (exact in real
                                                             arithmetic, an ulp in float32)

The kernel then holds s and z' in bfloat16: each weight moves by up to 2^-9 of its group's scale
and offset, the change that dominates the difference from the reference.

A per-channel format becomes groups of the largest size tinygemm takes that divides K (the scale
repeated). CUDA: the Triton kernels (fxquant.runtime.kernels.triton.int4) where triton imports.
"""
from __future__ import annotations

import torch

from fxquant.runtime.kernels.define import define

GROUPS = (256, 128, 64, 32)  # the group sizes tinygemm's CPU kernel takes
INNER_K_TILES = 2  # tinygemm's packing parameter for the CPU layout


def tinygemm_group(layer) -> int | None:
    """The group size tinygemm runs `layer` (a QuantizedLinear) with, or None when it cannot."""
    size = layer.fmt.group_size
    if size is not None:
        return size if size in GROUPS else None
    return next((g for g in GROUPS if layer.in_features % g == 0), None)


def tinygemm_refusal(layer) -> str | None:
    """Why the CPU int4 kernel cannot run `layer`, or None when it can."""
    if layer.fmt.bits != 4:
        return f"{layer.fmt.bits}-bit codes (the kernel is int4)"
    if layer.out_features % 16:
        return f"out_features {layer.out_features} is not a multiple of 16, which tinygemm's CPU packing needs"
    if tinygemm_group(layer) is None:
        return (f"group size {layer.fmt.group_size} / in_features {layer.in_features}: tinygemm takes groups of "
                f"{list(GROUPS)} that divide in_features")
    return None


def offset_zero(layer) -> torch.Tensor:
    """z' [out, groups] with w = (u - 8) s + z' (the table above), in float32."""
    scale = layer.scale.float()
    if layer.fmt.symmetric:
        return torch.zeros_like(scale)
    if layer.fmt.float_zero:
        return layer.zero.float()
    return (8 - layer.zero.float()) * scale


def to_tinygemm(layer) -> dict[str, torch.Tensor]:
    """The layer's weight in tinygemm's CPU layout, converted once: packed codes and [groups, out, 2]
    bfloat16 (scale, zero) pairs."""
    group = tinygemm_group(layer)
    codes = layer.stored_codes().to(torch.int32).contiguous()
    scale, zero = layer.scale.float(), offset_zero(layer)
    repeat = layer.in_features // group // scale.shape[1]  # > 1 only for a per-channel format
    pairs = torch.stack([scale.repeat_interleave(repeat, 1).t(), zero.repeat_interleave(repeat, 1).t()], dim=-1)
    return {"weight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES),
            "scale_zeros": pairs.to(torch.bfloat16).contiguous()}


def _int4_tinygemm(x: torch.Tensor, weight: torch.Tensor, scale_zeros: torch.Tensor, group_size: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b through tinygemm's CPU kernel (bfloat16 activations), returned in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight, group_size, scale_zeros).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])


def _int4_tinygemm_fake(x, weight, scale_zeros, group_size, bias):
    return x.new_empty(*x.shape[:-1], scale_zeros.shape[1])


int4_tinygemm = define("fxquant::int4_tinygemm", _int4_tinygemm, _int4_tinygemm_fake, inline=True)
