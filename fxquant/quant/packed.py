"""Packed integer storage: int4 codes two per byte, the layout quantized weights are stored in.

Entry points: `pack_int4(codes)` and `unpack_int4(packed)`. Codes are unsigned 0..15 (signed int4
codes are stored offset by 8); element 2i goes to the low nibble of byte i and element 2i+1 to the
high nibble, along the last dimension, which must be even. Pure tensor math.
"""
from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..15, [..., n] with n even -> uint8 [..., n / 2]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {tuple(codes.shape)}")
    c = codes.to(torch.int16)
    if bool(((c < 0) | (c > 15)).any()):
        raise ValueError("int4 codes must lie in 0..15 (offset signed codes by 8 before packing)")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., m] -> uint8 codes [..., 2m] (the inverse of pack_int4)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
