"""Per-token activation and KV quantizers at inference, alone and fused after the Hadamard.

Reference: `fxquant.quant.numerics.fake_quantize` with one scale per row of the last dim (what
`fxquant::fake_quant` runs). CPU kernel: the same arithmetic in the same order on the row itself
(no group view, no copies), so codes and values are bit-identical to the reference (tested); one op
`fxquant::fast_hadamard_fake_quant` rotates and quantizes a row in one call (the "Hadamard
quantizer" that R4 and R3 + KV need). CUDA: the Triton kernels where triton imports.

    symmetric:  s = max|x| c / (2^(b-1) - 1),   x_hat = clamp(round(x / s)) s
    asymmetric: s = (max(x, 0) - min(x, 0)) c / (2^b - 1),  z = clamp(-round(min(x, 0) c / s)),
                x_hat = (clamp(round(x / s) + z) - z) s
"""
from __future__ import annotations

import torch

from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import fake_quantize, row_codes
from fxquant.runtime.kernels.define import define
from fxquant.runtime.kernels.hadamard import kronecker_hadamard


def reference(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    """The numerics definition: fake_quantize per row (an integer zero point when asymmetric)."""
    return fake_quantize(x, QuantFormat(bits, symmetric, None, "int"), clip_ratio)


def row_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    """x_hat per row of the last dim: the CPU kernel, bit-identical to `reference`."""
    codes, scale, zero = row_codes(x, bits, symmetric, clip_ratio)
    if zero is not None:
        codes = codes.sub_(zero)
    return codes.mul_(scale).to(x.dtype)


def _triton(name: str):
    """A Triton kernel of fxquant.runtime.kernels.triton.hadamard, or None where triton does not import."""
    try:
        from fxquant.runtime.kernels.triton import hadamard as triton_hadamard
    except ImportError:
        return None
    return getattr(triton_hadamard, name, None)


def _fast_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    """x_hat per row of the last dim (per token, per (token, head)), a new contiguous tensor."""
    kernel = _triton("fake_quant") if x.is_cuda else None
    y = kernel(x, bits, symmetric, clip_ratio) if kernel is not None else row_fake_quant(x, bits, symmetric, clip_ratio)
    return y.contiguous()


def _fast_hadamard_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    """fake_quant(hadamard(x)) per row in one call: the rotation R4 / R3 needs, then the quantizer."""
    kernel = _triton("hadamard_fake_quant") if x.is_cuda else None
    if kernel is not None:
        return kernel(x, bits, symmetric, clip_ratio).contiguous()
    return row_fake_quant(kronecker_hadamard(x), bits, symmetric, clip_ratio)


def _rows_fake(x, bits, symmetric, clip_ratio=1.0):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


fast_fake_quant = define("fxquant::fast_fake_quant", _fast_fake_quant, _rows_fake)
fast_hadamard_fake_quant = define("fxquant::fast_hadamard_fake_quant", _fast_hadamard_fake_quant, _rows_fake)


def _backward(ctx, grad):
    """Straight-through, as fxquant::fake_quant: the lowered model can still be fine-tuned."""
    return grad, None, None, None


fast_fake_quant.op.register_autograd(_backward, setup_context=lambda ctx, inputs, output: None)
