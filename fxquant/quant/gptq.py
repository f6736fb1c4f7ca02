"""GPTQ (Frantar et al., 2023): round a weight one input channel at a time, and push each channel's
rounding error onto the channels not yet rounded, weighted by the inverse Hessian of the layer's
inputs, so the layer's *output* error on calibration data is what gets minimised.

Entry point: `gptq_quantize(weight, hessian, fmt, options)` -> a `QuantizedWeight` (codes, scales and
zeros in the numerics of `fxquant.quant.numerics`: its values are exactly what `fake_quantize` gives
with the same scales). Pure tensor math: the Hessian comes from the caller (`passes/gptq.py`).

The objective, per output row w of W [out, in] and its rounding q:  min (w - q) H (w - q)^T with
H = 2/n X^T X over the calibration inputs X [n, in] (so it is the output error |X w^T - X q^T|^2).
Fixing column j at q_j with error e_j = w_j - q_j, the remaining columns F move by the optimal
brain surgeon update  dw_F = -e_j * [H_F^-1]_{j,F} / [H_F^-1]_{jj}, where H_F^-1 is the inverse of
H restricted to the columns not yet rounded. The steps: dead input channels (never active) are
zeroed; H is dampened by `damp * mean(diag H)`; optionally channels are processed by decreasing
diag H (`act_order`); the upper Cholesky factor of H^-1 gives every H_F^-1 row the updates need;
columns are handled in blocks of `block_size` whose updates to later columns are applied once per
block (lazy batch updates). Scales: per output channel they are computed once from the whole weight
(with the clip search when asked); in groups they are computed when a group starts, from the
already-updated weights of that group (with act_order, all groups' scales are computed up front
from the original weight).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import QuantizedWeight, quantized_weight, round_column, weight_qparams


@dataclass(frozen=True)
class GPTQOptions:
    """The solver's knobs (a recipe's GPTQConfig validates them): dampening as a fraction of mean
    diag H, the block size of lazy updates, act_order, and how scales are chosen (a fixed clip ratio
    or the per-group clip search of `weight_qparams`)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    clip_ratio: float = 1.0
    clip_search: bool = False


