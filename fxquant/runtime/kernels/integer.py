"""Integer linears for quantized activations (W8A8, W4A8, W4A4): the exact integer product.

Where a layer's input passes an activation quantizer (per token) and its weight is symmetric per
output channel, y = (q_x s_x)(q_w s_w)^T + b = (q_x q_w^T) s_x s_w + b (asymmetric activations:
((q_x - z_x) q_w^T) s_x s_w + b, the zero point's part z_x sum_k q_w[:, k] subtracted in int32): the
quantizer's codes (bit-identical to `fxquant::fake_quant`'s, fxquant.runtime.kernels.quantize)
times the weight codes is an integer matrix, computed exactly, then scaled once in float32.
Two kernels compute it, and agree bit for bit: `torch._int_mm` (int8 x int8 -> int32; fast with
VNNI / AMX, a reference loop without; it needs M > 16, so small M is zero-padded to 17), and a
float32 GEMM on the codes, exact while every partial sum stays below 2^24 (int4 x int4: K < 2^18;
int8 x int8 codes reach 2^14 per product, so K * 2^14 < 2^24 only for K < 1024 in the worst case:
it refuses wider int8 layers). Against the float reference they differ only by its float32 rounding.
"""
from __future__ import annotations

import torch

from fxquant.quant.numerics import integer_epilogue, row_codes
from fxquant.runtime.kernels.define import define
from fxquant.runtime.linear import integer_product_refusal

INT_MM_MIN_M = 17  # torch._int_mm needs M > 16
FLOAT_EXACT = 2 ** 24  # float32 holds every integer up to this


def integer_refusal(layer) -> str | None:
    """Why no integer kernel can run `layer` (a LoweredLinear candidate), or None when one can."""
    if getattr(layer, "act", None) is None:
        return "its input is not quantized (no activation quantizer to take over)"
    return integer_product_refusal(layer)


def float_codes_refusal(layer) -> str | None:
    """`integer_refusal`, plus the bound that keeps a float32 GEMM of the codes exact."""
    reason = integer_refusal(layer)
    if reason is not None:
        return reason
    x_codes = 2 ** (layer.act.bits - 1) if layer.act.symmetric else 2 ** layer.act.bits - 1  # |q_x - z_x| at most
    bound = x_codes * 2 ** (layer.fmt.bits - 1) * layer.in_features
    if bound >= FLOAT_EXACT:
        return (f"|codes| up to {x_codes} x 2^{layer.fmt.bits - 1} over {layer.in_features} inputs can "
                "pass 2^24, where float32 stops being exact")
    return None


def _scales(layer) -> torch.Tensor:
    """The per-channel weight scales [out] in float32 (the epilogue multiplies by them)."""
    return layer.scale[:, 0].float().contiguous()


def to_int_mm(layer) -> dict[str, torch.Tensor]:
    """int8 codes [in, out] (the layout torch._int_mm reads) and float32 scales [out]; for
    asymmetric activations also the row sums of the codes [out] (the zero point's correction), in
    int32 so that casting the model to a float dtype leaves them exact."""
    codes = layer.signed_codes()
    out = {"codes_t": codes.t().contiguous(), "scale": _scales(layer)}
    if layer.act is not None and not layer.act.symmetric:
        out["colsum"] = code_sums(codes)
    return out


def code_sums(codes: torch.Tensor) -> torch.Tensor:
    """sum_k q_w[n, k] per output channel, int32 [out]."""
    return codes.sum(dim=1, dtype=torch.int32).contiguous()


def to_int8_codes(layer) -> dict[str, torch.Tensor]:
    """int8 codes [out, in] and float32 scales [out] (the Triton int8 GEMM's layout)."""
    return {"codes": layer.signed_codes().contiguous(), "scale": _scales(layer)}


def to_float_codes(layer) -> dict[str, torch.Tensor]:
    """float32 codes [out, in] and float32 scales [out]."""
    return {"codes": layer.signed_codes().float().contiguous(), "scale": _scales(layer)}


