"""Triton kernels: the fast Hadamard transform and the fused Hadamard -> per-token quantizer.

Entry points: `hadamard(x)`, `hadamard_quantize(x, bits, symmetric, clip_ratio)`,
`hadamard_fake_quant(...)`, `fake_quant(...)` (the quantizer alone), registered as the ops
`fxquant::triton_hadamard`, `::triton_hadamard_quantize`, `::triton_hadamard_fake_quant`,
`::triton_fake_quant`. The one idea: one program holds whole rows in registers as a tile
[m_pad, rows, 2^k] (row r of n = m * 2^k viewed as [m, 2^k], m padded to a power of two), runs
the k Sylvester butterfly stages along the last axis with reshape/split/join (the reference's
stages in the reference's order, so m = 1 is bit-exact), mixes the m axis with one dot
H_m @ [m_pad, rows * 2^k], then rounds each row with the reference quantizer's arithmetic
(fxquant.quant.numerics): one read and one write of memory per row.
"""
# no `from __future__ import annotations`: triton 3.0 reads `tl.constexpr` annotations as objects, not strings
import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from fxquant.errors import NoHadamardError
from fxquant.hadamard import _require
from fxquant.hadamard_constructions import base_hadamard
from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import EPS

MAX_TILE = 2 ** 15  # elements of one padded row (m_pad * 2^k): the row must fit one program's registers
TILE_TARGET = 4096  # elements per program: small rows are batched until the tile reaches this
OUT_ROTATED, OUT_CODES, OUT_VALUES = 0, 1, 2  # what the kernel writes: y, (codes, scale, zero), x_hat

_EPS = tl.constexpr(EPS)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23
_ROUND_LIMIT = tl.constexpr(4194304.0)  # 2^22: below it the magic add rounds exactly


@triton.jit
def _round_half_even(v):
    """torch.round (ties to even) in fp32: adding and removing 1.5 * 2^23 leaves v rounded to an
    integer for |v| < 2^22; larger values saturate the clamp anyway. Same on GPU and interpreter."""
    r = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.where(tl.abs(v) < _ROUND_LIMIT, r, v)


@triton.jit
def _butterfly(t, SIZE: tl.constexpr, LOG_P: tl.constexpr):
    """Flat tile t [SIZE] @ H_{2^LOG_P} per chunk of 2^LOG_P: stage h = 1, 2, 4, ... maps the pair
    (a, b) h apart to (a + b, a - b), exactly the reference `_butterfly`."""
    for s in tl.static_range(LOG_P):
        pairs = tl.permute(tl.reshape(t, (SIZE >> (s + 1), 2, 1 << s)), (0, 2, 1))  # [.., h, 2]
        a, b = tl.split(pairs)
        t = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (SIZE,))
    return t


@triton.jit
def _row_reduce_max(t):
    """[A, R, B] -> [1, R, 1]: the max of each row r."""
    return tl.max(tl.max(t, axis=2), axis=0)[None, :, None]


@triton.jit
def _row_reduce_min(t):
    return tl.min(tl.min(t, axis=2), axis=0)[None, :, None]


@triton.jit
def _qparams(y, clip, live, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, DTYPE: tl.constexpr):
    """Per-row (scale, zero, qmin, qmax) as `numerics.qparams` computes them (scale rounded to the
    input dtype, integer zero; 0 for symmetric). Padding entries are 0 and move no max or min;
    rows past the end (`live` false) get scale 1, not fp16's EPS = 0 and a 0 / 0."""
    if SYMMETRIC:
        qmin = -(1 << (BITS - 1))
        qmax = (1 << (BITS - 1)) - 1
        amax = _row_reduce_max(tl.abs(y)) * clip
        scale = tl.maximum(tl.math.div_rn(amax, qmax * 1.0), _EPS).to(DTYPE).to(tl.float32)
        scale = tl.where(live, scale, 1.0)
        zero = tl.zeros_like(scale)
    else:
        qmin = 0
        qmax = (1 << BITS) - 1
        lo = tl.minimum(_row_reduce_min(y), 0.0) * clip
        hi = tl.maximum(_row_reduce_max(y), 0.0) * clip
        scale = tl.maximum(tl.math.div_rn(hi - lo, qmax * 1.0), _EPS).to(DTYPE).to(tl.float32)
        scale = tl.where(live, scale, 1.0)
        zero = tl.minimum(tl.maximum(0.0 - _round_half_even(tl.math.div_rn(lo, scale)), 0.0), qmax * 1.0)
    return scale, zero, qmin, qmax


