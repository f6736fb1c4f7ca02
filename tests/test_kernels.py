"""CPU kernels against their references: Hadamard, the per-token quantizers, int4 and int8 linears."""
from __future__ import annotations

import pytest
import torch

from fxquant.hadamard import has_hadamard, hadamard_transform
from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import qparams, quantize, quantized_weight
from fxquant.runtime.kernels import int4, int8
from fxquant.runtime.kernels.hadamard import fast_hadamard, kronecker_hadamard
from fxquant.runtime.kernels.linear import KERNELS, candidates
from fxquant.runtime.kernels.quantize import fast_fake_quant, fast_hadamard_fake_quant, reference, row_fake_quant
from fxquant.runtime.linear import QuantizedLinear
from fxquant.runtime.lowered import LinearPlan, LoweredLinear

HADAMARD_SIZES = [n for n in (1, 2, 4, 12, 40, 64, 576, 1536, 4096, 14336, 11008) if has_hadamard(n)]


@pytest.mark.parametrize("n", HADAMARD_SIZES)
def test_kronecker_hadamard_equals_the_butterfly_reference_in_float64(n):
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(kronecker_hadamard(x), hadamard_transform(x), atol=1e-12, rtol=0)


def test_fast_hadamard_takes_a_transposed_view_and_half_dtypes():
    x = torch.randn(2, 5, 3, 64).transpose(1, 2)  # [batch, heads, tokens, head_dim] as attention hands it over
    y = fast_hadamard(x)
    assert y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y, hadamard_transform(x), atol=1e-5, rtol=0)
    h = torch.randn(4, 576, dtype=torch.float16)
    assert fast_hadamard(h).dtype == torch.float16
    torch.testing.assert_close(fast_hadamard(h), hadamard_transform(h), atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,symmetric,clip", [(4, True, 1.0), (8, True, 0.9), (4, False, 1.0), (8, False, 0.85)])
def test_row_fake_quant_is_bit_identical_to_the_reference(dtype, bits, symmetric, clip):
    x = (torch.randn(6, 3, 64) * 4).to(dtype)
    x[0, 0] = 0  # an all-zero row: the scale clamps to EPS
    x[1, 1, 5] = 300  # an outlier
    torch.testing.assert_close(row_fake_quant(x, bits, symmetric, clip), reference(x, bits, symmetric, clip),
                               atol=0, rtol=0, equal_nan=True)


def test_fused_hadamard_quantizer_equals_hadamard_then_quantizer():
    x = torch.randn(5, 1536)
    expected = reference(kronecker_hadamard(x), 4, True, 1.0)
    assert torch.equal(fast_hadamard_fake_quant(x, 4, True, 1.0), expected)
    close = reference(hadamard_transform(x), 4, True, 1.0)  # the butterfly differs in the last float bit only:
    diff = (fast_hadamard_fake_quant(x, 4, True, 1.0) - close).abs()  # scales a bit apart, rare one-step flips
    assert (diff > 1e-5 * close.abs().max()).float().mean() < 0.005


def test_fast_fake_quant_passes_gradients_straight_through():
    x = torch.randn(3, 16, requires_grad=True)
    fast_fake_quant(x, 4, True, 1.0).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("op,args", [
    (torch.ops.fxquant.fast_hadamard.default, (torch.randn(3, 48),)),
    (torch.ops.fxquant.fast_fake_quant.default, (torch.randn(3, 16), 4, False, 0.9)),
    (torch.ops.fxquant.fast_hadamard_fake_quant.default, (torch.randn(3, 64), 8, True, 1.0)),
])
def test_elementwise_kernel_ops_pass_opcheck(op, args):
    torch.library.opcheck(op, args)


def _layer(out_f, in_f, fmt, bias=False, seed=0):
    """A packed layer with random weights quantized in `fmt` (codes, scales, zeros as pack makes them)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    scale, zero = qparams(w, fmt)
    qw = quantized_weight(quantize(w, scale, zero, fmt).reshape(scale.shape[:-1] + (-1,)), scale, zero, fmt,
                          torch.float32)
    qw = type(qw)(qw.codes.reshape(out_f, in_f), qw.scale, qw.zero, fmt)
    return QuantizedLinear.from_weight(qw, torch.randn(out_f, generator=gen) if bias else None)


INT4_FORMATS = [QuantFormat(4, True, None, "int"), QuantFormat(4, False, 64, "float"),
                QuantFormat(4, False, 32, "int"), QuantFormat(4, True, 128, "int")]


@pytest.mark.parametrize("fmt", INT4_FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("m", [1, 3, 16])
def test_int4_tinygemm_matches_the_reference_to_bfloat16_rounding(fmt, m):
    layer = _layer(48, 256, fmt, bias=True)
    lowered = LoweredLinear.lower(layer, LinearPlan("int4_tinygemm", "int4_tinygemm", 10 ** 6))
    x = torch.randn(m, 256)
    ref = layer(x)
    out = lowered(x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    # bf16 activations, scales and output: relative error a few 2^-8 of the output's size
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert (out - ref).abs().max() > 0  # it really ran the bf16 kernel, not the reference


def test_int4_integer_zeros_convert_to_the_float_offset_within_a_float32_ulp():
    layer = _layer(16, 64, QuantFormat(4, False, 32, "int"))
    z = int4.offset_zero(layer)  # w = (u - 8) s + z'  must equal  (u - z) s
    u = layer.codes  # packed; compare on the dequantized weight instead
    from fxquant.quant.packed import unpack_int4

    codes = unpack_int4(u).float().reshape(16, 2, 32)
    w_tiny = (codes - 8) * layer.scale.float()[..., None] + z[..., None]
    torch.testing.assert_close(w_tiny.reshape(16, 64), layer.weight_values(), rtol=2e-7, atol=2e-7)


def test_tinygemm_refuses_widths_it_cannot_pack_with_the_reason():
    usable, refused = candidates(_layer(40, 64, QuantFormat(4, True, None, "int")), torch.device("cpu"))
    assert [k.name for k in usable] == ["reference"]
    assert "not a multiple of 16" in refused["int4_tinygemm"]
    assert "8-bit" not in refused["int4_tinygemm"] and "4-bit codes" in refused["int8_weight"]


@pytest.mark.parametrize("in_f", [40, 24, 256])  # 24, 40: the AVX bf16 int8 kernel crashes or is wrong unpadded
@pytest.mark.parametrize("m", [1, 5])
def test_int8_weight_kernel_pads_k_and_matches_the_reference(in_f, m):
    layer = _layer(32, in_f, QuantFormat(8, True, None, "int"), bias=True)
    lowered = LoweredLinear.lower(layer, LinearPlan("int8_weight", "int8_weight", 10 ** 6))
    assert lowered.int8_weight_weight.shape[1] % int8.K_MULTIPLE == 0
    x = torch.randn(m, in_f)
    ref, out = layer(x), lowered(x)
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_int8_kernel_refuses_grouped_or_asymmetric_weights():
    assert "symmetric per-channel" in int8.int8_refusal(_layer(16, 64, QuantFormat(8, False, None, "int")))
    assert "symmetric per-channel" in int8.int8_refusal(_layer(16, 64, QuantFormat(8, True, 32, "int")))


def test_lowered_linear_dispatches_on_the_token_count():
    layer = _layer(32, 64, QuantFormat(4, False, 64, "float"))
    lowered = LoweredLinear.lower(layer, LinearPlan("int4_tinygemm", "reference", 4))
    small, large = torch.randn(1, 4, 64), torch.randn(1, 5, 64)
    assert not torch.equal(lowered(small), layer(small))  # the bf16 kernel
    assert torch.equal(lowered(large), layer(large))  # the exact reference above M = 4


def test_lowered_linear_keeps_only_the_portable_state():
    layer = _layer(32, 64, QuantFormat(4, False, 64, "float"), bias=True)
    lowered = LoweredLinear.lower(layer, LinearPlan("int4_tinygemm", "reference", 16))
    assert set(lowered.state_dict()) == set(layer.state_dict())
    assert isinstance(lowered, QuantizedLinear) and lowered.spec() == layer.spec()


@pytest.mark.parametrize("name", ["int4_tinygemm", "int8_weight"])
def test_linear_kernel_ops_pass_opcheck(name):
    fmt = QuantFormat(4, False, 64, "float") if name == "int4_tinygemm" else QuantFormat(8, True, None, "int")
    layer = LoweredLinear.lower(_layer(32, 64, fmt, bias=True), LinearPlan(name, name, 16))
    if name == "int4_tinygemm":
        op, args = torch.ops.fxquant.int4_tinygemm.default, (torch.randn(2, 64), layer.int4_tinygemm_weight,
                                                            layer.int4_tinygemm_scale_zeros, 64, layer.bias)
    else:
        op, args = torch.ops.fxquant.int8_weight_mm.default, (torch.randn(2, 64), layer.int8_weight_weight,
                                                             layer.int8_weight_scales, layer.bias)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    assert KERNELS[name].refusal(layer) is None


@pytest.mark.parametrize("fmt", INT4_FORMATS[:3], ids=lambda f: f.describe())
def test_the_triton_int4_kernel_in_the_table_matches_the_reference(fmt):
    pytest.importorskip("triton")  # CPU tensors: the Triton interpreter (tests/conftest.py)
    layer = _layer(48, 128, fmt, bias=True)
    assert KERNELS["triton_int4"].refusal(layer) is None
    lowered = LoweredLinear.lower(layer, LinearPlan("triton_int4", "triton_int4", 16))
    for m in (1, 20):  # the split-K GEMV and the tiled GEMM
        x = torch.randn(m, 128)
        torch.testing.assert_close(lowered(x), layer(x), atol=1e-5 * layer(x).abs().max().item(), rtol=0)



def _act_layer(bits_w, bits_a, in_f=96, out_f=40, symmetric=True):
    from fxquant.runtime.hooks import ActivationFakeQuant

    layer = _layer(out_f, in_f, QuantFormat(bits_w, True, None, "int"), bias=True)
    return layer, ActivationFakeQuant(bits_a, symmetric, 0.9)


@pytest.mark.parametrize("bits_w,bits_a", [(4, 4), (4, 8), (8, 8)])
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_two_integer_kernels_agree_bit_for_bit_and_match_the_reference(bits_w, bits_a, m, symmetric):
    from fxquant.runtime.library import fake_quant

    layer, act = _act_layer(bits_w, bits_a, symmetric=symmetric)
    x = torch.randn(m, 96) * 3 + (0 if symmetric else 1.5)  # asymmetric: a shifted range, zero points != mid
    ref = layer(fake_quant(x, act.bits, act.symmetric, act.clip_ratio))
    probe = LoweredLinear.lower(layer, LinearPlan("reference", "reference", 0), act)
    kernels = ["reference", "int_mm", "float_codes"] + [
        k for k in ("onednn", "packed_int") if KERNELS[k].refusal(probe) is None]
    outs = [LoweredLinear.lower(layer, LinearPlan(k, k, 10 ** 6), act)(x) for k in kernels]
    # the same exact integer sums, the same epilogue: the reference op (the definition) included
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    # and the float product of the quantized values (the fake-quant model) is float32 rounding apart
    torch.testing.assert_close(outs[0], ref, atol=2e-6 * ref.abs().max().item(), rtol=0)


def test_the_onednn_kernel_runs_here_and_refuses_pairs_that_saturate_without_vnni(monkeypatch):
    from fxquant.runtime.kernels import onednn

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert onednn.unavailable() is None  # x86 builds of torch ship oneDNN's u8 x s8 GEMM
    layer8, act8 = _act_layer(8, 8)
    layer4, act4 = _act_layer(4, 4)
    probe8 = LoweredLinear.lower(layer8, LinearPlan("reference", "reference", 0), act8)
    probe4 = LoweredLinear.lower(layer4, LinearPlan("reference", "reference", 0), act4)
    monkeypatch.setattr(onednn, "saturates", lambda: True)  # an AVX2 CPU: int16 pair sums
    assert "saturating int16" in onednn.onednn_refusal(probe8)
    assert onednn.onednn_refusal(probe4) is None  # 2 x 15 x 8 per pair: far below 2^15
    monkeypatch.setattr(onednn, "saturates", lambda: False)
    assert onednn.onednn_refusal(probe8) is None


def test_the_onednn_kernel_repacks_when_its_codes_are_written_to():
    from fxquant.runtime.kernels import onednn

    if onednn.unavailable() is not None:
        pytest.skip(onednn.unavailable())
    layer, act = _act_layer(4, 4)
    lowered = LoweredLinear.lower(layer, LinearPlan("onednn", "onednn", 10 ** 6), act)
    x = torch.randn(3, 96)
    before = lowered(x)
    lowered.onednn_codes.neg_()  # in place: the packed copy is stale and must not be used
    after = lowered(x)
    flipped = LoweredLinear.lower(layer, LinearPlan("float_codes", "float_codes", 10 ** 6), act)
    flipped.float_codes_codes.neg_()
    assert not torch.equal(before, after) and torch.equal(after, flipped(x))


def test_the_float_codes_kernel_refuses_int8_layers_whose_sums_could_pass_2_to_the_24():
    from fxquant.runtime.kernels import integer

    wide, act = _act_layer(8, 8, in_f=1024)
    probe = LoweredLinear.lower(wide, LinearPlan("reference", "reference", 0), act)
    assert "2^24" in integer.float_codes_refusal(probe) and integer.integer_refusal(probe) is None
    narrow = LoweredLinear.lower(_act_layer(4, 4, in_f=1024)[0], LinearPlan("reference", "reference", 0), act)
    assert integer.float_codes_refusal(narrow) is None  # 4-bit weights x 8-bit codes stay far below


def test_integer_kernels_refuse_layers_without_a_per_token_quantizer_or_per_channel_weights():
    from fxquant.runtime.hooks import ActivationFakeQuant
    from fxquant.runtime.kernels import integer
    from fxquant.runtime.kernels import linear as kernel_linear

    layer = _layer(16, 64, QuantFormat(4, True, None, "int"))
    plain = LoweredLinear.lower(layer, LinearPlan("reference", "reference", 0))
    assert "not quantized" in integer.integer_refusal(plain)
    asym = LoweredLinear.lower(layer, LinearPlan("reference", "reference", 0), ActivationFakeQuant(8, False))
    assert integer.integer_refusal(asym) is None  # the zero point's part is subtracted in int32
    assert "asymmetric" in kernel_linear._triton_int8_refusal(asym)
    grouped = LoweredLinear.lower(_layer(16, 64, QuantFormat(4, True, 32, "int")), LinearPlan("reference", "reference", 0),
                                  ActivationFakeQuant(8, True))
    assert "per-channel" in integer.integer_refusal(grouped)


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_onednn_op_passes_opcheck(symmetric):
    from fxquant.runtime.kernels import onednn

    if onednn.unavailable() is not None:
        pytest.skip(onednn.unavailable())
    layer, act = _act_layer(4, 4, symmetric=symmetric)
    lowered = LoweredLinear.lower(layer, LinearPlan("onednn", "onednn", 16), act)
    op = torch.ops.fxquant.onednn_linear if symmetric else torch.ops.fxquant.onednn_linear_asym
    weights = (lowered.onednn_scale,) if symmetric else ([lowered.onednn_scale, lowered.onednn_colsum],)
    torch.library.opcheck(op.default, (torch.randn(3, 96), lowered.onednn_codes, *weights, layer.bias, 4, 0.9),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("name", ["int_mm_linear", "float_codes_linear", "int_mm_linear_asym",
                                  "float_codes_linear_asym"])
def test_integer_kernel_ops_pass_opcheck(name):
    symmetric = not name.endswith("_asym")
    layer, act = _act_layer(4, 4, symmetric=symmetric)
    kernel = "int_mm" if name.startswith("int_mm") else "float_codes"
    lowered = LoweredLinear.lower(layer, LinearPlan(kernel, kernel, 16), act)
    weights = [getattr(lowered, f"{kernel}_{key}") for key in lowered.kernel_buffers[kernel]]
    if kernel == "int_mm" and not symmetric:  # [codes, [scales, code sums]]
        weights = [weights[0], weights[1:]]
    op = getattr(torch.ops.fxquant, name).default
    torch.library.opcheck(op, (torch.randn(3, 96), *weights, layer.bias, 4, 0.9),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))



def test_kernel_callers_run_the_python_kernel_in_eager_mode_and_the_op_under_compile():
    calls = []
    x = torch.randn(2, 64)
    eager = fast_hadamard(x)
    compiled = torch.compile(lambda t: fast_hadamard(t) * 2, backend=lambda gm, inputs: calls.append(gm) or gm)
    torch.testing.assert_close(compiled(x), eager * 2)
    targets = [n.target for n in calls[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.fxquant.fast_hadamard.default in targets  # one named node in the graph dynamo hands over



@pytest.mark.parametrize("bits_w,bits_a", [(4, 4), (8, 8)])
def test_the_triton_int8_kernel_in_the_table_gives_the_same_integer_product(bits_w, bits_a):
    pytest.importorskip("triton")  # CPU tensors: the Triton interpreter (tests/conftest.py)
    layer, act = _act_layer(bits_w, bits_a, in_f=64, out_f=32)
    x = torch.randn(3, 64)
    outs = [LoweredLinear.lower(layer, LinearPlan(k, k, 16), act)(x) for k in ("triton_int8", "int_mm")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6 * outs[1].abs().max().item(), rtol=0)