def _signed_row_codes(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float) -> tuple:
    """Per-token (codes, scale, zero) with asymmetric codes shifted into int8: q' = q - 2^(b-1),
    z' = z - 2^(b-1), so q - z = q' - z' (zero None when symmetric)."""
    q, x_scale, zero = row_codes(x.reshape(-1, x.shape[-1]), bits, symmetric, clip_ratio)
    if zero is not None:
        mid = 2 ** (bits - 1)
        q, zero = q.sub_(mid), zero - mid
    return q, x_scale, zero


def _int_mm_product(x: torch.Tensor, codes_t: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float) -> tuple:
    """(q_x' q_w^T in int32, s_x, z_x') through torch._int_mm (small M zero-padded)."""
    q, x_scale, zero = _signed_row_codes(x, bits, symmetric, clip_ratio)
    m = q.shape[0]
    q8 = q.to(torch.int8)
    if m < INT_MM_MIN_M:
        q8 = torch.nn.functional.pad(q8, (0, 0, 0, INT_MM_MIN_M - m))
    return torch._int_mm(q8, codes_t)[:m], x_scale, zero


def _int_mm_linear(x: torch.Tensor, codes_t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   bits: int, clip_ratio: float) -> torch.Tensor:
    """Quantize x per token (`bits`, symmetric), then (q_x q_w^T) s_x s_w + b through torch._int_mm."""
    acc, x_scale, _ = _int_mm_product(x, codes_t, bits, True, clip_ratio)
    return integer_epilogue(acc, x_scale, scale, bias, x)


def _int_mm_linear_asym(x: torch.Tensor, codes_t: torch.Tensor, scale_colsum: list[torch.Tensor],
                        bias: torch.Tensor | None, bits: int, clip_ratio: float) -> torch.Tensor:
    """Asymmetric per-token x: ((q_x' q_w^T) - z_x' sum_k q_w[:, k]) s_x s_w + b, the sums in int32
    (`scale_colsum`: the weight scales and the row sums of the codes, `code_sums`)."""
    scale, colsum = scale_colsum
    acc, x_scale, zero = _int_mm_product(x, codes_t, bits, False, clip_ratio)
    acc = acc - zero.to(torch.int32) * colsum.to(torch.int32)
    return integer_epilogue(acc, x_scale, scale, bias, x)


def _int_mm_linear_fake(x, codes_t, scale, bias, bits, clip_ratio):
    return x.new_empty(*x.shape[:-1], codes_t.shape[1])


def _float_codes_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                        bits: int, clip_ratio: float) -> torch.Tensor:
    """Quantize x per token, then the integer product as an exact float32 GEMM of the codes."""
    q, x_scale, _ = _signed_row_codes(x, bits, True, clip_ratio)
    return integer_epilogue(q @ codes.t(), x_scale, scale, bias, x)


def _float_codes_linear_asym(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                             bits: int, clip_ratio: float) -> torch.Tensor:
    """Asymmetric per-token x: (q_x - z_x) q_w^T as an exact float32 GEMM of the codes."""
    q, x_scale, zero = _signed_row_codes(x, bits, False, clip_ratio)
    return integer_epilogue((q - zero) @ codes.t(), x_scale, scale, bias, x)


def _float_codes_linear_fake(x, codes, scale, bias, bits, clip_ratio):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


int_mm_linear = define("fxquant::int_mm_linear", _int_mm_linear, _int_mm_linear_fake, inline=True)
int_mm_linear_asym = define("fxquant::int_mm_linear_asym", _int_mm_linear_asym, _int_mm_linear_fake, inline=True)
float_codes_linear = define("fxquant::float_codes_linear", _float_codes_linear, _float_codes_linear_fake, inline=True)
float_codes_linear_asym = define("fxquant::float_codes_linear_asym", _float_codes_linear_asym, _float_codes_linear_fake,
                                 inline=True)
