"""Integer quantization numerics: the reference every kernel and fake-quant in fxquant must match.

Entry points: `qrange`, `qparams` (+ `qparams_clip_search`), `quantize`, `dequantize`, `fake_quantize`,
`fake_quantize_clip_search`, `round_column` (GPTQ's per-channel step). The one idea: scales are computed
over the last dimension, whole (per output channel of a `[out, in]` weight, per token of an
activation) or in groups of `group_size` consecutive entries; symmetric ranges are
[-2^(b-1), 2^(b-1)-1] with scale = max|x| / (2^(b-1)-1), asymmetric ones [0, 2^b-1] with an integer
zero point. Pure tensor math: no fx, no modules.
"""
from __future__ import annotations

import torch

EPS = 1e-8  # smallest scale: an all-zero row quantizes to zeros instead of dividing by zero


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-bit integer: signed for symmetric, unsigned for asymmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View x as [..., groups, group_size] (one group = the whole last dim when group_size is None)."""
    n = x.shape[-1]
    g = n if group_size is None else group_size
    if n % g:
        raise ValueError(f"last dimension {n} is not a multiple of group_size {g}")
    return x.reshape(*x.shape[:-1], n // g, g)


def qparams(x: torch.Tensor, bits: int, symmetric: bool, group_size: int | None = None,
            clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group (scale, zero_point) of x, shaped [..., groups, 1]; zero_point is None when symmetric.

    `clip_ratio` < 1 shrinks the range before rounding (clipped outliers for finer steps elsewhere).
    """
    g = _grouped(x.float(), group_size)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = g.abs().amax(dim=-1, keepdim=True) * clip_ratio
        return (amax / qmax).clamp_min(EPS), None
    lo = g.amin(dim=-1, keepdim=True).clamp_max(0) * clip_ratio
    hi = g.amax(dim=-1, keepdim=True).clamp_min(0) * clip_ratio
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def quantize(x, scale, zero, bits: int, symmetric: bool, group_size: int | None = None) -> torch.Tensor:
    """Integers q = clamp(round(x / scale) + zero) in x's grouped layout, flattened back to x's shape."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.round(_grouped(x.float(), group_size) / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(qmin, qmax).reshape(x.shape)


def dequantize(q, scale, zero, group_size: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """x_hat = (q - zero) * scale, in `dtype`."""
    g = _grouped(q.float(), group_size)
    if zero is not None:
        g = g - zero
    return (g * scale).reshape(q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, symmetric: bool, group_size: int | None = None,
                  clip_ratio: float = 1.0) -> torch.Tensor:
    """Round x to its nearest representable value (quantize then dequantize), in x's dtype."""
    scale, zero = qparams(x, bits, symmetric, group_size, clip_ratio)
    q = quantize(x, scale, zero, bits, symmetric, group_size)
    return dequantize(q, scale, zero, group_size, x.dtype)


CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5


def qparams_clip_search(x: torch.Tensor, bits: int, symmetric: bool, group_size: int | None = None,
                        grid=CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qparams with, per group, the clip ratio from `grid` whose rounding has the least squared error."""
    best = None
    for ratio in grid:
        scale, zero = qparams(x, bits, symmetric, group_size, ratio)
        xq = dequantize(quantize(x, scale, zero, bits, symmetric, group_size), scale, zero, group_size)
        err = _grouped((xq - x.float()) ** 2, group_size).sum(dim=-1, keepdim=True)
        if best is None:
            best = [err, scale, zero]
            continue
        better = err < best[0]
        best = [torch.minimum(err, best[0]), torch.where(better, scale, best[1]),
                None if zero is None else torch.where(better, zero, best[2])]
    return best[1], best[2]


def fake_quantize_clip_search(x: torch.Tensor, bits: int, symmetric: bool, group_size: int | None = None,
                              grid=CLIP_GRID) -> torch.Tensor:
    """fake_quantize with, per group, the clip ratio from `grid` that minimises the squared error.

    Shrinking the range clips a few outliers but rounds everything else on a finer grid; for
    Gaussian-like (rotated) weights at 4 bits the best ratio is often well below 1.
    """
    scale, zero = qparams_clip_search(x, bits, symmetric, group_size, grid)
    return dequantize(quantize(x, scale, zero, bits, symmetric, group_size), scale, zero, group_size, x.dtype)


def round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 symmetric: bool) -> torch.Tensor:
    """One column [out] of a weight rounded with per-row `scale` / `zero` [out]: what GPTQ does one
    input channel at a time, with the same numerics as `fake_quantize`."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    q = q.clamp(qmin, qmax)
    return ((q - zero) if zero is not None else q) * scale


def qparams_float_zero(x: torch.Tensor, bits: int = 4, group_size: int | None = None,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) of the tinygemm / FBGEMM asymmetric int4 format: codes 0..2^b-1
    from the group min, scale = (max - min) / (2^b - 1) (at least `eps`), and a *float* zero that
    re-centres the codes to signed: x_hat = (q - 2^(b-1)) * scale + zero, zero = min + 2^(b-1) * scale."""
    g = _grouped(x.float(), group_size)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(eps)
    return scale, lo + 2 ** (bits - 1) * scale


def quantize_float_zero(x, scale, zero, bits: int = 4, group_size: int | None = None) -> torch.Tensor:
    """Unsigned codes q = clamp(round((x - (zero - 2^(b-1) scale)) / scale), 0, 2^b - 1), in x's shape."""
    mid = 2 ** (bits - 1)
    q = torch.round((_grouped(x.float(), group_size) - (zero - mid * scale)) / scale)
    return q.clamp(0, 2 ** bits - 1).reshape(x.shape)


def dequantize_float_zero(q, scale, zero, bits: int = 4, group_size: int | None = None,
                          dtype=torch.float32) -> torch.Tensor:
    """x_hat = (q - 2^(b-1)) * scale + zero, in `dtype`."""
    g = _grouped(q.float(), group_size)
    return ((g - 2 ** (bits - 1)) * scale + zero).reshape(q.shape).to(dtype)


def fake_quantize_float_zero(x: torch.Tensor, bits: int = 4, group_size: int | None = None) -> torch.Tensor:
    """Round x to the tinygemm-style asymmetric grid (see `qparams_float_zero`), in x's dtype."""
    scale, zero = qparams_float_zero(x, bits, group_size)
    return dequantize_float_zero(quantize_float_zero(x, scale, zero, bits, group_size), scale, zero, bits,
                                 group_size, x.dtype)
