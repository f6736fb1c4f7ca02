"""Integer numerics: ranges, rounding error bounds, group layout, idempotence."""
from __future__ import annotations

import pytest
import torch

from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import dequantize, fake_quantize, qparams, quantize


def _fmt(bits, symmetric, group=None, float_zero=False) -> QuantFormat:
    return QuantFormat.from_float_zero(bits, symmetric, group, float_zero)


def test_ranges():
    assert _fmt(8, True).qrange == (-128, 127) and _fmt(4, False).qrange == (0, 15) and _fmt(4, True).qrange == (-8, 7)
    assert _fmt(4, False, float_zero=True).qrange == (-8, 7)  # float-zero codes are signed


@pytest.mark.parametrize("bits,symmetric,group,float_zero", [
    (8, True, None, False), (4, False, 16, False), (4, True, 32, False), (8, False, None, False),
    (4, False, 32, True), (4, False, 64, True), (4, False, 128, True), (8, False, None, True), (3, False, 32, True),
])
def test_error_is_at_most_half_a_step_and_values_are_on_the_grid(bits, symmetric, group, float_zero):
    x = torch.randn(6, 128) * torch.linspace(0.1, 5, 128)
    fmt = _fmt(bits, symmetric, group, float_zero)
    scale, zero = qparams(x, fmt)
    q = quantize(x, scale, zero, fmt)
    lo, hi = fmt.qrange
    assert torch.equal(q, q.round()) and q.min() >= lo and q.max() <= hi
    xq = dequantize(q, scale, zero, fmt)
    step = scale.expand(*scale.shape[:-1], group or 128).reshape(x.shape)
    assert ((xq - x).abs() <= step / 2 + 1e-5).all()
    torch.testing.assert_close(fake_quantize(xq, fmt), xq)  # idempotent


def test_float_zero_grid_spans_each_group_min_to_max_and_int_zero_keeps_zero_exact():
    x = torch.rand(3, 32) + 1.0  # all positive: the float-zero grid starts at the min, not at 0
    scale, zero = qparams(x, _fmt(4, False, float_zero=True))
    torch.testing.assert_close(scale.flatten(), (x.amax(-1) - x.amin(-1)) / 15)
    xq = fake_quantize(x, _fmt(4, False, float_zero=True))
    torch.testing.assert_close(xq.amin(-1), x.amin(-1))
    torch.testing.assert_close(xq.amax(-1), x.amax(-1))
    y = torch.randn(3, 32)
    y[:, 5] = 0.0
    assert (fake_quantize(y, _fmt(4, False))[:, 5] == 0).all()  # the integer zero point represents 0 exactly


def test_scales_are_rounded_to_the_dtype_they_are_stored_in():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    scale, zero = qparams(x, _fmt(4, False, 32, float_zero=True))
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.to(torch.bfloat16).float())
    assert torch.equal(zero, zero.to(torch.bfloat16).float())


def test_groups_have_at_most_two_to_the_bits_levels():
    x = torch.randn(4, 128)
    xq = fake_quantize(x, _fmt(4, False, 32))
    for group in xq.reshape(4, 4, 32).reshape(16, 32):
        assert group.unique().numel() <= 16


def test_asymmetric_range_covers_all_positive_data():
    x = torch.rand(3, 32) + 1.0  # all positive: the zero point keeps 0 representable
    scale, zero = qparams(x, _fmt(4, False))
    assert (zero == 0).all() and torch.allclose(scale.flatten(), x.amax(-1) / 15)


def test_zero_rows_stay_zero_and_bad_groups_fail():
    assert torch.equal(fake_quantize(torch.zeros(2, 8), _fmt(8, True)), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="not a multiple of group_size 24"):
        fake_quantize(torch.randn(2, 64), _fmt(4, False, 24))


def test_clip_search_never_does_worse_than_no_clipping_and_clips_gaussian_int4():
    from fxquant.quant.numerics import fake_quantize_clip_search

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    plain = fake_quantize(x, _fmt(4, False, 64))
    searched = fake_quantize_clip_search(x, _fmt(4, False, 64))
    per_group = lambda y: ((y - x) ** 2).reshape(64, 4, 64).sum(-1)  # noqa: E731
    assert (per_group(searched) <= per_group(plain) + 1e-6).all()
    assert per_group(searched).sum() < 0.95 * per_group(plain).sum()
    for group in searched.reshape(-1, 64):
        assert group.unique().numel() <= 16
