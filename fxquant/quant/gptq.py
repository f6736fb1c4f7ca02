"""GPTQ (Frantar et al., 2023): round a weight one input channel at a time, and push each channel's
rounding error onto the channels not yet rounded, weighted by the inverse Hessian of the layer's
inputs, so the layer's *output* error on calibration data is what gets minimised.

Entry point: `gptq_quantize(weight, hessian, bits, symmetric, ...)` -> a `QuantizedWeight` (codes,
scales and zeros in the numerics of `fxquant.quant.numerics`: its values are exactly what
`fake_quantize` gives with the same scales). Pure tensor math: the Hessian comes from the caller (`passes/gptq.py`).

The steps: dead input channels (never active) are zeroed; the Hessian is dampened by
`damp * mean(diag H)`; optionally channels are processed by decreasing diag H (`act_order`); the
upper Cholesky factor of H^-1 drives the updates; columns are handled in blocks of `block_size`
whose updates to later columns are applied once per block (lazy batch updates). Scales: per output
channel they are computed once from the whole weight (with the clip search when asked); in groups
they are computed when a group starts, from the already-updated weights of that group (with
act_order, all groups' scales are computed up front from the original weight).
"""
from __future__ import annotations

import torch

from fxquant.quant.numerics import QuantizedWeight, quantized_weight, round_column, weight_qparams


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


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, symmetric: bool,
                  group_size: int | None = None, clip_ratio: float = 1.0, clip_search: bool = False,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  float_zero: bool = False) -> QuantizedWeight:
    """GPTQ-quantize `weight` [out, in] given the input Hessian [in, in]; scales are stored in its dtype."""
    numerics = dict(bits=bits, symmetric=symmetric, float_zero=float_zero)
    grid = dict(clip_ratio=clip_ratio, clip_search=clip_search, float_zero=float_zero, dtype=weight.dtype)
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    if group_size is not None and in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f)
    static = None
    if group_size is None or act_order:  # every scale fixed up front, from the original weight
        scale, zero = weight_qparams(w, bits, symmetric, group_size, **grid)
        static = (scale[..., 0], None if zero is None else zero[..., 0])  # [out, groups]
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_f, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    step = block_size if group_size is None else max(group_size, block_size // group_size * group_size)
    codes = torch.zeros_like(w)
    groups = 1 if group_size is None else in_f // group_size
    scales, zeros = torch.zeros(out_f, groups), torch.zeros(out_f, groups)  # as used, per original group
    scale = zero = None
    for start in range(0, in_f, step):
        end = min(start + step, in_f)
        w1, err1, hinv1 = w[:, start:end].clone(), torch.zeros(out_f, end - start), hinv[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = 0 if group_size is None else column // group_size
            if static is not None:
                scale, zero = static[0][:, g], None if static[1] is None else static[1][:, g]
            elif column % group_size == 0:  # a group starts: its scales from its updated weights
                s, z = weight_qparams(w1[:, i:i + group_size], bits, symmetric, None, **grid)
                scale, zero = s[:, 0, 0], None if z is None else z[:, 0, 0]
            scales[:, g] = scale
            if zero is not None:
                zeros[:, g] = zero
            code, qcol = round_column(w1[:, i], scale, zero, **numerics)
            codes[:, start + i] = code
            err = (w1[:, i] - qcol) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, end:] -= err1 @ hinv[start:end, end:]
    back = torch.argsort(order)
    return quantized_weight(codes[:, back], scales[..., None], None if symmetric else zeros[..., None],
                            group_size=group_size, dtype=weight.dtype, **numerics)
