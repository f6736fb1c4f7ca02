"""fxquant::fake_quant's gradient: straight through the rounding, exact through the per-row scale."""
from __future__ import annotations

import pytest
import torch

from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import fake_quantize, fake_quantize_ste
from fxquant.runtime.library import fake_quant


def _x(seed=0):
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_the_value_is_fake_quantize_exactly(symmetric, clip):
    x, fmt = _x(), QuantFormat(4, symmetric, None, "int")
    assert torch.equal(fake_quantize_ste(x, fmt, clip), fake_quantize(x, fmt, clip))
    assert torch.equal(fake_quant(x.requires_grad_(), 4, symmetric, clip).detach(), fake_quantize(x.detach(), fmt, clip))


def test_symmetric_gradient_is_identity_plus_the_scale_term_at_each_row_max():
    """y = s * round(x / s), s = max|x| / 7: dy/dx = I + sum_i g_i (q_i - u_i) * sign(x_m) / 7 at the max."""
    x, g = _x().requires_grad_(), _x(1)
    (dx,) = torch.autograd.grad(fake_quant(x, 4, True, 1.0), x, g)
    x = x.detach()
    s = x.abs().amax(-1, keepdim=True) / 7
    u = x / s
    expected = g.clone()
    m = x.abs().argmax(-1)
    rows = torch.arange(5)
    expected[rows, m] += (g * (torch.round(u).clamp(-8, 7) - u)).sum(-1) * torch.sign(x[rows, m]) / 7
    torch.testing.assert_close(dx, expected, atol=1e-6, rtol=0)


def test_clipped_values_get_no_gradient_through_the_rounding():
    x = torch.tensor([[10.0, 1.0, -0.5, 0.25]], requires_grad=True)
    (dx,) = torch.autograd.grad(fake_quant(x, 4, True, 0.5).sum(), x)
    assert dx[0, 1:].ne(0).all()  # inside the range: straight through (plus the scale term)
    # the clipped max passes only the scale's term, not the identity
    scale_term = dx[0, 0].item()
    assert abs(scale_term - 1.0) > 1e-3
