"""Cayley SGD on the orthogonal group: every step stays orthogonal, and it descends."""
from __future__ import annotations

import torch

from fxquant.cayley import CayleySGD, cayley, orthogonality_error, skew_generator
from fxquant.hadamard import rotation_matrix


def _random_orthogonal(n, seed):
    return rotation_matrix("random-orthogonal", n, seed=seed)


def test_a_cayley_step_keeps_a_matrix_orthogonal_at_float64_rounding():
    x = rotation_matrix("random-hadamard", 64, seed=0)
    g = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 100
    opt = CayleySGD({"x": x}, lr=1.5)
    for _ in range(50):
        opt.step({"x": g})
        assert orthogonality_error(opt.matrices["x"]) < 1e-12
    assert (opt.matrices["x"] - x).abs().max() > 0.1  # it moved


def test_the_generator_is_skew_symmetric_and_the_transform_is_orthogonal_for_any_step():
    x = _random_orthogonal(12, 0)
    m = torch.randn(12, 12, dtype=torch.float64)
    w = skew_generator(x, m)
    assert torch.allclose(w, -w.T)
    for step in (0.01, 1.0, 100.0):
        assert orthogonality_error(cayley(x, w, step)) < 1e-12


def test_it_descends_to_the_nearest_rotation_of_a_target():
    """min -trace(A^T X) over orthogonal X is reached at X = A (the gradient is -A)."""
    a, x = _random_orthogonal(16, 1), _random_orthogonal(16, 2)
    opt = CayleySGD({"x": x}, lr=0.5, momentum=0.5)
    before = -(a * x).sum().item()
    for _ in range(300):
        opt.step({"x": -a})
    after = -(a * opt.matrices["x"]).sum().item()
    assert after < before and abs(after + 16) < 1e-3  # trace(A^T A) = 16
    assert orthogonality_error(opt.matrices["x"]) < 1e-12


def test_a_zero_gradient_leaves_the_matrix_where_it_is():
    x = _random_orthogonal(8, 3)
    opt = CayleySGD({"x": x})
    opt.step({"x": torch.zeros(8, 8)})
    assert torch.equal(opt.matrices["x"], x)


def test_state_round_trips():
    x = _random_orthogonal(8, 4)
    opt = CayleySGD({"x": x})
    opt.step({"x": torch.randn(8, 8, dtype=torch.float64)})
    again = CayleySGD({"x": x})
    again.load(opt.state())
    assert torch.equal(again.matrices["x"], opt.matrices["x"]) and torch.equal(again.momenta["x"], opt.momenta["x"])


def test_orthogonality_error_sees_a_non_orthogonal_matrix():
    assert orthogonality_error(torch.eye(4) * 1.001) > 1e-3
