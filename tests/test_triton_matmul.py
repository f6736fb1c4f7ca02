"""The Triton matmul kernels (int4 weight-only, int8 W8A8, W4A8) against fxquant's torch references.

On a CPU machine conftest sets TRITON_INTERPRET=1, so every kernel runs in Triton's interpreter on
small shapes, fp32 and fp16 only (the interpreter's bf16 math is not exact). References: the packed
`QuantizedLinear` (fxquant::quantized_linear) for int4, `fake_quantize` / `qparams` for the
per-token quantizer, int64 matmuls for every integer product.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fxquant.quant.format import QuantFormat  # noqa: E402
from fxquant.quant.numerics import fake_quantize, qparams, quantize, quantized_weight, weight_qparams  # noqa: E402
from fxquant.quant.packed import unpack_int4  # noqa: E402
from fxquant.runtime.kernels.triton.int4 import (  # noqa: E402
    Int4Weight, gemv_config, int4_linear, prepare_int4)
from fxquant.runtime.kernels.triton.int8 import (  # noqa: E402
    int8_linear, prepare_int8, quantize_per_token_int8, w4a8_linear, w8a8_linear)
from fxquant.runtime.linear import QuantizedLinear  # noqa: E402

INT8 = QuantFormat(8, True, None, "int")  # the per-token activation format
INT4_FORMATS = {
    "sym_per_channel": QuantFormat(4, True, None),
    "float_zero_g64": QuantFormat(4, False, 64, "float"),  # tinygemm / HQQ
    "int_zero_g32": QuantFormat(4, False, 32, "int"),  # GPTQ / AWQ
}
TOKENS = (1, 3, 16, 33)  # GEMV (<= 16, split-K) and GEMM paths; 33 spans two M tiles of 32
SHAPES = ((192, 40), (128, 72))  # (K, N): N not a multiple of the N tiles; 192 not a power of two


def packed_layer(fmt: QuantFormat, k: int, n: int, dtype=torch.float32, bias=False, seed=0) -> QuantizedLinear:
    """A QuantizedLinear holding a random [n, k] weight rounded in `fmt` (scales stored in dtype)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    s, z = weight_qparams(w, fmt, dtype=dtype)
    qw = quantized_weight(quantize(w, s, z, fmt), s, z, fmt, dtype)
    return QuantizedLinear.from_weight(qw, torch.randn(n, generator=g).to(dtype) if bias else None)


def prepared(layer: QuantizedLinear) -> Int4Weight:
    return prepare_int4(layer.codes, layer.scale, layer.zero, layer.fmt, layer.in_features)


