"""Integer quantization numerics: the reference every kernel and fake-quant in fxquant must match.

Entry points: `qparams` (+ `qparams_clip_search`, `weight_qparams`), `quantize`, `dequantize`,
`fake_quantize`, `fake_quantize_clip_search`, `clip_errors` (an activation clip search's loss), `round_column` (GPTQ's per-channel step),
`QuantizedWeight` (codes, scales and zeros as a packed kernel holds them), and for a linear whose
input is quantized per token: `row_codes` (the quantizer's codes) and `integer_linear` (the exact
integer product, then one float32 epilogue: what every integer kernel computes). Every function takes a
`QuantFormat` (fxquant.quant.format: bits, symmetric, group_size, zero_point). The one idea: scales
are computed over the last dimension, whole (per output channel of a `[out, in]` weight, per token
of an activation) or in groups of `group_size` consecutive entries; symmetric ranges are
[-2^(b-1), 2^(b-1)-1] with scale = max|x| / (2^(b-1)-1), asymmetric ones [0, 2^b-1] with an integer
zero point, or (zero_point "float") the tinygemm format. Scales and zeros are rounded to the dtype
they are stored in, so stored codes dequantize to exactly the fake-quant values. Pure tensor math.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.quant.format import QuantFormat

EPS = 1e-8  # smallest scale: an all-zero row quantizes to zeros instead of dividing by zero


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View x as [..., groups, group_size] (one group = the whole last dim when group_size is None)."""
    n = x.shape[-1]
    g = n if group_size is None else group_size
    if n % g:
        raise ValueError(f"last dimension {n} is not a multiple of group_size {g}")
    return x.reshape(*x.shape[:-1], n // g, g)


def stored(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """t rounded to the dtype scales and zeros are stored in (then computed with in float32), so a
    packed model holding them in that dtype dequantizes to exactly the fake-quant values."""
    return t if dtype is None or dtype in (torch.float32, torch.float64) else t.to(dtype).float()


# The float-zero format (tinygemm / FBGEMM int4): unsigned codes u = clamp(round((x - min) / scale), 0,
# 2^b - 1) from the group min, scale = (max - min) / (2^b - 1) (at least 1e-6), re-centred to signed
# codes q = u - 2^(b-1), with a float zero point zero = min + 2^(b-1) * scale:  x_hat = q * scale + zero.
FLOAT_ZERO_EPS = 1e-6


def qparams(x: torch.Tensor, fmt: QuantFormat, clip_ratio: float = 1.0, *,
            dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group (scale, zero_point) of x, shaped [..., groups, 1]; zero_point is None when symmetric.

    `clip_ratio` < 1 shrinks the range before rounding (clipped outliers for finer steps elsewhere).
    `dtype`: the dtype the scales will be stored in (default x's); they are rounded to it.
    """
    g = _grouped(x.float(), fmt.group_size)
    dtype = x.dtype if dtype is None else dtype
    levels = 2 ** fmt.bits - 1  # qmax - qmin
    if fmt.symmetric:
        amax = g.abs().amax(dim=-1, keepdim=True) * clip_ratio
        return stored((amax / fmt.qrange[1]).clamp_min(EPS), dtype), None
    if fmt.float_zero:
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        centre = (lo + hi) / 2  # the range shrinks about its centre (it need not contain 0)
        lo, hi = centre + (lo - centre) * clip_ratio, centre + (hi - centre) * clip_ratio
        scale = stored(((hi - lo) / levels).clamp_min(FLOAT_ZERO_EPS), dtype)
        return scale, stored(lo + 2 ** (fmt.bits - 1) * scale, dtype)
    lo = g.amin(dim=-1, keepdim=True).clamp_max(0) * clip_ratio
    hi = g.amax(dim=-1, keepdim=True).clamp_min(0) * clip_ratio
    scale = stored(((hi - lo) / levels).clamp_min(EPS), dtype)
    qmin = fmt.qrange[0]  # 0: unsigned codes
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmin + levels)  # the code of 0.0
    return scale, zero


def _codes(g: torch.Tensor, scale, zero, fmt: QuantFormat) -> torch.Tensor:
    """Integer codes of grouped values g ([..., groups, size]): signed for symmetric and float-zero
    formats, unsigned (offset by the integer zero point) otherwise."""
    qmin, qmax = fmt.qrange
    if fmt.float_zero:
        mid = 2 ** (fmt.bits - 1)  # u in [0, 2^b - 1] from the group min, then re-centred
        return torch.round((g - (zero - mid * scale)) / scale).clamp(qmin + mid, qmax + mid) - mid
    q = torch.round(g / scale)
    if zero is not None:
        q = q + zero
    return q.clamp(qmin, qmax)


def _values(q: torch.Tensor, scale, zero, fmt: QuantFormat) -> torch.Tensor:
    """Grouped codes -> float32 values: q*scale, (q - zero)*scale, or q*scale + zero (float zero)."""
    if zero is None:
        return q * scale
    return q * scale + zero if fmt.float_zero else (q - zero) * scale


def quantize(x, scale, zero, fmt: QuantFormat) -> torch.Tensor:
    """Integer codes of x (as floats), in x's shape: q = clamp(round(x / scale) + zero); for a
    float-zero format, its signed codes."""
    return _codes(_grouped(x.float(), fmt.group_size), scale, zero, fmt).reshape(x.shape)


def dequantize(q, scale, zero, fmt: QuantFormat, dtype=torch.float32) -> torch.Tensor:
    """x_hat = (q - zero) * scale (q * scale + zero for a float-zero format), in `dtype`."""
    return _values(_grouped(q.float(), fmt.group_size), scale, zero, fmt).reshape(q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, fmt: QuantFormat, clip_ratio: float = 1.0) -> torch.Tensor:
    """Round x to its nearest representable value (quantize then dequantize), in x's dtype."""
    scale, zero = qparams(x, fmt, clip_ratio)
    return dequantize(quantize(x, scale, zero, fmt), scale, zero, fmt, x.dtype)


def _straight_through(t: torch.Tensor) -> torch.Tensor:
    """round(t) forward, the identity backward."""
    return t + (torch.round(t) - t).detach()


def fake_quantize_ste(x: torch.Tensor, fmt: QuantFormat, clip_ratio: float = 1.0) -> torch.Tensor:
    """`fake_quantize(x)` exactly, differentiable as quantization-aware training wants it: the rounding
    passes its gradient straight through (zero where the clamp bites), and the scale and zero point,
    functions of x's range, pass theirs exactly (LSQ; SpinQuant's activation quantizer), so the
    gradient also sees that moving x's extremes coarsens every value's grid:

        y = s (clamp(x/s + r) - z),  r = round(x/s) - x/s held constant  =>  dy/dx = I + (y/s - x/s) ds/dx
    """
    g = _grouped(x.float(), fmt.group_size)
    scale, zero = qparams(x.float(), fmt, clip_ratio)  # through amax / amin: differentiable in x
    qmin, qmax = fmt.qrange
    if fmt.float_zero:
        mid = 2 ** (fmt.bits - 1)
        q = _straight_through((g - (zero - mid * scale)) / scale).clamp(qmin + mid, qmax + mid) - mid
    else:
        q = _straight_through(g / scale)
        q = (q + zero if zero is not None else q).clamp(qmin, qmax)
    y = _values(q, scale, zero, fmt).reshape(x.shape)
    return fake_quantize(x.detach(), fmt, clip_ratio) + (y - y.detach()).to(x.dtype)


CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5


def qparams_clip_search(x: torch.Tensor, fmt: QuantFormat, grid=CLIP_GRID, *,
                        dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qparams with, per group, the clip ratio from `grid` whose rounding has the least squared error."""
    best = None
    for ratio in grid:
        scale, zero = qparams(x, fmt, ratio, dtype=dtype)
        xq = dequantize(quantize(x, scale, zero, fmt), scale, zero, fmt)
        err = _grouped((xq - x.float()) ** 2, fmt.group_size).sum(dim=-1, keepdim=True)
        if best is None:
            best = [err, scale, zero]
            continue
        better = err < best[0]
        best = [torch.minimum(err, best[0]), torch.where(better, scale, best[1]),
                None if zero is None else torch.where(better, zero, best[2])]
    return best[1], best[2]


def weight_qparams(w: torch.Tensor, fmt: QuantFormat, clip_ratio: float = 1.0, clip_search: bool = False, *,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A weight quantizer's (scale, zero): per group the searched clip ratio, or the fixed `clip_ratio`."""
    if clip_search:
        return qparams_clip_search(w, fmt, dtype=dtype)
    return qparams(w, fmt, clip_ratio, dtype=dtype)


def clip_errors(x: torch.Tensor, fmt: QuantFormat, grid=CLIP_GRID, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[len(grid)]: for each fixed clip ratio of `grid`, the squared rounding error of x [rows, n]
    fake-quantized with it, summed over rows, channel j weighted by weights[j] (default 1). With
    weights = the column norms^2 of the weight x meets, sum_j w_j e_j^2 is the output error of
    independent per-channel errors (what an activation clip search minimises)."""
    w = 1.0 if weights is None else weights.float()
    return torch.stack([((fake_quantize(x, fmt, ratio).float() - x.float()) ** 2 * w).sum() for ratio in grid])


def fake_quantize_clip_search(x: torch.Tensor, fmt: QuantFormat, grid=CLIP_GRID) -> torch.Tensor:
    """fake_quantize with, per group, the clip ratio from `grid` that minimises the squared error.

    Shrinking the range clips a few outliers but rounds everything else on a finer grid; for
    Gaussian-like (rotated) weights at 4 bits the best ratio is often well below 1.
    """
    scale, zero = qparams_clip_search(x, fmt, grid)
    return dequantize(quantize(x, scale, zero, fmt), scale, zero, fmt, x.dtype)


def round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """One column [out] of a weight rounded with per-row `scale` / `zero` [out]: (codes, values), what
    GPTQ does one input channel at a time, with the same numerics as `quantize` / `dequantize`."""
    q = _codes(w.float(), scale, zero, fmt)
    return q, _values(q, scale, zero, fmt)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight as its kernel holds it: integer `codes` [out, in] (as stored: unsigned, code - qmin, in
    uint8), `scale` and `zero` [out, groups] in the model dtype, and the format `fmt` that reads them."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: QuantFormat

    def values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight [out, in], in `dtype` (default: the scales' dtype)."""
        q = self.codes.float() + self.fmt.qrange[0]
        zero = None if self.zero is None else self.zero.float()[..., None]
        return dequantize(q, self.scale.float()[..., None], zero, self.fmt, dtype or self.scale.dtype)


def quantized_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat,
                     dtype: torch.dtype) -> QuantizedWeight:
    """Store integer codes (floats, in fmt.qrange) and [..., groups, 1] scales/zeros as a QuantizedWeight."""
    return QuantizedWeight((codes - fmt.qrange[0]).to(torch.uint8), scale[..., 0].to(dtype),
                           None if zero is None else zero[..., 0].to(dtype), fmt)


def row_codes(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> tuple:
    """(codes, scale, zero) per row of the last dim, in float32 (zero None when symmetric): the
    per-token quantizer's arithmetic in `fake_quantize`'s order, so (codes - zero) * scale is
    bit-identical to `fake_quantize(x, QuantFormat(bits, symmetric, None, "int"), clip_ratio)`."""
    f = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = stored((f.abs().amax(dim=-1, keepdim=True) * clip_ratio / qmax).clamp_min(EPS), x.dtype)
        return torch.round(f / scale).clamp_(-qmax - 1, qmax), scale, None
    levels = 2 ** bits - 1
    lo = f.amin(dim=-1, keepdim=True).clamp_max(0) * clip_ratio
    hi = f.amax(dim=-1, keepdim=True).clamp_min(0) * clip_ratio
    scale = stored(((hi - lo) / levels).clamp_min(EPS), x.dtype)
    zero = (0 - torch.round(lo / scale)).clamp(0, levels)
    return torch.round(f / scale).add_(zero).clamp_(0, levels), scale, zero


def integer_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias, like: torch.Tensor):
    """y = acc s_x s_w (+ b) from the integer sums `acc` [M, out] (int32, or integers held in a float
    dtype): rounded to float32 once (round-to-nearest-even from either), scaled by the token's then
    the channel's scale in float32, biased, then in `like`'s dtype and leading shape."""
    y = acc.float().mul_(x_scale).mul_(w_scale)
    if bias is not None:
        y = y.add_(bias)
    return y.to(like.dtype).view(*like.shape[:-1], w_scale.shape[0])


FLOAT32_EXACT = 2 ** 24  # float32 holds every integer up to this, float64 every one up to 2^53


def integer_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   act: tuple[int, bool, float], w_bits: int) -> torch.Tensor:
    """y for x quantized per token by `act` = (bits, symmetric, clip_ratio) and a weight held as signed
    `w_bits`-bit integer codes [out, in] with one float32 scale per output channel [out]:

        y = ((q_x - z_x) q_w^T) s_x s_w + b      (the integer sum exact)

    The numerics definition of a quantized-input linear: every integer kernel (int32 sums) computes
    exactly this, where a float product of the dequantized values would round at every step. The sum
    runs in float32 where no partial sum can pass 2^24, else in float64: exact either way."""
    bits, symmetric, clip_ratio = act
    q, x_scale, zero = row_codes(x.reshape(-1, x.shape[-1]), bits, symmetric, clip_ratio)
    if zero is not None:
        q = q.sub_(zero)
    x_max = 2 ** (bits - 1) if symmetric else 2 ** bits - 1  # |q_x - z_x| at most
    exact = torch.float32 if x_max * 2 ** (w_bits - 1) * x.shape[-1] < FLOAT32_EXACT else torch.float64
    acc = q.to(exact) @ w_codes.to(exact).t()
    return integer_epilogue(acc, x_scale, w_scale, bias, x)
