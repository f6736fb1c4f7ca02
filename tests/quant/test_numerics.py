"""Integer numerics: ranges, rounding error bounds, group layout, idempotence."""
from __future__ import annotations

import pytest
import torch

from fxquant.quant.numerics import dequantize, fake_quantize, qparams, qrange, quantize


def test_ranges():
    assert qrange(8, True) == (-128, 127) and qrange(4, False) == (0, 15) and qrange(4, True) == (-8, 7)


@pytest.mark.parametrize("bits,symmetric,group", [(8, True, None), (4, False, 16), (4, True, 32), (8, False, None)])
def test_error_is_at_most_half_a_step_and_values_are_on_the_grid(bits, symmetric, group):
    x = torch.randn(6, 64) * torch.linspace(0.1, 5, 64)
    scale, zero = qparams(x, bits, symmetric, group)
    q = quantize(x, scale, zero, bits, symmetric, group)
    lo, hi = qrange(bits, symmetric)
    assert torch.equal(q, q.round()) and q.min() >= lo and q.max() <= hi
    xq = dequantize(q, scale, zero, group)
    step = scale.expand(*scale.shape[:-1], group or 64).reshape(x.shape)
    assert ((xq - x).abs() <= step / 2 + 1e-6).all()
    torch.testing.assert_close(fake_quantize(xq, bits, symmetric, group), xq)  # idempotent


def test_groups_have_at_most_two_to_the_bits_levels():
    x = torch.randn(4, 128)
    xq = fake_quantize(x, 4, False, group_size=32)
    for group in xq.reshape(4, 4, 32).reshape(16, 32):
        assert group.unique().numel() <= 16


def test_asymmetric_range_covers_all_positive_data():
    x = torch.rand(3, 32) + 1.0  # all positive: the zero point keeps 0 representable
    scale, zero = qparams(x, 4, False)
    assert (zero == 0).all() and torch.allclose(scale.flatten(), x.amax(-1) / 15)


def test_zero_rows_stay_zero_and_bad_groups_fail():
    assert torch.equal(fake_quantize(torch.zeros(2, 8), 8, True), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="not a multiple of group_size 24"):
        fake_quantize(torch.randn(2, 64), 4, False, group_size=24)


def test_clip_search_never_does_worse_than_no_clipping_and_clips_gaussian_int4():
    from fxquant.quant.numerics import fake_quantize_clip_search

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    plain = fake_quantize(x, 4, False, group_size=64)
    searched = fake_quantize_clip_search(x, 4, False, group_size=64)
    per_group = lambda y: ((y - x) ** 2).reshape(64, 4, 64).sum(-1)  # noqa: E731
    assert (per_group(searched) <= per_group(plain) + 1e-6).all()
    assert per_group(searched).sum() < 0.95 * per_group(plain).sum()
    for group in searched.reshape(-1, 64):
        assert group.unique().numel() <= 16