@triton.jit
def _rotate_quantize_kernel(x_ptr, out_ptr, scale_ptr, zero_ptr, base_ptr, n_rows, n, m, norm, clip,
                            M_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, ROWS: tl.constexpr,
                            OUT: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """ROWS rows of x [n_rows, n] as a tile [M_PAD, ROWS, P] (entry (j, r, p) = x[row r, j * (n / m) + p]):
    butterfly over p, base H_m over j when m > 1, times `norm`; then write y, or codes + scale + zero
    (OUT_CODES), or x_hat (OUT_VALUES). The quantizer alone is LOG_P = 0, m = 1, P = next_pow2(n)."""
    width = n // m
    j = tl.arange(0, M_PAD)[:, None, None]
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS))[None, :, None]
    p = tl.arange(0, P)[None, None, :]
    offs = row.to(tl.int64) * n + j * width + p
    mask = (j < m) & (p < width) & (row < n_rows)
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LOG_P > 0:
        y = tl.reshape(_butterfly(tl.reshape(y, (M_PAD * ROWS * P,)), M_PAD * ROWS * P, LOG_P), (M_PAD, ROWS, P))
    if M_PAD > 1:  # Y = H_m @ Y over j; rows and p ride along as the dot's columns
        hj = tl.arange(0, M_PAD)
        h = tl.load(base_ptr + hj[:, None] * M_PAD + hj[None, :])
        y = tl.reshape(tl.dot(h, tl.reshape(y, (M_PAD, ROWS * P)), input_precision="ieee"), (M_PAD, ROWS, P))
    y = y * norm
    if OUT == 0:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference quantizes the rotated x in x's dtype
        scale, zero, qmin, qmax = _qparams(y, clip, row < n_rows, BITS, SYMMETRIC, x_ptr.dtype.element_ty)
        q = _round_half_even(tl.math.div_rn(y, scale)) + zero
        q = tl.minimum(tl.maximum(q, qmin * 1.0), qmax * 1.0)
        if OUT == 1:
            tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=mask)
            rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
            tl.store(scale_ptr + rows, tl.reshape(scale, (ROWS,)), mask=rows < n_rows)
            tl.store(zero_ptr + rows, tl.reshape(zero, (ROWS,)), mask=rows < n_rows)
        else:
            tl.store(out_ptr + offs, ((q - zero) * scale).to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=32)
def _padded_base(m: int, m_pad: int, device: torch.device) -> torch.Tensor:
    """H_m as float32 [m_pad, m_pad], zero outside [:m, :m] (the padding rows rotate to 0)."""
    h = torch.zeros(m_pad, m_pad, dtype=torch.float32)
    h[:m, :m] = base_hadamard(m).float()
    return h.to(device)


def _check_input(x: torch.Tensor, what: str) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{what} needs a float32, float16 or bfloat16 tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what} needs at least one dimension (rows of the last dim), got a scalar")


def _layout(n: int, rotate: bool) -> tuple[int, int, int, int]:
    """(m, m_pad, P, log2 P) of a row of n: n = m * P with the Hadamard's base m, or m = 1 and P =
    next_pow2(n) for the quantizer alone. NoHadamardError before any launch when n has none."""
    m, k = _require(n) if rotate else (1, 0)
    p = 1 << k if rotate else triton.next_power_of_2(n)
    m_pad = 1 if m == 1 else triton.next_power_of_2(m)
    if m_pad * p > MAX_TILE:
        raise ValueError(f"a row of {n} features pads to {m_pad * p} > MAX_TILE = {MAX_TILE} elements, more than "
                         f"one Triton program holds; use the torch op (torch.ops.fxquant.hadamard / fake_quant)")
    return m, m_pad, p, k


def supports(n: int, rotate: bool = True) -> bool:
    """Whether rows of n features fit these kernels (a Hadamard of order n exists and fits MAX_TILE)."""
    try:
        _layout(n, rotate)
    except (NoHadamardError, ValueError):
        return False
    return True


