"""The Triton Hadamard and per-token quantizer kernels against their torch references.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): fp32 and fp16 only,
small shapes. Pure powers of two (m = 1) must equal the reference bit for bit; with a base m > 1
the dot sums in another order, so the rotation agrees to fp32 rounding and the codes are checked
exactly against the reference quantizer applied to the kernel's own rotation.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fxquant.errors import NoHadamardError, RecipeError  # noqa: E402
from fxquant.hadamard import _decompose, has_hadamard, hadamard_transform  # noqa: E402
from fxquant.quant.format import QuantFormat  # noqa: E402
from fxquant.quant.numerics import EPS, qparams, quantize  # noqa: E402
from fxquant.runtime import library  # noqa: E402  (the reference ops fxquant::hadamard / ::fake_quant)
from fxquant.runtime.kernels.triton import hadamard as th  # noqa: E402

POW2 = (16, 64, 128)  # m = 1
BASED = (48, 40, 576)  # 12 * 2^2, 20 * 2, 36 * 2^4
ROWS = (1, 5, 37)  # one row, a partial program, several programs (576: 4 rows per program)
QUANTS = [(bits, sym, clip) for bits in (4, 8) for sym in (True, False) for clip in (1.0, 0.9)]


def _x(rows: int, n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    x[:, 3] *= 20  # an outlier channel, as activations have
    return x.to(dtype)


def _fmt(bits: int, symmetric: bool) -> QuantFormat:
    return QuantFormat(bits, symmetric, None, "int")


def _ref_codes(y: torch.Tensor, bits: int, symmetric: bool, clip: float):
    """(codes, scale, zero) of the reference quantizer on y, per row."""
    fmt = _fmt(bits, symmetric)
    scale, zero = qparams(y, fmt, clip)  # [rows, 1 group, 1]
    codes = quantize(y, scale, zero, fmt)
    return codes, scale.squeeze(-1), None if zero is None else zero.squeeze(-1)


def test_the_chosen_sizes_cover_both_kinds_of_base():
    assert all(_decompose(n)[0] == 1 for n in POW2)
    assert [_decompose(n)[0] for n in BASED] == [12, 20, 36]


@pytest.mark.parametrize("n", POW2 + BASED)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hadamard_matches_the_reference(n, rows, dtype):
    x = _x(rows, n, dtype)
    y, ref = th.hadamard(x), hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    if _decompose(n)[0] == 1:  # the same butterfly stages in the same order: bit for bit
        assert torch.equal(y, ref)
    elif dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    else:  # fp32 results a bit apart can round to neighbouring halves
        torch.testing.assert_close(y, ref, rtol=2 ** -10, atol=1e-6)
    assert not torch.allclose(y.float(), x.float(), atol=1e-2)  # it did rotate


def test_hadamard_of_a_transposed_view_is_laid_out_like_the_reference_op():
    x = torch.randn(2, 5, 3, 48).transpose(1, 2)  # [batch, heads, tokens, head_dim], not contiguous
    y, ref = th.hadamard(x), library.hadamard(x)
    assert not x.is_contiguous() and y.stride() == ref.stride() == x.stride()
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("bits,symmetric,clip", QUANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [16, 40, 100])  # 100: not a power of two, a padded row
def test_fake_quant_equals_the_reference_op(bits, symmetric, clip, dtype, n):
    x = _x(5, n, dtype)
    y = th.fake_quant(x, bits, symmetric, clip)
    ref = library.fake_quant(x, bits, symmetric, clip)
    assert y.dtype == dtype and torch.equal(y, ref)
    assert not torch.equal(y, x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_ties_round_half_to_even_like_torch_round(symmetric):
    # symmetric 8 bits with max 127: scale 1, so k + 0.5 are ties; asymmetric [-127.5, 127.5]: scale 1 too
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -125.5, 127.0, -127.0])
    x = torch.cat([ties, torch.tensor([-127.5, 127.5])]) if not symmetric else ties
    y = th.fake_quant(x[None], 8, symmetric)[0]
    assert torch.equal(y, library.fake_quant(x[None], 8, symmetric, 1.0)[0])
    if symmetric:
        assert y[:7].tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 4.0]


@pytest.mark.parametrize("bits,symmetric,clip", QUANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,rows", [(64, 3), (48, 5), (576, 5)])
def test_hadamard_quantize_codes_are_the_reference_codes_of_its_rotation(bits, symmetric, clip, dtype, n, rows):
    x = _x(rows, n, dtype)
    codes, scale, zero = th.hadamard_quantize(x, bits, symmetric, clip)
    ref_codes, ref_scale, ref_zero = _ref_codes(th.hadamard(x), bits, symmetric, clip)
    assert codes.dtype == (torch.int8 if symmetric else torch.uint8) and scale.shape == (rows, 1)
    assert torch.equal(codes.float(), ref_codes) and torch.equal(scale, ref_scale)
    assert (zero is None) if symmetric else torch.equal(zero, ref_zero)
    if symmetric:  # the op itself returns the zero point 0 (a schema has no optional output)
        assert torch.equal(th.hadamard_quantize_op(x, bits, symmetric, clip)[2], torch.zeros(rows, 1))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    assert codes.min() >= lo and codes.max() <= hi and codes.unique().numel() > 4


@pytest.mark.parametrize("bits,symmetric,clip", QUANTS)
@pytest.mark.parametrize("n", [64, 576])
def test_hadamard_quantize_against_the_reference_rotation_differs_at_rare_ties_only(bits, symmetric, clip, n):
    x = _x(37, n)
    codes, scale, _ = th.hadamard_quantize(x, bits, symmetric, clip)
    ref_codes, ref_scale, _ = _ref_codes(hadamard_transform(x), bits, symmetric, clip)
    diff = (codes.float() - ref_codes).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.005
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    if n == 64:  # m = 1: the rotation is bit-exact, so the codes are too
        assert torch.equal(codes.float(), ref_codes)


@pytest.mark.parametrize("bits,symmetric,clip", QUANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [128, 40])
def test_hadamard_fake_quant_is_fake_quant_of_the_rotation(bits, symmetric, clip, dtype, n):
    x = _x(5, n, dtype)
    y = th.hadamard_fake_quant(x, bits, symmetric, clip)
    assert y.dtype == dtype
    assert torch.equal(y, library.fake_quant(th.hadamard(x), bits, symmetric, clip))
    ref = library.fake_quant(library.online_transform('cuda')(x), bits, symmetric, clip)  # the CUDA arithmetic
    if n == 128:
        assert torch.equal(y, ref)
    else:  # at most one step apart, at a rare tie
        step = qparams(ref, _fmt(bits, symmetric), clip)[0]
        far = ((y.float() - ref.float()).abs() > 1e-3 * step).float().mean()
        assert ((y.float() - ref.float()).abs() <= step * 1.001).all() and far < 0.005


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rotate", [True, False])
def test_an_all_zero_row_gets_the_smallest_scale_and_the_zero_code(symmetric, rotate):
    x = _x(3, 48)
    x[1] = 0
    if rotate:
        codes, scale, zero = th.hadamard_quantize(x, 4, symmetric)
        assert scale[1].item() == torch.tensor(EPS, dtype=torch.float32).item()
        assert torch.equal(codes[1], torch.zeros(48, dtype=codes.dtype))
        assert zero is None or zero[1].item() == 0
        assert scale[0].item() > 1e-3
    y = (th.hadamard_fake_quant if rotate else th.fake_quant)(x, 4, symmetric)
    assert torch.equal(y[1], torch.zeros(48)) and y[0].abs().max() > 0


def test_a_size_with_no_hadamard_is_refused_before_any_launch(monkeypatch):
    assert not has_hadamard(42)
    monkeypatch.setattr(th, "_rotate_quantize_kernel", None)  # a launch would raise TypeError instead
    x = torch.randn(2, 42)
    for call in (lambda: th.hadamard(x), lambda: th.hadamard_quantize(x, 4, True),
                 lambda: th.hadamard_fake_quant(x, 8, False)):
        with pytest.raises(NoHadamardError, match="size 42"):
            call()
    with pytest.raises(RecipeError, match="bits = 5 is not one of"):
        th.fake_quant(x, 5, True)


def test_the_quantizer_alone_takes_sizes_with_no_hadamard():
    x = _x(3, 42)
    assert torch.equal(th.fake_quant(x, 8, False), library.fake_quant(x, 8, False, 1.0))


def test_supports_names_what_fits():
    assert th.supports(4096) and th.supports(14336) and th.supports(2 ** 15)
    assert not th.supports(42) and not th.supports(2 ** 16) and th.supports(42, rotate=False)


@pytest.mark.parametrize("op,args", [
    (th.hadamard, ()), (th.hadamard_quantize_op, (4, False, 0.9)), (th.hadamard_fake_quant, (8, True, 1.0)),
    (th.fake_quant, (4, True, 0.9)),
])
def test_the_ops_pass_opcheck(op, args):
    torch.library.opcheck(op._opoverload, (_x(3, 48), *args))
    torch.library.opcheck(op._opoverload, (torch.randn(2, 3, 4, 16).transpose(1, 2), *args))
