"""Equalization: per-channel scales folded into the op that produces a layer's input.

    x W^T = (x / s)(W diag(s))^T      readers' input columns * s; the producer's output * 1/s

Where the 1/s goes comes from `fxquant.analysis.equalize.scale_groups` (a norm's weight, a linear's
output rows, or an explicit multiply when nothing can absorb it); `fxquant.equalize.fold_scale` is
the one place that applies it. Passes here: `smooth_quant` (SmoothQuant, calibrated) and
`cross_layer_equalize` (Nagel et al. 2019, data-free). AWQ, which searches its scales, is in
`awq.py`. Every one leaves the float model's outputs unchanged.
"""
from __future__ import annotations

import torch

from fxquant.calibrate import observe, require_calibration, sweep
from fxquant.config import CLEConfig, SmoothQuantConfig
from fxquant.equalize import fold_scale, reduce_columns, select_groups, smooth_scale, weight_abs_max
from fxquant.pipeline import PassResult, fxpass
from fxquant.weights import canonical


@fxpass(requires={"weights_float"}, provides={"equalized"}, invalidates={"graph"}, check=require_calibration)
def smooth_quant(cg, structure, cfg: SmoothQuantConfig | None) -> PassResult:
    """SmoothQuant: move activation outliers into the weights, per input channel of each group."""
    cfg = cfg or SmoothQuantConfig()
    chosen, blocked = select_groups(cg, structure, cfg.scope)
    where, changes = dict(chosen), []
    for block, here in sweep(cg, list(where)):
        stats, _, _ = observe(block, stats_of={where[g] for g in here}, keep_outputs=True)
        for g in here:
            x_max = reduce_columns(stats[where[g]].abs_max.double(), g)
            changes.append(fold_scale(cg, g, smooth_scale(x_max, weight_abs_max(cg, g), cfg.alpha),
                                      getattr(torch, cfg.precision)))
    return PassResult(tuple(changes), tuple(blocked))


@fxpass(requires={"weights_float"}, provides={"equalized"})
def cross_layer_equalize(cg, structure, cfg: CLEConfig | None) -> PassResult:
    """Cross-layer equalization (data-free): for each linear -> per-channel-safe op -> linear pair,
    s = sqrt(r1 / r2) with r1 the range of the producer's row, r2 of the reader's column, so both
    end with sqrt(r1 r2). The producer's bias is scaled with its row."""
    cfg = cfg or CLEConfig()
    chosen, blocked = select_groups(cg, structure, "foldable", need_observer=False)
    changes = []
    for g, _ in chosen:
        if g.fold != "rows":
            continue
        w = canonical(cg.param(g.producer.weight).detach(), g.producer.transposed).abs()
        w = w.flatten(0, -3).amax(0) if w.dim() > 2 else w  # a stack of experts: the largest of each row
        r1 = torch.cat([w[a:b].amax(-1) for a, b in g.rows]).double()
        r2 = weight_abs_max(cg, g)
        s = torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp(min=1e-12)).sqrt(), torch.ones_like(r1))
        changes.append(fold_scale(cg, g, s, getattr(torch, cfg.precision)))
    return PassResult(tuple(changes), tuple(blocked))
