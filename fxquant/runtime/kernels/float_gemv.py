"""Float32 linears at decode on fxquant's C GEMV (float_gemv.c, CPU): the same bytes, read faster.

A float32 layer the recipe left (the output layer, 113 MB a token on SmolLM2) is read once per
decode step; F.linear's BLAS path streamed it at 15 GB/s here where the memory gives 41, and this
kernel runs it 2.4x faster (docs/BENCHMARKS.md). It reads the layer's own weight (no copy); its
float32 sums run in another order than the BLAS's, so it differs from F.linear by float32 rounding.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from fxquant.runtime.kernels.define import define
from fxquant.runtime.kernels.native import library, refusal


@functools.cache
def _function(extra_flags: tuple[str, ...] = ()):
    """The C entry point, its argument types set (NativeUnavailable where it cannot be built)."""
    fn = library("float_gemv", extra_flags).fxq_float_gemv
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, p, ctypes.c_int, i64, p, p, ctypes.c_int]
    fn.restype = None
    return fn


@functools.cache
def unavailable() -> str | None:
    """Why the C GEMV cannot run here (None: it can)."""
    return refusal(_function)


def gemv_refusal(linear: torch.nn.Linear) -> str | None:
    """Why `linear` cannot decode on the C GEMV, or None when it can."""
    if linear.weight.dtype != torch.float32 or linear.weight.device.type != "cpu":
        return f"a {linear.weight.dtype} weight on {linear.weight.device} (the C GEMV is float32, CPU)"
    return unavailable()


WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _float_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b in float32 through the C GEMV (x [..., K] float32 on CPU, W [N, K] float32 or
    bfloat16)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"fxquant's C GEMV takes float32 x and a float32 or bfloat16 weight on CPU, got x {x.dtype} "
                         f"on {x.device}, weight {weight.dtype}: lower the model again after moving or casting it")
    flat, w = x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(flat.shape[0], w.shape[0], dtype=torch.float32)
    _function()(flat.data_ptr(), flat.shape[0], flat.shape[1], w.data_ptr(), WEIGHT_DTYPES[w.dtype], w.shape[0],
                None if b is None else b.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.view(*x.shape[:-1], w.shape[0])


def _float_gemv_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


float_gemv = define("fxquant::float_gemv", _float_gemv, _float_gemv_fake)
