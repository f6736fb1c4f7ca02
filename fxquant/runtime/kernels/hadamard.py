"""The fast Hadamard transform at inference: `fxquant::fast_hadamard`, equal to `fxquant::hadamard`.

Reference: `fxquant.hadamard.hadamard_transform` (a butterfly over 2^k plus the m x m base), what
`fxquant::hadamard` runs. CPU kernel: H_n = H_m (x) H_A (x) H_B (Sylvester splits H_{2^k} into
factors of at most MAX_FACTOR), so x viewed as [..., m, A, B] is rotated by three small dense
GEMMs, one per axis, instead of k memory passes:  Y = H_m . (H_A . (X H_B^T))  (each H symmetric
up to the base). CUDA: the Triton kernel (fxquant.runtime.kernels.triton.hadamard) where triton
imports. Results equal the reference to float32 rounding (tested); both are exact in float64.
"""
from __future__ import annotations

import functools
import math

import torch

from fxquant.runtime.kernels.define import define
from fxquant.hadamard import _require, _sylvester, hadamard_transform
from fxquant.hadamard_constructions import base_hadamard

MAX_FACTOR = 128  # a 128 x 128 factor is 64 KB in float32: one GEMM per axis stays in cache (CPU, measured)

reference = hadamard_transform


@functools.lru_cache(maxsize=64)
def factors(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(H_m or None, H_A, H_B) in `dtype` on `device`, the 1/sqrt(n) normalisation folded into H_B."""
    m, k = _require(n)
    a = max(0, k - int(math.log2(MAX_FACTOR)))
    base = base_hadamard(m).to(device=device, dtype=dtype) if m > 1 else None
    h_a = _sylvester(a).to(device=device, dtype=dtype)
    h_b = (_sylvester(k - a).double() / math.sqrt(n)).to(device=device, dtype=dtype)
    return base, h_a, h_b


def kronecker_hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x @ H^T / sqrt(n) over the last dim as three small GEMMs (the CPU kernel), in x's dtype."""
    n = x.shape[-1]
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    base, h_a, h_b = factors(n, work.device, work.dtype)
    a, b = h_a.shape[0], h_b.shape[0]
    y = work.reshape(-1, n // (a * b), a, b) @ h_b  # Sylvester factors are symmetric: H^T = H
    if a > 1:
        y = h_a @ y
    if base is not None:
        y = base @ y.reshape(-1, base.shape[0], a * b)
    return y.reshape(x.shape).to(x.dtype)


def _triton_hadamard():
    """The Triton kernel's entry, or None where triton does not import."""
    try:
        from fxquant.runtime.kernels.triton import hadamard as triton_hadamard
    except ImportError:
        return None
    return getattr(triton_hadamard, "hadamard", None)


def _fast_hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x @ H^T / sqrt(n) over the last dim: the kernel for x's device (a new tensor)."""
    kernel = _triton_hadamard() if x.is_cuda else None
    return kernel(x) if kernel is not None else kronecker_hadamard(x)


def _fast_hadamard_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


fast_hadamard = define("fxquant::fast_hadamard", _fast_hadamard, _fast_hadamard_fake)


def kernel_name(device: torch.device) -> str:
    """Which kernel `fast_hadamard` runs on `device`, in words (for the lowering report)."""
    if torch.device(device).type == "cuda" and _triton_hadamard() is not None:
        return "Triton Hadamard"
    return "Kronecker GEMMs (H_m x H_A x H_B)"
