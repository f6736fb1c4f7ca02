"""fxquant's C integer linear (fxquant/runtime/kernels/packed_int.c): bit-identical to torch._int_mm's
exact product on every code path it compiles (VNNI, AVX2, plain C), and refused with the reason where
it cannot be built."""
from __future__ import annotations

import pytest
import torch

from fxquant.quant.format import QuantFormat
from fxquant.runtime.hooks import ActivationFakeQuant
from fxquant.runtime.kernels import native, packed_int
from fxquant.runtime.kernels.linear import KERNELS, candidates
from fxquant.runtime.linear import QuantizedLinear
from fxquant.runtime.lowered import LinearPlan, LoweredLinear
from tests.test_kernels import _layer

if packed_int.unavailable() is not None:
    pytest.skip(f"the C kernel cannot be built here: {packed_int.unavailable()}", allow_module_level=True)

# the code paths of older CPUs, built here: u8 x s8 pairs in int16 (AVX2, no VNNI), and plain C
OLDER_CPUS = {"avx2": ("-mno-avx512vnni", "-mno-avxvnni"), "plain C": ("-mno-avx512f", "-mno-avx2")}


def _lowered(kernel, bits_w, bits_a, symmetric, in_f, bias=True):
    layer = _layer(24, in_f, QuantFormat(bits_w, True, None, "int"), bias=bias)
    return LoweredLinear.lower(layer, LinearPlan(kernel, kernel, 10 ** 6), ActivationFakeQuant(bits_a, symmetric, 0.9))


CASES = [(4, 4, True), (4, 8, True), (8, 8, True), (4, 4, False), (8, 8, False), (8, 4, True)]


@pytest.mark.parametrize("bits_w,bits_a,symmetric", CASES)
@pytest.mark.parametrize("in_f", [40, 128, 200])  # below one 64-weight block, whole blocks, padded
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_c_kernel_equals_int_mm_bit_for_bit(bits_w, bits_a, symmetric, in_f, dtype):
    mine = _lowered("packed_int", bits_w, bits_a, symmetric, in_f).to(dtype)
    theirs = _lowered("int_mm", bits_w, bits_a, symmetric, in_f).to(dtype)
    for m in (1, 3, 17):
        x = (torch.randn(2, m, in_f) * 3 + (0 if symmetric else 1.5)).to(dtype)
        y = mine(x)
        assert y.dtype == dtype and y.shape == (2, m, 24)
        assert torch.equal(y, theirs(x)), (m, dtype)
        assert torch.equal(y, QuantizedLinear.forward(mine, x)), (m, dtype)  # the reference op: the definition


@pytest.mark.parametrize("path", OLDER_CPUS)
@pytest.mark.parametrize("bits_w,bits_a,symmetric", CASES)
def test_the_code_paths_of_older_cpus_give_the_same_product(path, bits_w, bits_a, symmetric, monkeypatch):
    older = packed_int._function(OLDER_CPUS[path])
    monkeypatch.setattr(packed_int, "_function", lambda: older)
    layer = _lowered("packed_int", bits_w, bits_a, symmetric, 200)
    theirs = _lowered("int_mm", bits_w, bits_a, symmetric, 200)
    x = torch.randn(5, 200) * 3
    # extreme codes: every weight and activation at the ends of its range, where int16 pairs would saturate
    x[0] = 100.0 * torch.where(torch.arange(200) % 2 == 0, 1.0, -1.0)
    assert torch.equal(layer(x), theirs(x))


def test_the_four_bit_layout_holds_each_code_once():
    layer = _lowered("packed_int", 4, 4, True, 200, bias=False)
    packed = layer.packed_int_weight  # [out, 256 / 2]: 4 blocks of 64 codes in 32 bytes
    assert packed.shape == (24, 128) and packed.dtype == torch.uint8
    u = torch.stack([packed & 15, packed >> 4], dim=1).view(24, 2, 4, 32).permute(0, 2, 1, 3).reshape(24, 256)
    assert torch.equal(u[:, :200].to(torch.int16) - 8, layer.signed_codes().to(torch.int16))
    assert torch.equal(u[:, 200:], torch.full((24, 56), 8, dtype=torch.uint8))  # padding: code 0


def test_the_op_passes_opcheck():
    layer = _lowered("packed_int", 4, 4, False, 96)
    args = (torch.randn(3, 96), layer.packed_int_weight, [layer.packed_int_scale, layer.packed_int_colsum],
            layer.bias, [4, 4, 0], 0.9)
    torch.library.opcheck(torch.ops.fxquant.packed_int_linear.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_no_compiler_or_a_failed_build_is_a_refusal_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("FXQUANT_CACHE", str(tmp_path))
    monkeypatch.setenv("FXQUANT_CC", "no-such-compiler")
    with pytest.raises(native.NativeUnavailable, match="no C compiler 'no-such-compiler'"):
        native.library.__wrapped__("packed_int")
    monkeypatch.setenv("FXQUANT_CC", "false")  # runs, builds nothing
    with pytest.raises(native.NativeUnavailable, match="could not build packed_int.c"):
        native.library.__wrapped__("packed_int")
    assert not list(tmp_path.rglob("*.so"))

    def unbuildable(*args):
        raise native.NativeUnavailable("no C compiler 'cc' on PATH (install gcc, or set FXQUANT_CC)")

    monkeypatch.setattr(packed_int, "_function", unbuildable)
    probe = _lowered("reference", 4, 4, True, 96)
    usable, refused = candidates(probe, torch.device("cpu"))
    assert "no C compiler" in refused["packed_int"] and KERNELS["int_mm"] in usable


def test_layers_the_c_kernel_does_not_take_are_refused_with_the_reason():
    layer = _layer(16, 64, QuantFormat(4, True, None, "int"))
    plain = LoweredLinear.lower(layer, LinearPlan("reference", "reference", 0))
    assert "not quantized" in packed_int.packed_int_refusal(plain)
    wide = LoweredLinear.lower(_layer(16, 64, QuantFormat(3, True, None, "int")), LinearPlan("reference", "reference", 0),
                               ActivationFakeQuant(4, True))
    assert "3-bit weights" in packed_int.packed_int_refusal(wide)