def _launch(x: torch.Tensor, rotate: bool, out_kind: int, quant: tuple[int, bool, float]):
    """Run the kernel over the rows of x (any layout; read through a contiguous copy when strided).
    Returns (out [..., n] contiguous, scale [..., 1], zero [..., 1]); scale/zero only for OUT_CODES."""
    n = x.shape[-1]
    m, m_pad, p, log_p = _layout(n, rotate)
    bits, symmetric, clip = quant
    xc = x.contiguous()
    n_rows = xc.numel() // n if n else 0
    out_dtype = x.dtype if out_kind != OUT_CODES else torch.int8 if symmetric else torch.uint8
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    if n_rows == 0:
        return out, scale, zero
    rows = min(triton.next_power_of_2(n_rows), max(1, TILE_TARGET // (m_pad * p)))
    if m_pad > 1:
        rows = max(rows, 16 // p)  # tl.dot needs at least 16 columns
    base = _padded_base(m, m_pad, x.device) if m_pad > 1 else xc
    tile = m_pad * rows * p
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # launch on x's GPU
        _rotate_quantize_kernel[(triton.cdiv(n_rows, rows),)](
            xc, out, scale, zero, base, n_rows, n, m, 1.0 / math.sqrt(n) if rotate else 1.0, float(clip),
            M_PAD=m_pad, P=p, LOG_P=log_p, ROWS=rows, OUT=out_kind, BITS=bits, SYMMETRIC=symmetric,
            num_warps=min(16, max(1, tile // 512)))
    return out, scale, zero


def _like(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y (contiguous, x's shape) laid out like x, as the reference ops return (q/k arrive transposed)."""
    return y if x.is_contiguous() else torch.empty_like(x, dtype=y.dtype).copy_(y)


def _quant(bits: int, symmetric: bool, clip_ratio: float) -> tuple[int, bool, float]:
    """The quantizer's arguments, checked as a QuantFormat checks them (bits in 2, 3, 4, 8)."""
    QuantFormat(bits, symmetric, None, "int")  # RecipeError listing the allowed bits, before any launch
    return bits, symmetric, clip_ratio


# custom_op, not triton_op: under TRITON_INTERPRET=1 wrap_triton hands back the interpreted kernel,
# and triton_op's fake / functional tracing then launches it on fake tensors (fails on torch 2.13).
@torch.library.custom_op("fxquant::triton_hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x @ H^T / sqrt(n) over the last dim, laid out like x (= fxquant::hadamard).

    Example::

        >>> y = hadamard(torch.randn(4, 576, device="cuda"))   # 576 = 36 * 2^4: butterfly + 36 x 36 base
    """
    _check_input(x, "triton_hadamard")
    return _like(x, _launch(x, True, OUT_ROTATED, (8, True, 1.0))[0])


@torch.library.custom_op("fxquant::triton_hadamard_quantize", mutates_args=())
def hadamard_quantize_op(x: torch.Tensor, bits: int, symmetric: bool,
                         clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [..., n], scale [..., 1], zero [..., 1]) of hadamard(x) per row; zero is 0 when
    symmetric (an op schema has no optional output: `hadamard_quantize` returns None there)."""
    _check_input(x, "triton_hadamard_quantize")
    return _launch(x, True, OUT_CODES, _quant(bits, symmetric, clip_ratio))


def hadamard_quantize(x: torch.Tensor, bits: int, symmetric: bool,
                      clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fused Hadamard quantizer: codes (int8 signed when symmetric, uint8 0..2^b-1 otherwise),
    float32 scale and integer-valued zero (None when symmetric), so x_hat = (codes - zero) * scale.

    Example::

        >>> codes, scale, zero = hadamard_quantize(x, 4, True)   # x [tokens, 4096] -> int8 codes in [-8, 7]
    """
    codes, scale, zero = hadamard_quantize_op(x, bits, symmetric, clip_ratio)
    return codes, scale, None if symmetric else zero


@torch.library.custom_op("fxquant::triton_hadamard_fake_quant", mutates_args=())
def hadamard_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    """fake_quant(hadamard(x)) in one pass: x_hat in x's dtype, laid out like x."""
    _check_input(x, "triton_hadamard_fake_quant")
    return _like(x, _launch(x, True, OUT_VALUES, _quant(bits, symmetric, clip_ratio))[0])


@torch.library.custom_op("fxquant::triton_fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> torch.Tensor:
    """x rounded to `bits` bits with one scale per row of the last dim (= fxquant::fake_quant), any n."""
    _check_input(x, "triton_fake_quant")
    return _like(x, _launch(x, False, OUT_VALUES, _quant(bits, symmetric, clip_ratio))[0])


@hadamard.register_fake
def _hadamard_fake(x):
    return torch.empty_like(x)


@hadamard_quantize_op.register_fake
def _hadamard_quantize_fake(x, bits, symmetric, clip_ratio=1.0):
    rows = (*x.shape[:-1], 1)
    codes = x.new_empty(x.shape, dtype=torch.int8 if symmetric else torch.uint8)
    return codes, x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@hadamard_fake_quant.register_fake
def _hadamard_fake_quant_fake(x, bits, symmetric, clip_ratio=1.0):
    return torch.empty_like(x)


@fake_quant.register_fake
def _fake_quant_fake(x, bits, symmetric, clip_ratio=1.0):
    return torch.empty_like(x)
