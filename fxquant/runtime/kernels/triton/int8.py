"""int8 activation kernels for NVIDIA GPUs: the per-token quantizer, W8A8 and W4A8 GEMMs.

Entry points: `quantize_per_token_int8` (`fxquant::triton_quantize_per_token_int8`), `int8_linear`
(`fxquant::triton_int8_linear`), `w8a8_linear` (quantize, then GEMM) and `w4a8_linear`
(`fxquant::triton_w4a8_linear`); `prepare_int8` turns fxquant's stored int8 codes (uint8, q + 128)
into the signed [N, K] the GEMM reads. The one idea: products are summed in int32 by tl.dot, exactly,
and the float scales are applied once in the epilogue, y = acc * s_x[m] * s_w[n] (+ b); W4A8 unpacks
int4 nibbles to int8 in registers (Hopper has no int4 tensor cores) and, when grouped, scales each
group's exact int32 partial sum. Activations are symmetric int8 only (scale = max|x| * clip / 127),
the format of `fxquant::fake_quant(x, 8, True, clip)`.
"""
# no `from __future__ import annotations`: triton 3.0 reads constexpr only from evaluated annotations

import torch
import triton
import triton.language as tl

from fxquant.runtime.kernels.triton.int4 import FLOAT_DTYPES, Int4Weight, TileConfig, check_group, register_op

INT8_MIN_BLOCK_K = 32  # int8 tl.dot needs K tiles of at least 32
W4A8_MIN_BLOCK_K = 64  # ... and W4A8 feeds it half tiles (even / odd columns)
QUANT_BLOCK = 1024  # the per-token quantizer reads a row in chunks of at most this many
# tiles by M bucket: (max M, TileConfig); int8 GEMMs are short on M for decode, square for prefill
INT8_TILES = ((16, TileConfig(16, 64, 128)), (64, TileConfig(64, 64, 128)), (None, TileConfig(128, 128, 64, 1, 8)))


def tile_config(m: int, k: int, min_block_k: int, tiles=INT8_TILES) -> TileConfig:
    """The tile for m tokens (by M bucket), its K tile shrunk to no more than K needs."""
    for max_m, cfg in tiles:
        if max_m is None or m <= max_m:
            bk = max(min_block_k, min(cfg.block_k, triton.next_power_of_2(k)))
            return TileConfig(cfg.block_m, cfg.block_n, bk, 1, cfg.num_warps)
    raise AssertionError("the last tile bucket has no bound")


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, clip_ratio, BLOCK: tl.constexpr):
    """Row m of x: s = max|x| * clip / 127 (>= 1e-8, rounded to x's dtype), q = clamp(round(x / s))."""
    m = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) * clip_ratio / 127.0, 1e-8)
    scale = scale.to(x_ptr.dtype.element_ty).to(tl.float32)  # stored in x's dtype, as the reference's is
    tl.store(s_ptr + m, scale)
    safe = tl.where(scale > 0, scale, 1.0)  # 1e-8 underflows in fp16: a (near-)zero row codes to 0, not NaN
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x / safe, -128.0), 127.0)  # clamp then round == round then clamp
        q = (y + 12582912.0) - 12582912.0  # + 1.5 * 2^23 rounds |y| < 2^22 half to even, as torch.round
        tl.store(q_ptr + m * K + k, q.to(tl.int8), mask=k < K)


