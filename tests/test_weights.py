"""weights.py: each edit states an identity; check it on random tensors in both storage layouts."""
from __future__ import annotations

import pytest
import torch

from fxquant.weights import center_out, rotate_in, rotate_out, scale_in, shift_in, untie

torch.manual_seed(0)
X = torch.randn(5, 8, dtype=torch.float64)


def _q(n, seed=0):
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))


def _linear(w, b, transposed):
    return (X @ w if transposed else X @ w.T) + (0 if b is None else b)


@pytest.mark.parametrize("transposed", [False, True])
def test_rotate_in_undoes_a_rotated_input(transposed):
    w = torch.randn(6, 8, dtype=torch.float64)
    stored = w.T.clone() if transposed else w.clone()
    q = _q(8)
    rotate_in(stored, q, transposed=transposed)
    torch.testing.assert_close((X @ q) @ (stored if transposed else stored.T), X @ w.T)


@pytest.mark.parametrize("transposed", [False, True])
def test_rotate_out_rotates_output_and_bias(transposed):
    w, b = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    stored = w.T.clone() if transposed else w.clone()
    bias, q = b.clone(), _q(8)
    rotate_out(stored, bias, q, transposed=transposed)
    y = x @ (stored if transposed else stored.T) + bias
    torch.testing.assert_close(y, (x @ w.T + b) @ q)


def test_spans_touch_only_their_rows_and_columns():
    w, q = torch.randn(8, 8, dtype=torch.float64), _q(4)
    rows, cols = w.clone(), w.clone()
    rotate_out(rows, None, q, rows=(4, 8))
    rotate_in(cols, q, cols=(0, 4))
    assert torch.equal(rows[:4], w[:4]) and not torch.equal(rows[4:], w[4:])
    assert torch.equal(cols[:, 4:], w[:, 4:]) and not torch.equal(cols[:, :4], w[:, :4])


def test_float32_weights_are_edited_in_float64_and_cast_back():
    w = torch.randn(8, 8)
    q = _q(8)
    stored = w.clone()
    rotate_in(stored, q)
    assert stored.dtype == torch.float32
    torch.testing.assert_close(stored, (w.double() @ q).float(), rtol=0, atol=0)


def test_scale_and_shift_fold_a_norm_affine():
    w, c = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    g, beta = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    stored, bias = w.clone(), c.clone()
    shift_in(stored, bias, beta)
    scale_in(stored, g)
    torch.testing.assert_close(X @ stored.T + bias, (X * g + beta) @ w.T + c)


def test_center_out_makes_every_output_mean_free():
    w, b = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    center_out(w, b)
    y = torch.randn(5, 6, dtype=torch.float64) @ w.T + b
    torch.testing.assert_close(y.mean(dim=-1), torch.zeros(5, dtype=torch.float64))


def test_untie_gives_a_copy_and_leaves_the_twin():
    emb = torch.nn.Embedding(4, 3)
    head = torch.nn.Linear(3, 4, bias=False)
    head.weight = emb.weight
    own = untie(head, "weight")
    assert head.weight is own and own is not emb.weight and torch.equal(own, emb.weight)


def test_an_operator_and_its_matrix_give_the_same_edit():
    w, q = torch.randn(6, 8, dtype=torch.float64), _q(8)
    a, b = w.clone(), w.clone()
    rotate_in(a, q)
    rotate_in(b, lambda x: x @ q)
    assert torch.equal(a, b)
    a, b = w.T.clone(), w.T.clone()  # [8, 6]: rotate the 8 outputs
    bias_a = torch.randn(8, dtype=torch.float64)
    bias_b = bias_a.clone()
    rotate_out(a, bias_a, q)
    rotate_out(b, bias_b, lambda x: x @ q)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(bias_a, bias_b, rtol=0, atol=1e-12)