def hessian_update(hessian: torch.Tensor | None, count: int, x: torch.Tensor,
                   xtx: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Running H = 2/n * sum x^T x over every token of x [..., in]; returns (H, n). `xtx`: x^T x when
    the caller already has it (linears that read one input share it)."""
    x = x.detach().reshape(-1, x.shape[-1])
    n = x.shape[0]
    xtx = gram(x) if xtx is None else xtx
    h = torch.zeros_like(xtx) if hessian is None else hessian
    total = count + n
    return h * (count / total) + xtx * (2.0 / total), total


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x of x [..., in] in float64 (the product in float32: its sum over a window is exact enough)."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return (x.T @ x).double()


def input_aware_target(weight: torch.Tensor, hessian_q: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """W* [out, in] for GPTQ on quantized inputs (GPTAQ-style): with X the float inputs, X~ the
    quantized ones the layer will read, H~ = X~^T X~ and C = X~^T X (same normalisation),

        ||X W^T - X~ W_hat^T||^2 = ||X~ (W* - W_hat)^T||^2 + const   for   H~ W*^T = C W^T

    so GPTQ(W*, H~) minimises the output error against the float layer on float inputs, the
    activation quantizer's error included. H~ is dampened as GPTQ dampens it."""
    h = hessian_q.detach().double().clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    target = torch.linalg.solve(h, cross.detach().double() @ weight.detach().double().T)
    return target.T.to(weight.dtype)


def cross_update(cross: torch.Tensor | None, xq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Running sum of X~^T X over the rows of xq and x [..., in] (float64, as `gram`; not normalised)."""
    xq, x = xq.detach().reshape(-1, xq.shape[-1]).float(), x.detach().reshape(-1, x.shape[-1]).float()
    update = (xq.T @ x).double()
    return update if cross is None else cross + update


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """U upper triangular with H^-1 = U^T U (float32), which holds every inverse GPTQ needs.

    Rounding columns 0..j-1 leaves the columns F = j..n-1, whose inverse Hessian is the inverse of
    H's block H_FF, i.e. the Schur complement of H^-1 = U^T U on F, which is U_FF^T U_FF. Its row j
    is U[j,j] * U[j, j:], so  [H_F^-1]_{j,j:} / [H_F^-1]_{jj} = U[j, j:] / U[j, j]:  one
    factorisation replaces a re-inversion per column. H^-1 itself comes from H's own Cholesky
    factor (cholesky_inverse), in float64.
    """
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def _static_qparams(w: torch.Tensor, fmt: QuantFormat, options: GPTQOptions, dtype: torch.dtype):
    """Every (scale, zero) [out, groups] fixed up front from the original weight."""
    scale, zero = weight_qparams(w, fmt, options.clip_ratio, options.clip_search, dtype=dtype)
    return scale[..., 0], None if zero is None else zero[..., 0]


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat,
                  options: GPTQOptions = GPTQOptions()) -> QuantizedWeight:
    """GPTQ-quantize `weight` [out, in] in `fmt` given the input Hessian [in, in]; scales are stored
    in the weight's dtype."""
    group_size = fmt.group_size
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    if group_size is not None and in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    h = hessian.detach().double().clone()
    # a dead input (x_j = 0 on every token) leaves H_jj = 0: its weight never reaches the output, so
    # zero it and put 1 on the diagonal to keep H invertible
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # act_order: a permutation P by decreasing diag H (the most active inputs first, so their errors
    # spread over the most columns); the solver works on W P and P^T H P, codes are permuted back
    order = torch.argsort(torch.diag(h), descending=True) if options.act_order else torch.arange(in_f)
    static = None
    if group_size is None or options.act_order:  # per channel, or groups met out of order: scales fixed now
        static = _static_qparams(w, fmt, options, weight.dtype)
    w, h = w[:, order], h[order][:, order]
    # dampening: H + lambda I, lambda = damp * mean(diag H), keeps the inverse well conditioned
    h += options.damp * torch.mean(torch.diag(h)) * torch.eye(in_f, dtype=h.dtype)
    hinv = _upper_cholesky_of_inverse(h)
    step = options.block_size if group_size is None else max(group_size, options.block_size // group_size * group_size)
    codes = torch.zeros_like(w)
    groups = 1 if group_size is None else in_f // group_size
    scales, zeros = torch.zeros(out_f, groups), torch.zeros(out_f, groups)  # as used, per original group
    scale = zero = None
    whole = dataclasses.replace(fmt, group_size=None)  # one group's slice [out, group_size] at a time
    for start in range(0, in_f, step):
        # lazy batch updates: inside the block [start, end) each column's update reaches only the
        # block's own columns; the scaled errors E[:, i] = e_i / U[i, i] are kept, and the columns
        # after the block get all of them at once, W[:, end:] -= E U[start:end, end:], the same sum
        # of rank-1 updates as one at a time (no later column feeds back into E) in one matmul
        end = min(start + step, in_f)
        w1, err1, hinv1 = w[:, start:end].clone(), torch.zeros(out_f, end - start), hinv[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = 0 if group_size is None else column // group_size
            if static is not None:
                scale, zero = static[0][:, g], None if static[1] is None else static[1][:, g]
            elif column % group_size == 0:  # a group starts: its scales from its updated weights
                s, z = weight_qparams(w1[:, i:i + group_size], whole, options.clip_ratio, options.clip_search,
                                      dtype=weight.dtype)
                scale, zero = s[:, 0, 0], None if z is None else z[:, 0, 0]
            scales[:, g] = scale
            if zero is not None:
                zeros[:, g] = zero
            code, qcol = round_column(w1[:, i], scale, zero, fmt)
            codes[:, start + i] = code
            # the OBS update with U (see _upper_cholesky_of_inverse), e_j = w_j - q_j:
            #   W[:, j+1:] -= e_j * Hinv_F[j, j+1:] / Hinv_F[j, j]  =  (e_j / U[j, j]) * U[j, j+1:]
            # (column j itself becomes q_j, which is never read again)
            err = (w1[:, i] - qcol) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, end:] -= err1 @ hinv[start:end, end:]
    back = torch.argsort(order)
    return quantized_weight(codes[:, back], scales[..., None], None if fmt.symmetric else zeros[..., None], fmt,
                            weight.dtype)
