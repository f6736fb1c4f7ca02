"""Cayley SGD with momentum on the orthogonal group: learned rotations that stay rotations.

Entry points: `CayleySGD(matrices, lr, momentum)` (`.step(grads, lr)`, `.state()`, `.load(state)`)
and `orthogonality_error(x)`. The one idea (Li, Li & Todorovic, "Efficient Riemannian optimization
on the Stiefel manifold via the Cayley transform", ICLR 2020, Algorithm 2): the Euclidean gradient G
becomes a skew-symmetric generator W = M X^T - X M^T of the momentum M, and X moves along the Cayley
curve Y(a) = (I - a/2 W)^-1 (I + a/2 W) X, which maps an orthogonal X to an orthogonal Y for any
step a. We solve that linear system exactly in float64 (the paper's fixed-point iteration leaves an
O(a^3) error), so ||X^T X - I|| stays at float64 rounding; the step is capped at a <= 2q / ||W||
as in the paper. Pure tensor math: no fx, no modules.
"""
from __future__ import annotations

import torch

DTYPE = torch.float64
Q_CAP = 0.5  # the paper's q: the step a is at most 2q / ||W||_F


def orthogonality_error(x: torch.Tensor) -> float:
    """max |X^T X - I| in float64: 0 for an exactly orthogonal matrix."""
    x = x.to(DTYPE)
    return (x.T @ x - torch.eye(x.shape[1], dtype=DTYPE, device=x.device)).abs().max().item()


def skew_generator(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W = What - What^T with What = M X^T - 1/2 X (X^T M X^T): the tangent direction of M at X."""
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    return w_hat - w_hat.T


def cayley(x: torch.Tensor, w: torch.Tensor, step: float) -> torch.Tensor:
    """Y = (I - a/2 W)^-1 (I + a/2 W) X: orthogonal whenever X is and W is skew-symmetric."""
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    return torch.linalg.solve(eye - 0.5 * step * w, (eye + 0.5 * step * w) @ x)


class CayleySGD:
    """Momentum SGD for named orthogonal matrices (float64 masters), one Cayley step each.

    Example::

        opt = CayleySGD({"R1": r1, "R2": r2}, lr=1.5, momentum=0.9)
        opt.step({"R1": g1, "R2": g2})   # each matrix replaced by its updated, still orthogonal value
        opt.matrices["R1"]               # the new R1 (float64)
    """

    def __init__(self, matrices: dict[str, torch.Tensor], lr: float = 1.5, momentum: float = 0.9):
        self.matrices = {k: m.detach().to(DTYPE).clone() for k, m in matrices.items()}
        self.momenta = {k: torch.zeros_like(m) for k, m in self.matrices.items()}
        self.lr, self.momentum = float(lr), float(momentum)

    def step(self, grads: dict[str, torch.Tensor], lr: float | None = None) -> None:
        """Move every matrix down its gradient (dLoss/dX, any float dtype) by one Cayley step."""
        lr = self.lr if lr is None else float(lr)
        for key, x in self.matrices.items():
            m = self.momentum * self.momenta[key] - grads[key].detach().to(DTYPE)
            w = skew_generator(x, m)
            self.momenta[key] = w @ x  # the momentum, projected onto the tangent space at X
            norm = w.norm().item()
            if norm == 0.0:
                continue
            self.matrices[key] = cayley(x, w, min(lr, 2 * Q_CAP / (norm + 1e-8)))

    def state(self) -> dict[str, torch.Tensor]:
        """Each matrix under its name and its momentum under `momentum:<name>`, for a checkpoint."""
        return {**self.matrices, **{f"momentum:{k}": m for k, m in self.momenta.items()}}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state()` (the names and shapes must be this optimiser's)."""
        for key in self.matrices:
            self.matrices[key] = state[key].to(DTYPE).clone()
            self.momenta[key] = state[f"momentum:{key}"].to(DTYPE).clone()
