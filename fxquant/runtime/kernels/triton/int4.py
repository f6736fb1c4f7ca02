"""Weight-only int4 linear for NVIDIA GPUs: y = x W^T + b with W dequantized in registers.

Entry points: `prepare_int4` (fxquant's packed codes -> `Int4Weight`, once, at load or lowering
time) and `int4_linear` / `torch.ops.fxquant.triton_int4_linear`. The one idea: every format reads
as one FMA per weight, w = (c - 8) * s + b, with c the stored nibble and b a float offset per
(group, channel): none (symmetric), the float zero (tinygemm), or (8 - z) * s (integer zero), all
exact in float32 for fp16 / bf16 scales. The bytes are stored K-major ([ceil(K/2), N]): byte j of
column n holds k = 2j (low nibble) and k = 2j + 1 (high), so a tile splits into the products of x's
even and odd columns with the low and high nibbles, and nothing is interleaved in registers. Token
counts up to 16 take a split-K GEMV (fp32 atomics), larger ones a tiled tl.dot GEMM.
"""
# no `from __future__ import annotations`: triton 3.0 reads constexpr only from evaluated annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fxquant.quant.format import QuantFormat

MIN_BLOCK_K = 32  # the smallest K tile: its even / odd halves must feed tl.dot (K >= 16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting(kernel) -> bool:
    """True when `kernel` runs in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def register_op(name: str, kernel, fake):
    """Decorator: the fxquant op `name` whose body launches `kernel` through wrap_triton.

    On a GPU it is a `triton_op`, so torch.compile sees the kernel itself. Under the interpreter
    wrap_triton hands back the raw kernel, which fake and functional tracing would launch on fake
    tensors, so there the op is an opaque `custom_op` with the shape-only `fake`.
    """
    def register(fn):
        if interpreting(kernel):
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, mutates_args=())(fn)
    return register


@dataclass(frozen=True, eq=False)
class Int4Weight:
    """An int4 weight in the kernels' layout: `codes` uint8 [ceil(K/2), N] (K-major, two per byte),
    `scale` and `offset` float32 [groups, N] (offset None: symmetric), for `in_features` K."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]