def _quantize_fake(x, clip_ratio=1.0):
    k = x.shape[-1]
    return x.new_empty(x.numel() // k, k, dtype=torch.int8), x.new_empty(x.numel() // k, 1, dtype=torch.float32)


@register_op("fxquant::triton_quantize_per_token_int8", _quantize_rows_kernel, _quantize_fake)
def triton_quantize_per_token_int8(x: torch.Tensor, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [M, K], scale float32 [M, 1]) of x [..., K], one symmetric scale per row."""
    if x.dtype not in FLOAT_DTYPES or x.numel() == 0:
        raise ValueError(f"quantize_per_token_int8: expected a non-empty x in one of {list(FLOAT_DTYPES)}, "
                         f"got {x.dtype} {tuple(x.shape)}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    block = min(QUANT_BLOCK, triton.next_power_of_2(k))
    torch.library.wrap_triton(_quantize_rows_kernel)[(x2.shape[0],)](x2, q, s, k, clip_ratio, BLOCK=block)
    return q, s


def quantize_per_token_int8(x: torch.Tensor, symmetric: bool = True,
                            clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 codes and scales of x [..., K]: x ~= codes * scale (symmetric only)."""
    if not symmetric:
        raise ValueError("quantize_per_token_int8: only symmetric int8 activations are supported")
    return torch.ops.fxquant.triton_quantize_per_token_int8(x, clip_ratio)


@triton.jit
def _epilogue(acc, m, n, xs_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr):
    """Store y = acc * s_x[m] (+ bias[n]) for the float32 tile acc (weight scales already applied)."""
    acc = acc * tl.load(xs_ptr + m, mask=m < M, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    mask = (m[:, None] < M) & (n[None, :] < N)
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_gemm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (M block, N block): acc = x_q W_q^T in int32, then y = acc * s_x[m] * s_w[n] (+ b)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0)
        b = tl.load(w_ptr + n[None, :] * K + k[:, None], mask=(n[None, :] < N) & (k[:, None] < K), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    ws = tl.load(ws_ptr + n, mask=n < N, other=0.0)
    _epilogue(acc.to(tl.float32) * ws[None, :], m, n, xs_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS)


def check_codes(x_codes: torch.Tensor, x_scale: torch.Tensor, n: int, what: str) -> None:
    """ValueError unless x_codes is int8 [M, K] with float32 scales [M, 1] and M, K, n non-zero."""
    if x_codes.dtype != torch.int8 or x_codes.dim() != 2 or 0 in (*x_codes.shape, n):
        raise ValueError(f"{what}: expected int8 activation codes [M, K], got {x_codes.dtype} "
                         f"{tuple(x_codes.shape)} (N = {n})")
    if x_scale.dtype != torch.float32 or x_scale.shape != (x_codes.shape[0], 1):
        raise ValueError(f"{what}: expected float32 scales [{x_codes.shape[0]}, 1], got {x_scale.dtype} "
                         f"{tuple(x_scale.shape)}")


def _linear_fake(x_codes, x_scale, w_codes, w_scale, bias, out_dtype):
    return x_codes.new_empty(x_codes.shape[0], w_scale.shape[-1], dtype=out_dtype)


@register_op("fxquant::triton_int8_linear", _int8_gemm_kernel, _linear_fake)
def triton_int8_linear(x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] = (x_codes w_codes^T) * x_scale * w_scale^T (+ bias), for int8 w_codes [N, K] and
    float32 w_scale [N]."""
    (m, k), n = x_codes.shape, w_codes.shape[0]
    check_codes(x_codes, x_scale, n, "triton_int8_linear")
    if w_codes.dtype != torch.int8 or w_codes.shape != (n, k) or w_scale.shape != (n,):
        raise ValueError(f"triton_int8_linear: expected int8 weight codes [{n}, {k}] and float32 scales [{n}], "
                         f"got {w_codes.dtype} {tuple(w_codes.shape)} and {tuple(w_scale.shape)}")
    cfg = tile_config(m, k, INT8_MIN_BLOCK_K)
    y = torch.empty(m, n, dtype=out_dtype, device=x_codes.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    torch.library.wrap_triton(_int8_gemm_kernel)[grid](
        x_codes.contiguous(), w_codes.contiguous(), x_scale, w_scale.float(), w_scale if bias is None else bias, y,
        m, n, k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps)
    return y


def prepare_int8(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fxquant's symmetric per-channel int8 weight (codes uint8 [N, K] holding q + 128, scale
    [N, 1]) as the GEMM reads it: (int8 q [N, K], float32 scale [N]); run once per weight."""
    if codes.dtype != torch.uint8 or scale.shape != (codes.shape[0], 1):
        raise ValueError(f"prepare_int8: expected uint8 codes [N, K] and scales [N, 1] (symmetric, per "
                         f"channel), got {codes.dtype} {tuple(codes.shape)} and {tuple(scale.shape)}")
    return (codes.to(torch.int16) - 128).to(torch.int8), scale.float().reshape(-1).contiguous()


def int8_linear(x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = (x_codes w_codes^T) * x_scale * w_scale (+ bias): int8 [M, K] x int8 [N, K] -> `out_dtype`."""
    return torch.ops.fxquant.triton_int8_linear(x_codes, x_scale, w_codes, w_scale.reshape(-1), bias, out_dtype)


def w8a8_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, clip_ratio: float = 1.0) -> torch.Tensor:
    """y ~= fake_quant(x) W^T + b for x [..., K]: x quantized per token (dynamic), then the int8 GEMM;
    in x's dtype."""
    codes, scale = quantize_per_token_int8(x, clip_ratio=clip_ratio)
    y = int8_linear(codes, scale, w_codes, w_scale, bias, x.dtype)
    return y.view(*x.shape[:-1], w_codes.shape[0])


@triton.jit
def _w4a8_gemm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, K, GROUP,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (M block, N block): int4 nibbles -> int8 q = c - 8, int32 sums per group, each scaled
    by s_w[group, n] as the group ends; then y = acc * s_x[m] (+ b)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        c = tl.load(w_ptr + j[:, None] * N + n[None, :], mask=(j[:, None] < (K + 1) // 2) & (n[None, :] < N), other=8)
        ke = k0 + 2 * tl.arange(0, BLOCK_K // 2)  # even columns; odd ones are ke + 1
        xp = x_ptr + m[:, None] * K + ke[None, :]
        xe = tl.load(xp, mask=(m[:, None] < M) & (ke[None, :] < K), other=0)
        xo = tl.load(xp + 1, mask=(m[:, None] < M) & (ke[None, :] + 1 < K), other=0)
        part += tl.dot(xe, ((c & 15).to(tl.int16) - 8).to(tl.int8), out_dtype=tl.int32)
        part += tl.dot(xo, ((c >> 4).to(tl.int16) - 8).to(tl.int8), out_dtype=tl.int32)
        if ((k0 + BLOCK_K) % GROUP == 0) | (k0 + BLOCK_K >= K):  # the group (or the row) ends here
            ws = tl.load(ws_ptr + (k0 // GROUP) * N + n, mask=n < N, other=0.0)
            acc += part.to(tl.float32) * ws[None, :]
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    _epilogue(acc, m, n, xs_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS)


def _w4a8_fake(x_codes, x_scale, codes, scale, bias, out_dtype):
    return x_codes.new_empty(x_codes.shape[0], codes.shape[1], dtype=out_dtype)


@register_op("fxquant::triton_w4a8_linear", _w4a8_gemm_kernel, _w4a8_fake)
def triton_w4a8_linear(x_codes: torch.Tensor, x_scale: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] for int8 activations and a symmetric int4 weight in `Int4Weight` layout (codes uint8
    [ceil(K/2), N], float32 scales [groups, N]): sum_g (x_g q_g^T) * s_w[g] * s_x (+ bias)."""
    (m, k), n = x_codes.shape, codes.shape[1]
    check_codes(x_codes, x_scale, n, "triton_w4a8_linear")
    if codes.dtype != torch.uint8 or codes.shape[0] != (k + 1) // 2 or scale.shape[1] != n:
        raise ValueError(f"triton_w4a8_linear: expected uint8 codes [{(k + 1) // 2}, N] and scales [groups, N] "
                         f"for K = {k}, got {codes.dtype} {tuple(codes.shape)} and {tuple(scale.shape)}")
    group = check_group(k, scale.shape[0], W4A8_MIN_BLOCK_K)
    cfg = tile_config(m, k, W4A8_MIN_BLOCK_K)
    y = torch.empty(m, n, dtype=out_dtype, device=x_codes.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    torch.library.wrap_triton(_w4a8_gemm_kernel)[grid](
        x_codes.contiguous(), codes, x_scale, scale, scale if bias is None else bias, y, m, n, k, group,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=_divisor_block(cfg.block_k, group, k),
        HAS_BIAS=bias is not None, num_warps=cfg.num_warps)
    return y


def _divisor_block(block_k: int, group: int, k: int) -> int:
    """block_k halved until it divides the group (per channel, group == K: any block_k)."""
    while group != k and group % block_k:
        block_k //= 2
    return block_k


def w4a8_linear(x_codes: torch.Tensor, x_scale: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = x_q W^T * scales (+ bias) for per-token int8 activations and a symmetric int4 `Int4Weight`
    (per channel, or groups that are multiples of 64)."""
    if w.offset is not None:
        raise ValueError("w4a8_linear: the int4 weight must be symmetric (it has a zero point)")
    return torch.ops.fxquant.triton_w4a8_linear(x_codes, x_scale, w.codes, w.scale, bias, out_dtype)
