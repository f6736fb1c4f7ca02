"""Integer linears on oneDNN's u8 x s8 GEMM (`onednn::qlinear_pointwise`, CPU): the exact integer
product with int8 weights in memory, one byte per weight.

A decode step reads every weight once, so on a CPU it is bound by memory: the float32 GEMM of the
codes (integer.py) reads four bytes per weight, this kernel one. The activation codes q' (signed,
as integer.py makes them) enter as u8 = q' + 2^(b-1) with that zero point, so oneDNN's int32 sum
is q' q_w^T exactly; with unit scales and a float32 output it comes back exact below 2^24 (the
bound of `integer.float_codes_refusal`), and the epilogue is integer.py's, so the result is
bit-identical to `torch._int_mm` and the float32 GEMM of the codes. Without VNNI, oneDNN adds
adjacent u8 x s8 products in saturating int16 (vpmaddubsw): `saturates()` measures that once per
process, and there a layer whose pairs can pass 2^15 (8-bit activations) is refused.

oneDNN reads the weight in its own blocked layout, an opaque tensor that cannot be a buffer (it
has no storage to copy or save); `_packed` makes it once per codes tensor and keeps it while that
tensor lives, so the op takes the plain int8 codes and stays traceable.
"""
from __future__ import annotations

import functools
import weakref

import torch

from fxquant.quant.numerics import integer_epilogue, row_codes
from fxquant.runtime.kernels import integer
from fxquant.runtime.kernels.define import define

PAIR_LIMIT = 2 ** 15  # an int16 pair sum saturates from here


@functools.cache
def unavailable() -> str | None:
    """Why oneDNN's u8 x s8 GEMM cannot run here (None: it can)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    try:
        codes = torch.tensor([[3, -2, 1, 0]], dtype=torch.int8).repeat(4, 4)
        x = torch.tensor([[1, 5, 0, 2]] * 4, dtype=torch.uint8).repeat(1, 4)
        y = _product(x, 0, torch.ops.onednn.qlinear_prepack(codes, None), codes.shape[0])
    except (AttributeError, RuntimeError) as exc:
        return f"onednn::qlinear_pointwise does not run here ({str(exc).splitlines()[0][:120]})"
    if not torch.equal(y, x.float() @ codes.float().t()):
        return "onednn::qlinear_pointwise returned a wrong product on a test case here"
    return None


@functools.cache
def saturates() -> bool:
    """Whether u8 x s8 pair sums saturate at int16 on this CPU (no VNNI): 255 x 127 in every pair."""
    codes = torch.full((8, 64), 127, dtype=torch.int8)
    x = torch.full((1, 64), 255, dtype=torch.uint8)
    y = _product(x, 0, torch.ops.onednn.qlinear_prepack(codes, None), 8)
    return not torch.equal(y, torch.full((1, 8), 255.0 * 127 * 64))


def onednn_refusal(layer) -> str | None:
    """Why this kernel cannot run `layer` (a LoweredLinear candidate), or None when it can."""
    reason = integer.float_codes_refusal(layer) or unavailable()
    if reason is not None:
        return reason
    pair = 2 * (2 ** layer.act.bits - 1) * 2 ** (layer.fmt.bits - 1)
    if pair >= PAIR_LIMIT and saturates():
        return (f"{layer.act.bits}-bit activations x {layer.fmt.bits}-bit weights: oneDNN adds pairs of "
                "products in saturating int16 on this CPU (no VNNI)")
    return None


def to_onednn(layer) -> dict[str, torch.Tensor]:
    """int8 codes [out, in] and float32 scales [out]; for asymmetric activations also the row sums
    of the codes in int32 (the zero point's correction), as integer.py's."""
    codes = layer.signed_codes().contiguous()
    out = {"codes": codes, "scale": layer.scale[:, 0].float().contiguous()}
    if not layer.act.symmetric:
        out["colsum"] = integer.code_sums(codes)
    return out


_PACKS: dict[int, tuple] = {}  # id(codes) -> (weakref to codes, its _version, packed weight, unit scales, zeros)


def _packed(codes: torch.Tensor) -> tuple:
    """(oneDNN's packed weight, unit scales, zero points) for `codes` [out, in], made once while the
    tensor lives and is not written to."""
    entry = _PACKS.get(id(codes))
    if entry is None or entry[0]() is not codes or entry[1] != codes._version:
        n = codes.shape[0]
        entry = (weakref.ref(codes), codes._version, torch.ops.onednn.qlinear_prepack(codes, None),
                 torch.ones(n), torch.zeros(n, dtype=torch.long))
        key = id(codes)
        _PACKS[key] = entry
        weakref.finalize(codes, _PACKS.pop, key, None)
    return entry[2:]


def _product(x_u8: torch.Tensor, zero: int, packed: torch.Tensor, n: int, ones=None, zeros=None) -> torch.Tensor:
    """(x_u8 - zero) q_w^T in float32 (exact below 2^24), through oneDNN with unit scales."""
    ones = torch.ones(n) if ones is None else ones
    zeros = torch.zeros(n, dtype=torch.long) if zeros is None else zeros
    return torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, zero, packed, ones, zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def _onednn_product(x: torch.Tensor, codes: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float) -> tuple:
    """(q_x' q_w^T in float32, s_x, z_x'): x quantized per token, its codes through oneDNN. The u8
    input is q' + 2^(b-1): the symmetric codes shifted up, the asymmetric codes as `row_codes` gives
    them (integer.py's q' and z' are those minus 2^(b-1))."""
    q, x_scale, zero = row_codes(x.reshape(-1, x.shape[-1]), bits, symmetric, clip_ratio)
    mid = 2 ** (bits - 1)
    packed, ones, zeros = _packed(codes)
    u8 = (q if zero is not None else q.add_(mid)).to(torch.uint8)
    return _product(u8, mid, packed, codes.shape[0], ones, zeros), x_scale, None if zero is None else zero - mid


def _onednn_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   bits: int, clip_ratio: float) -> torch.Tensor:
    """Quantize x per token (`bits`, symmetric), then (q_x q_w^T) s_x s_w + b on oneDNN."""
    acc, x_scale, _ = _onednn_product(x, codes, bits, True, clip_ratio)
    return integer_epilogue(acc, x_scale, scale, bias, x)


def _onednn_linear_asym(x: torch.Tensor, codes: torch.Tensor, scale_colsum: list[torch.Tensor],
                        bias: torch.Tensor | None, bits: int, clip_ratio: float) -> torch.Tensor:
    """Asymmetric per-token x: ((q_x' q_w^T) - z_x' sum_k q_w[:, k]) s_x s_w + b, the correction in
    float32 (exact: every term is an integer below 2^24)."""
    scale, colsum = scale_colsum
    acc, x_scale, zero = _onednn_product(x, codes, bits, False, clip_ratio)
    return integer_epilogue(acc.sub_(zero * colsum), x_scale, scale, bias, x)


def _onednn_linear_fake(x, codes, scale, bias, bits, clip_ratio):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


onednn_linear = define("fxquant::onednn_linear", _onednn_linear, _onednn_linear_fake)
onednn_linear_asym = define("fxquant::onednn_linear_asym", _onednn_linear_asym, _onednn_linear_fake)
