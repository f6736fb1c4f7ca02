"""The fast Hadamard transform at inference: `fxquant::fast_hadamard`, equal to `fxquant::hadamard`.

Reference: `fxquant::hadamard`, in the arithmetic of the device's kernel (library.online_transform).
CPU: `fxquant.hadamard.kronecker_hadamard`, H_n = H_m (x) H_A (x) H_B (Sylvester splits H_{2^k}
into factors of at most MAX_FACTOR), so x viewed as [..., m, A, B] is rotated by three small dense
GEMMs, one per axis, instead of k memory passes; the kernel is that function, so it is bit-identical
to the reference (a 4-bit quantizer after it sees the reference's bits). CUDA: the Triton kernel
(fxquant.runtime.kernels.triton.hadamard) where triton imports, which runs the butterfly's stages in
the reference's order (bit-exact for n = 2^k, float32 rounding apart otherwise); exact in float64.
"""
from __future__ import annotations

import torch

from fxquant.hadamard import kronecker_hadamard
from fxquant.runtime.kernels.define import define

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