def check_group(in_features: int, groups: int, min_block: int = MIN_BLOCK_K) -> int:
    """The group size K / groups the kernels read (K itself per channel); ValueError unless it
    divides K and (grouped) is a multiple of `min_block`, the smallest K tile."""
    k = in_features
    if groups == 1:
        return k
    if groups < 1 or k % groups or (k // groups) % min_block:
        raise ValueError(f"int4 kernels need a group size that divides K and is a multiple of {min_block}: "
                         f"K = {k} with {groups} groups (group size {k / max(groups, 1):g})")
    return k // groups


def prepare_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat,
                 in_features: int) -> Int4Weight:
    """fxquant's packed int4 weight (codes uint8 [N, ceil(K/2)], scale / zero [N, groups]) in the
    kernels' layout; run once per weight. Example::

        w = prepare_int4(layer.codes, layer.scale, layer.zero, layer.fmt, layer.in_features)
        y = int4_linear(x, w, layer.bias)       # == layer(x), within float rounding
    """
    n, k = codes.shape[0], in_features
    if fmt.bits != 4 or codes.dtype != torch.uint8 or codes.shape != (n, (k + 1) // 2):
        raise ValueError(f"expected int4 codes uint8 [{n}, {(k + 1) // 2}] for K = {k}, got {fmt.describe()} "
                         f"codes {codes.dtype} {tuple(codes.shape)}")
    groups = 1 if fmt.group_size is None else k // fmt.group_size
    if fmt.group_size is not None and k % fmt.group_size:
        raise ValueError(f"group size {fmt.group_size} does not divide K = {k}")
    check_group(k, groups)
    if scale.shape != (n, groups):
        raise ValueError(f"expected scales [{n}, {groups}] for {fmt.describe()}, got {tuple(scale.shape)}")
    s = scale.float()
    if fmt.symmetric:  # w = (c - 8) * s
        offset = None
    elif fmt.float_zero:  # w = (c - 8) * s + zero
        offset = zero.float()
    else:  # w = (c - z) * s = (c - 8) * s + (8 - z) * s, exact for fp16 / bf16 scales
        offset = (8 - zero.float()) * s
    return Int4Weight(codes.t().contiguous(), s.t().contiguous(),
                      None if offset is None else offset.t().contiguous(), k)


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: tile sizes, K slices (split-K) and warps."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4


# GEMV tiles by padded token count: the [BLOCK_M, BLOCK_K / 2, BLOCK_N] product lives in registers
GEMV_TILES = {1: (64, 128), 2: (64, 64), 4: (32, 64), 8: (32, 32), 16: (16, 32)}  # block_m: (block_n, block_k)
GEMM_TILES = ((64, (32, 64, 64, 4)), (None, (64, 128, 64, 8)))  # (max M, (block_m, block_n, block_k, warps))
GEMV_MAX_M = 16
TARGET_PROGRAMS = 264  # about two waves on an H100 / H200 (132 SMs); split-K fills the rest


def block_k_for(group: int, in_features: int, preferred: int) -> int:
    """The largest power-of-two K tile <= `preferred` inside one group; per channel (group == K),
    no larger than K needs."""
    if group == in_features:
        return max(MIN_BLOCK_K, min(preferred, triton.next_power_of_2(in_features)))
    bk = preferred
    while group % bk:  # check_group made group a multiple of MIN_BLOCK_K
        bk //= 2
    return bk


def gemv_config(m: int, n: int, k: int, group: int) -> TileConfig:
    """Split-K GEMV tiles for m <= 16 tokens: enough (N block, K slice) programs to fill the GPU."""
    bm = triton.next_power_of_2(m)
    bn, bk = GEMV_TILES[bm]
    bk = block_k_for(group, k, bk)
    k_tiles = triton.cdiv(k, bk)
    split = max(1, min(k_tiles, TARGET_PROGRAMS // triton.cdiv(n, bn)))
    return TileConfig(bm, bn, bk, triton.cdiv(k_tiles, triton.cdiv(k_tiles, split)))


def gemm_config(m: int, k: int, group: int, tiles=GEMM_TILES) -> TileConfig:
    """Tiled GEMM tiles for m > 16 tokens, by M bucket."""
    for max_m, (bm, bn, bk, warps) in tiles:
        if max_m is None or m <= max_m:
            return TileConfig(bm, bn, block_k_for(group, k, bk), 1, warps)
    raise AssertionError("the last GEMM bucket has no bound")


@triton.jit
def _dequant_tile(w_ptr, s_ptr, b_ptr, kt, n, cfg_n, K, GROUP, BLOCK_K: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """The K tile `kt` of columns n as (low, high) float32 [BLOCK_K / 2, len(n)]: w = (c - 8) * s + b."""
    j = kt * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask = (j[:, None] < (K + 1) // 2) & (n[None, :] < cfg_n)
    c = tl.load(w_ptr + j[:, None] * cfg_n + n[None, :], mask=mask, other=8)
    g = (kt * BLOCK_K) // GROUP
    s = tl.load(s_ptr + g * cfg_n + n, mask=n < cfg_n, other=0.0)[None, :]
    lo = ((c & 15).to(tl.float32) - 8.0) * s
    hi = ((c >> 4).to(tl.float32) - 8.0) * s
    if HAS_OFFSET:
        b = tl.load(b_ptr + g * cfg_n + n, mask=n < cfg_n, other=0.0)[None, :]
        lo, hi = lo + b, hi + b
    return lo, hi


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, GROUP, TILES_PER_SPLIT,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (N block, K slice): y[:, n] += x[:, slice] W[n, slice]^T, fp32 partials added atomically."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t0 = pid_k * TILES_PER_SPLIT
    t1 = tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    for kt in range(t0, t1):
        lo, hi = _dequant_tile(w_ptr, s_ptr, b_ptr, kt, n, N, K, GROUP, BLOCK_K, HAS_OFFSET)
        ke = kt * BLOCK_K + 2 * tl.arange(0, BLOCK_K // 2)  # even columns; odd ones are ke + 1
        xp = x_ptr + m[:, None] * K + ke[None, :]
        xe = tl.load(xp, mask=(m[:, None] < M) & (ke[None, :] < K), other=0.0)
        xo = tl.load(xp + 1, mask=(m[:, None] < M) & (ke[None, :] + 1 < K), other=0.0)
        lo = lo.to(xe.dtype).to(tl.float32)[None, :, :]  # rounded to the model dtype, as the reference is
        hi = hi.to(xe.dtype).to(tl.float32)[None, :, :]
        acc += tl.sum(xe.to(tl.float32)[:, :, None] * lo + xo.to(tl.float32)[:, :, None] * hi, axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    tl.atomic_add(y_ptr + m[:, None] * N + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _int4_gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, GROUP,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """Program (M block, N block): the tile of y = x W^T, W dequantized tile by tile for tl.dot."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        lo, hi = _dequant_tile(w_ptr, s_ptr, b_ptr, kt, n, N, K, GROUP, BLOCK_K, HAS_OFFSET)
        ke = kt * BLOCK_K + 2 * tl.arange(0, BLOCK_K // 2)
        xp = x_ptr + m[:, None] * K + ke[None, :]
        xe = tl.load(xp, mask=(m[:, None] < M) & (ke[None, :] < K), other=0.0)
        xo = tl.load(xp + 1, mask=(m[:, None] < M) & (ke[None, :] + 1 < K), other=0.0)
        acc += tl.dot(xe, lo.to(xe.dtype), input_precision=PRECISION)
        acc += tl.dot(xo, hi.to(xo.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    mask = (m[:, None] < M) & (n[None, :] < N)
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


FP32_DOT_PRECISION = "ieee"  # fp32 tl.dot defaults to TF32 on GPUs; "tf32" trades exactness for speed


def check_input(x: torch.Tensor, k: int, bias: torch.Tensor | None, what: str) -> None:
    """ValueError unless x is [..., k] in a float dtype and bias (if any) is on x's device."""
    if x.dtype not in FLOAT_DTYPES or x.shape[-1] != k:
        raise ValueError(f"{what}: expected x [..., {k}] in one of {list(FLOAT_DTYPES)}, "
                         f"got {x.dtype} {tuple(x.shape)}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"{what}: bias is on {bias.device}, x on {x.device}")


def _launch(x2: torch.Tensor, codes, scale, offset, bias) -> torch.Tensor:
    """y [M, N] of the 2-D x2: the GEMV for M <= 16 tokens, the GEMM beyond."""
    (m, k), n = x2.shape, codes.shape[1]
    group = check_group(k, scale.shape[0])
    flags = dict(HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None)
    b, bias_ = (scale if offset is None else offset), (scale if bias is None else bias)  # unread when absent
    if m <= GEMV_MAX_M:
        cfg = gemv_config(m, n, k, group)
        y = torch.zeros(m, n, dtype=torch.float32, device=x2.device)
        tiles = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k)
        grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
        torch.library.wrap_triton(_int4_gemv_kernel)[grid](
            x2, codes, scale, b, bias_, y, m, n, k, group, tiles, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, **flags)
        return y.to(x2.dtype)
    cfg = gemm_config(m, k, group)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    torch.library.wrap_triton(_int4_gemm_kernel)[grid](
        x2, codes, scale, b, bias_, y, m, n, k, group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, PRECISION=FP32_DOT_PRECISION, num_warps=cfg.num_warps, **flags)
    return y


def _int4_linear_fake(x, codes, scale, offset, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[1])


@register_op("fxquant::triton_int4_linear", _int4_gemm_kernel, _int4_linear_fake)
def triton_int4_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b for the int4 weight of `Int4Weight` fields (codes, scale, offset), K = x.shape[-1]."""
    k = x.shape[-1]
    check_input(x, k, bias, "triton_int4_linear")
    if codes.shape[0] != (k + 1) // 2 or scale.shape[1] != codes.shape[1]:
        raise ValueError(f"triton_int4_linear: codes {tuple(codes.shape)} / scales {tuple(scale.shape)} "
                         f"do not match K = {k}")
    y = _launch(x.reshape(-1, k).contiguous(), codes, scale, offset, bias)
    return y.view(*x.shape[:-1], codes.shape[1])


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b in x's dtype (fp32 accumulation), for x [..., K] in fp16, bf16 or fp32."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"int4_linear: x {tuple(x.shape)} does not end in K = {w.in_features}")
    return torch.ops.fxquant.triton_int4_linear(x, w.codes, w.scale, w.offset, bias)