def assert_matches(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """y == ref within `rel` of ref's largest magnitude (float rounding of the sum order), same dtype."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert ref.abs().max() > 1.0  # the comparison is not vacuous
    torch.testing.assert_close(y.float(), ref.float(), rtol=rel, atol=rel * ref.float().abs().max().item())


# ---------------------------------------------------------------- int4 weight-only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(INT4_FORMATS))
def test_int4_linear_matches_quantized_linear(name, shape, m, dtype):
    (k, n), fmt = shape, INT4_FORMATS[name]
    layer = packed_layer(fmt, k, n, dtype, bias=m % 2 == 1)  # bias on the odd token counts
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = int4_linear(x, prepared(layer), layer.bias)
    # fp32: sum order only; fp16: both round w the same way, y rounds to fp16 (2^-11) after the sum
    assert_matches(y, layer(x), 1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("m", (1, 33))
def test_int4_linear_odd_k_per_channel_and_leading_dims(m):
    """K = 95: the last byte's high nibble is padding; x [2, m, K] keeps its leading dims."""
    layer = packed_layer(INT4_FORMATS["sym_per_channel"], 95, 24, bias=True)
    x = torch.randn(2, m, 95)
    y = int4_linear(x, prepared(layer), layer.bias)
    assert y.shape == (2, m, 24)
    assert_matches(y, layer(x), 1e-5)


def test_int4_gemv_splits_k_for_the_test_shapes():
    """Non-vacuity: the GEMV shapes above reduce several K slices through the atomics."""
    assert gemv_config(1, 72, 128, 32).split_k > 1
    assert gemv_config(16, 40, 192, 192).split_k > 1


def test_prepared_int4_layout_reads_the_same_weight():
    """The K-major bytes and float offsets dequantize to exactly fxquant's reference weight."""
    for fmt in INT4_FORMATS.values():
        layer = packed_layer(fmt, 192, 40, torch.float16)
        w = prepared(layer)
        c = unpack_int4(w.codes.t())[:, :192].float()  # [N, K] nibbles
        size = 192 // w.scale.shape[0]
        s = w.scale.t().repeat_interleave(size, dim=1)
        b = 0.0 if w.offset is None else w.offset.t().repeat_interleave(size, dim=1)
        assert torch.equal(((c - 8) * s + b).to(torch.float16), layer.weight_values())


def test_int4_linear_opcheck():
    layer = packed_layer(INT4_FORMATS["int_zero_g32"], 64, 24, bias=True)
    w = prepared(layer)
    for m in (2, 17):
        torch.library.opcheck(torch.ops.fxquant.triton_int4_linear, (torch.randn(m, 64), w.codes, w.scale,
                                                                     w.offset, layer.bias))


def test_int4_rejects_unsupported_shapes():
    codes, scale = torch.zeros(8, 48, dtype=torch.uint8), torch.ones(8, 2)
    with pytest.raises(ValueError, match=r"K = 96 with 2 groups \(group size 48\)"):
        prepare_int4(codes, scale, None, QuantFormat(4, True, 48), 96)  # 48: no K tile fits a group
    with pytest.raises(ValueError, match="group size 64 does not divide K = 96"):
        prepare_int4(codes, scale, None, QuantFormat(4, True, 64), 96)
    w = prepared(packed_layer(INT4_FORMATS["sym_per_channel"], 96, 8))
    with pytest.raises(ValueError, match=r"does not end in K = 96"):
        int4_linear(torch.randn(3, 64), w)


# ---------------------------------------------------------------- per-token int8 quantizer


@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_per_token_matches_the_reference_codes(dtype, clip):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 5, 300, generator=g) * torch.rand(2, 5, 1, generator=g) * 4).to(dtype)  # K > 256: 2 chunks
    x[0, 0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5])  # ties: round half to even
    if dtype == torch.float32:
        x[1, 4] = 0  # an all-zero row takes the smallest scale (fp16: see the next test)
    codes, scale = quantize_per_token_int8(x, clip_ratio=clip)
    ref_scale, _ = qparams(x.reshape(10, 300), INT8, clip)
    assert torch.equal(scale, ref_scale.reshape(10, 1))
    assert torch.equal(codes, quantize(x.reshape(10, 300), ref_scale, None, INT8).to(torch.int8))
    assert torch.equal((codes * scale).to(dtype).reshape(x.shape), fake_quantize(x, INT8, clip))
    if clip == 1.0 and dtype == torch.float32:
        assert codes[0, :6].tolist() == [127, 0, 2, 2, 0, -2]


def test_quantize_per_token_zero_row_in_fp16():
    """The reference's smallest scale, 1e-8, is 0 in fp16 (its codes are 0 / 0 = NaN); the kernel
    stores the same scale 0 and codes 0, so the row dequantizes to zeros."""
    x = torch.zeros(2, 64, dtype=torch.float16)
    x[0] = 1e-7  # amax / 127 underflows too
    codes, scale = quantize_per_token_int8(x)
    assert torch.equal(scale, qparams(x, INT8)[0].reshape(2, 1)) and not scale.any()
    assert not codes.any()


def test_quantize_per_token_rejects_asymmetric():
    with pytest.raises(ValueError, match="only symmetric"):
        quantize_per_token_int8(torch.randn(2, 8), symmetric=False)


# ---------------------------------------------------------------- int8 x int8 GEMM


