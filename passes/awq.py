"""AWQ (Lin et al., 2024): activation-aware equalization scales searched on calibration data, and a
search of each weight group's clipping range.

- `awq_scale`, per scale group (q/k/v behind a norm, gate/up, v->o per KV head, up->down): try
  s = mean|x|^a / mean|w|^(1-a) ("duo") or s = mean|x|^a for a on a grid in [0, 1), with the readers'
  weights replaced by Q(W diag(s)) diag(s)^-1, the quantized weights the fold will leave. The loss is
  the squared error of the *enclosing module's* output (the smallest module holding every reader:
  self_attn for q/k/v, the MLP for gate/up, o_proj itself for v->o), against the float output on the
  same recorded calls. The best s is folded like any equalization scale: float outputs unchanged.
- `awq_clip`, per quantized linear but q and k (their errors meet in q.k^T, not at their outputs):
  per output row and input group, the shrink of the range in [1 - max_shrink, 1] whose quantized group
  best reproduces the group's partial output on sampled calibration tokens; the weight is clamped
  there (lossy on purpose: the range the quantizer then sees).

Both sweep the model block by block (`fxquant.calibrate`), so one block's activations are in memory.
"""
from __future__ import annotations

import torch

from fxquant.analysis.structure import Blocked
from fxquant.analysis.dataflow import quantized_sites
from fxquant.calibrate import SiteGroup, observe, require_calibration, sweep
from fxquant.config import AWQConfig
from fxquant.equalize import column_scale, fold_scale, reduce_columns, select_groups
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.quant.numerics import fake_quantize
from fxquant.verify import main_tensor
from fxquant.weights import assign, canonical, set_storage

CLIP_TOKENS = 512  # calibration tokens the clip search measures each linear on (evenly spaced)


def enclosing(group) -> str:
    """The smallest module holding every reader of the group (its output is what AWQ compares)."""
    parts = [r.module.split(".") for r in group.readers]
    common = []
    for names in zip(*parts):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


def weight_mean(cg, group, group_size: int | None) -> torch.Tensor:
    """AWQ's weight salience: |W| over the max of its quantization group, averaged over all rows."""
    total, rows = 0, 0
    for r in group.readers:
        w = canonical(cg.param(r.weight).detach(), r.transposed).float()
        w = w.reshape(-1, w.shape[-1])
        g = group_size or w.shape[-1]
        grouped = w.abs().reshape(w.shape[0], -1, g)
        normed = (grouped / grouped.amax(-1, keepdim=True).clamp_min(1e-8)).reshape(w.shape)
        total, rows = total + normed.sum(0), rows + w.shape[0]
    return reduce_columns((total / rows).double(), group, "mean")


def _candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, cfg: AWQConfig):
    """(description, s) for every point of the grid, normalised so that max(s) * min(s) = 1."""
    modes = (True, False) if cfg.duo_scaling == "both" else (cfg.duo_scaling,)
    for duo in modes:
        for i in range(cfg.grid):
            a = i / cfg.grid
            s = x_mean.pow(a) / w_mean.clamp_min(1e-8).pow(1 - a) if duo else x_mean.pow(a)
            s = s.clamp_min(1e-4)
            yield f"alpha {a:.2f}{' duo' if duo else ''}", s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(cg, group, x_mean: torch.Tensor, calls, cfg: AWQConfig):
    """The grid point whose quantized readers best reproduce the enclosing module's float output, on
    `calls`: the first recorded calls holding `search_tokens` tokens (observe bounds them; whole
    calls, as attention needs whole sequences)."""
    module = cg.model.get_submodule(enclosing(group))
    params = list({id(p): (p, r.transposed) for r in group.readers for p in [cg.param(r.weight)]}.values())
    originals = [p.detach() for p, _ in params]
    reference = [main_tensor(out).float() for _, out in calls]
    w_mean = weight_mean(cg, group, cfg.group_size)
    best = (float("inf"), None, "")
    try:
        for how, s in _candidates(x_mean.double(), w_mean, cfg):
            cols = column_scale(s, group).float()
            for (p, transposed), w in zip(params, originals):
                q = fake_quantize(canonical(w, transposed).float() * cols, cfg.format)
                set_storage(p, canonical(q / cols, transposed).to(w.dtype).contiguous())
            loss = sum(float(call.kept((main_tensor(call.run(module)).float() - ref) ** 2).sum())
                       for (call, _), ref in zip(calls, reference))  # padded positions do not count
            if loss < best[0]:
                best = (loss, s, how)
    finally:
        for (p, _), w in zip(params, originals):
            set_storage(p, w)
    used = sum(call.tokens(main_tensor(out)) for call, out in calls)
    return best[1], f"{best[2]}, searched on {used} tokens"


@fxpass(requires={"weights_float"}, provides={"equalized"}, invalidates={"graph"}, check=require_calibration)
def awq_scale(cg, structure, cfg: AWQConfig | None) -> PassResult:
    """AWQ's scale search, folded like any equalization scale (float outputs unchanged)."""
    cfg = cfg or AWQConfig()
    chosen, blocked = select_groups(cg, structure, cfg.scope)
    where, changes = dict(chosen), []
    for block, here in sweep(cg, list(where)):
        stats, _, calls = observe(block, stats_of={where[g] for g in here},
                                  calls_of={enclosing(g): cfg.search_tokens for g in here}, keep_outputs=True)
        found = [(g, *search_scale(cg, g, reduce_columns(stats[where[g]].abs_mean.double(), g, "mean"),
                                   calls[enclosing(g)], cfg)) for g in here]
        for g, s, how in found:  # every search saw the float block: fold only after all of them
            change = fold_scale(cg, g, s, getattr(torch, cfg.precision))
            changes.append(Change(change.kind, change.target, f"{change.detail}; {how}"))
    return PassResult(tuple(changes), tuple(blocked))


def query_key_nodes(structure) -> set[str]:
    """Linears that make queries or keys: the other readers of the norm that feeds a v projection,
    and a fused qkv projection (whose rows are not all v)."""
    v_rows = {c.v.node: sum(h.v_rows[1] - h.v_rows[0] for h in c.heads) for c in structure.vo_chains}
    out = set()
    for g in structure.stream.groups:
        if any(r.node in v_rows for r in g.readers):
            out |= {r.node for r in g.readers if r.node not in v_rows or v_rows[r.node] != r.out_features}
    return out


@torch.no_grad()
def clip_ranges(w: torch.Tensor, x: torch.Tensor, cfg: AWQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output row, input group) of w [out, in], the clamp range (lo, hi) whose quantized group
    best reproduces x @ W_group^T on tokens x [n, in], each shaped [out, groups, 1]. Candidates
    shrink the range by 1 - i/grid: [-max|W|, max|W|] for a symmetric quantizer, min and max
    each for an asymmetric one (its grid follows min and max, not max|W|)."""
    out_f, in_f = w.shape
    g = cfg.group_size or in_f
    wg = w.float().reshape(out_f, -1, g)
    xg = x.float().reshape(x.shape[0], -1, g).transpose(0, 1)  # [groups, n, g]: one matmul per group

    def partial(weights):  # [out, groups, g] -> the group's partial outputs [groups, n, out]
        return torch.bmm(xg, weights.permute(1, 2, 0))

    reference = partial(wg)
    if cfg.symmetric:
        hi = wg.abs().amax(-1, keepdim=True)
        lo = -hi
    else:
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    best, best_err = (lo.clone(), hi.clone()), torch.full(hi.shape[:2], float("inf"))
    for i in range(int(cfg.max_shrink * cfg.grid) + 1):
        shrink = 1 - i / cfg.grid
        q = fake_quantize(torch.clamp(wg, lo * shrink, hi * shrink).reshape(out_f, in_f), cfg.format).reshape(wg.shape)
        err = ((partial(q) - reference) ** 2).mean(1).transpose(0, 1)  # [out, groups]
        better = err < best_err
        best = tuple(torch.where(better[..., None], end * shrink, b) for end, b in zip((lo, hi), best))
        best_err = torch.where(better, err, best_err)
    return best


@fxpass(requires={"weights_float"}, provides={"weights_clipped"}, invalidates={"outputs"},
        check=require_calibration)
def awq_clip(cg, structure, cfg: AWQConfig | None) -> PassResult:
    """Clamp each quantized weight group to the range AWQ's clip search finds (not q and k)."""
    cfg = cfg or AWQConfig()
    qk, changes = query_key_nodes(structure), []
    hookable, hidden = quantized_sites(cg)
    blocked = [Blocked(s.node, s.module, "its module's input is not the linear's input")
               for s in hidden if s.node not in qk]
    for block, here in sweep(cg, [SiteGroup(s) for s in hookable if s.node not in qk]):
        _, inputs, _ = observe(block, inputs_of={g.readers[0].module for g in here})
        for g in here:
            site = g.readers[0]
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[site.module]])
            x = x[torch.linspace(0, len(x) - 1, min(len(x), CLIP_TOKENS)).long()]
            weight = cg.param(site.weight)
            w = canonical(weight.detach(), site.transposed)
            lo, hi = clip_ranges(w, x, cfg)
            grouped = w.float().reshape(lo.shape[0], lo.shape[1], -1)
            assign(weight, canonical(torch.clamp(grouped, lo, hi).reshape(w.shape), site.transposed))
            shrunk = float(((lo > grouped.amin(-1, keepdim=True)) | (hi < grouped.amax(-1, keepdim=True))).float().mean())
            changes.append(Change("clipped", site.module, f"{shrunk:.0%} of groups' ranges shrunk"))
    return PassResult(tuple(changes), tuple(blocked))