def int_codes(*shape, seed=3) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("m", TOKENS)
def test_int8_gemm_integer_product_is_exact(m):
    """Unit scales: y is the int32 accumulator itself (|acc| < 2^24, so exact in float32)."""
    x, w = int_codes(m, 200), int_codes(40, 200, seed=4)
    y = int8_linear(x, torch.ones(m, 1), w, torch.ones(40))
    assert torch.equal(y, (x.long() @ w.long().T).float())


def test_int8_gemm_epilogue():
    g = torch.Generator().manual_seed(5)
    x, w = int_codes(33, 96), int_codes(40, 96, seed=6)
    xs, ws = torch.rand(33, 1, generator=g) / 64, torch.rand(40, generator=g) / 64  # |y| < 400: fits fp16
    bias = torch.randn(40, generator=g)
    ref = (x.long() @ w.long().T).double() * xs.double() * ws.double() + bias.double()
    for out_dtype in (torch.float32, torch.float16):
        y = int8_linear(x, xs, w, ws, bias, out_dtype)
        assert y.dtype == out_dtype
        assert_matches(y.double(), ref, 1e-6 if out_dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", TOKENS)
def test_w8a8_linear_matches_fake_quant_reference(m, dtype):
    layer = packed_layer(QuantFormat(8, True, None), 96, 40, dtype, bias=m != 16)
    w_codes, w_scale = prepare_int8(layer.codes, layer.scale)
    assert torch.equal((w_codes.float() * w_scale[:, None]).to(dtype), layer.weight_values())
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(7)).to(dtype)
    y = w8a8_linear(x, w_codes, w_scale, layer.bias)
    ref = torch.nn.functional.linear(fake_quantize(x, INT8), layer.weight_values(), layer.bias)
    assert_matches(y, ref, 1e-5 if dtype == torch.float32 else 2e-3)


def test_int8_ops_opcheck():
    x, w = torch.randn(3, 64), int_codes(24, 64)
    torch.library.opcheck(torch.ops.fxquant.triton_quantize_per_token_int8, (x, 0.9))
    codes, scale = quantize_per_token_int8(x)
    torch.library.opcheck(torch.ops.fxquant.triton_int8_linear,
                          (codes, scale, w, torch.rand(24), torch.randn(24), torch.float32))


# ---------------------------------------------------------------- W4A8


def int4_symmetric(k: int, n: int, group: int | None) -> tuple[Int4Weight, QuantizedLinear]:
    layer = packed_layer(QuantFormat(4, True, group), k, n)
    return prepared(layer), layer


@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("k,group", [(96, None), (95, None), (192, 64), (256, 128)])
def test_w4a8_matches_integer_and_float_references(k, group, m):
    w, layer = int4_symmetric(k, 40, group)
    x = int_codes(m, k, seed=8)
    q = unpack_int4(layer.codes)[:, :k].long() - 8  # signed int4 weight codes [N, K]
    unit = Int4Weight(w.codes, torch.ones_like(w.scale), None, k)  # unit scales: the exact integer product
    assert torch.equal(w4a8_linear(x, torch.ones(m, 1), unit), (x.long() @ q.T).float())
    xs = torch.rand(m, 1, generator=torch.Generator().manual_seed(9)) / 64
    bias = torch.randn(40)
    y = w4a8_linear(x, xs, w, bias)
    ref = torch.nn.functional.linear(x.float() * xs, layer.weight_values(), bias)
    assert_matches(y, ref, 1e-5)


def test_w4a8_opcheck():
    w, _ = int4_symmetric(128, 24, 64)
    torch.library.opcheck(torch.ops.fxquant.triton_w4a8_linear,
                          (int_codes(3, 128), torch.rand(3, 1), w.codes, w.scale, None, torch.float32))


def test_w4a8_rejects_asymmetric_and_small_groups():
    w = prepared(packed_layer(INT4_FORMATS["float_zero_g64"], 128, 8))
    with pytest.raises(ValueError, match="must be symmetric"):
        w4a8_linear(int_codes(2, 128), torch.ones(2, 1), w)
    w, _ = int4_symmetric(128, 8, 32)
    with pytest.raises(ValueError, match=r"multiple of 64: K = 128 with 4 groups"):
        w4a8_linear(int_codes(2, 128), torch.ones(2, 1), w)
