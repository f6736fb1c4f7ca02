"""Norm fusion: move every residual-stream norm's weight (and LayerNorm bias) into its readers.

    reader(normalize(x) * w + b)  ==  reader'(normalize(x))   with  W' = W diag(w),  c' = c + W b

After `fold_norms` each stream norm is weightless (w = 1, or 0 for Gemma's `1 + w`), so a rotation
of the stream commutes with it. LayerNorm also subtracts the mean, which no rotation commutes with:
`fold_norms` makes the stream mean-free (every embedding row and writer output centred: exact,
since every reader subtracts the mean anyway), then `layernorms_to_rms` swaps each such LayerNorm
for a weightless RMSNorm, equal on mean-free inputs. RMSNorm models are never centred (that would
change their outputs).
"""
from __future__ import annotations

import torch

from fxquant.analysis.structure import NORM_FOLD, RESIDUAL, Blocked, scope
from fxquant.config import NormFoldConfig
from fxquant.errors import UnsupportedPatternError
from fxquant.pipeline import GRAPH, Change, PassResult, fxpass
from fxquant.weights import (
    add_bias, assign, center_out, normalize_rows, replace_module, scale_in, shift_in, untie_shared,
)

STILL = ("What still works on this model: the quantizers without rotations (presets w4a16, w8a8, gptq-w4a16, "
         "awq-w4a16, smoothquant-w8a8) and rotate_vo (R2) alone")
CENTRED_ATOL = 1e-5  # relative: |row mean| <= CENTRED_ATOL * max|row| counts as mean-free


def _precision(cfg) -> torch.dtype:
    return getattr(torch, (cfg or NormFoldConfig()).precision)


def _untie_reader(cg, reader) -> Change | None:
    """Give a tied reader (lm_head sharing the embedding) its own weight before it is scaled."""
    if not untie_shared(cg.model, reader.module, reader.weight.name):
        return None
    return Change("untied", reader.weight.fqn, "its tied twin keeps the old values")


def _check_layernorm_model(structure) -> bool:
    """True when the stream must be centred; refuse a mix the centring would make wrong."""
    kinds = {g.norm.kind if g.norm else "none" for g in structure.stream.groups}
    if "layer" not in kinds:
        return False
    if kinds != {"layer"}:
        bare = [g for g in structure.stream.groups if g.norm is None or g.norm.kind != "layer"]
        where = bare[0].norm.module if bare[0].norm else bare[0].readers[0].module
        raise UnsupportedPatternError(
            f"fold_norms refused, nothing was changed: this model mixes LayerNorm with readers of the residual "
            f"stream that do not subtract the mean (first: '{where}'), so making the stream mean-free would "
            f"change its outputs; rotations cannot be applied to it. {STILL}")
    return True


def _fold_group(cg, group, prec) -> list[Change]:
    norm, changes = group.norm, []
    weight = cg.param(norm.weight) if norm.weight is not None else None
    scale = (weight.detach().double() + norm.offset) if weight is not None else None
    bias = cg.param(norm.bias) if norm.bias is not None else None
    for reader in group.readers:
        untied = _untie_reader(cg, reader)
        changes += [untied] if untied else []
        w = cg.param(reader.weight)
        if bias is not None:  # c' = c + W b, with the W from before the scale below
            rb = cg.param(reader.bias) if reader.bias else add_bias(cg.model.get_submodule(reader.module),
                                                                   reader.out_features, w)
            shift_in(w, rb, bias.detach(), transposed=reader.transposed, precision=prec)
        if scale is not None:
            scale_in(w, scale, transposed=reader.transposed, precision=prec)
        changes.append(Change("scaled", reader.module, f"input channels by {norm.module}"))
    if weight is not None:
        assign(weight, torch.full_like(weight, 1.0 - norm.offset))
    if bias is not None:
        assign(bias, torch.zeros_like(bias))
    return changes + [Change("folded", norm.module, f"{norm.kind} norm now weightless")]


def _refuse_expert_readers_of_biased_norms(structure) -> None:
    for g in structure.stream.groups:
        for r in g.readers:
            if g.norm is not None and g.norm.bias is not None and r.experts:
                raise UnsupportedPatternError(
                    f"fold_norms refused, nothing was changed: LayerNorm '{g.norm.module}' has a bias and its "
                    f"reader '{r.module}' is a stack of {r.experts} experts with no bias to absorb it. {STILL}")


@fxpass(requires={"weights_float"}, provides={"norms_folded"})
def fold_norms(cg, structure, cfg: NormFoldConfig | None) -> PassResult:
    """Fold each stream norm's weight/bias into its readers; centre the stream of LayerNorm models."""
    cfg = cfg or NormFoldConfig()
    structure.refuse_if_blocked("fold_norms", (), strict=cfg.strict)
    groups, left = _foldable_groups(structure)
    unproven = structure.blocking([RESIDUAL])  # centring edits every writer: the whole stream must be known
    centre = not unproven and _check_layernorm_model(structure)
    if unproven and any(g.norm.kind == "layer" for g in groups):
        left += (Blocked(unproven[0].node, unproven[0].module, "the stream is not centred (LayerNorm stays): "
                                                                 + unproven[0].reason, unproven[0].blocks),)
    _refuse_expert_readers_of_biased_norms(structure)
    prec, changes = _precision(cfg), []
    own = [src for src in structure.stream.sources if src.norm is not None]
    for src in own:  # first: a tied lm_head keeps the table it had, and centring sees the folded rows
        changes += _fold_source_norm(cg, src, prec)
    for group in groups:
        changes += _fold_group(cg, group, prec)
    if centre:  # after the folds: a tied lm_head was untied above, so centring the embedding spares it
        for src in structure.stream.sources:
            if untie_shared(cg.model, src.module, src.weight.name):  # an output layer sharing it keeps its rows
                changes.append(Change("untied", src.weight.fqn, "its tied twin keeps the old values"))
            center_out(cg.param(src.weight), None, transposed=True, precision=prec)
            changes.append(Change("centred", src.module, "embedding rows mean-free"))
        for w in structure.stream.writers:
            center_out(cg.param(w.weight), cg.param(w.bias) if w.bias else None,
                       transposed=w.transposed, precision=prec)
            changes.append(Change("centred", w.module, "outputs mean-free"))
    return PassResult(tuple(changes), left, invalidates={GRAPH} if own else ())  # a norm became Identity


def _fold_source_norm(cg, src, prec) -> list[Change]:
    """norm(E[ids]) == norm(E)[ids]: the embedding's own norm moves into its table, the module becomes
    Identity (the stream then starts at the lookup, and R1 folds into the table as usual)."""
    norm, changes = src.norm, []
    if untie_shared(cg.model, src.module, src.weight.name):
        changes.append(Change("untied", src.weight.fqn, "its tied twin keeps the old values"))
    affine = tuple(cg.param(ref) if ref else None for ref in (norm.weight, norm.bias))
    normalize_rows(cg.param(src.weight), affine, kind=norm.kind, eps=norm.eps, offset=norm.offset, precision=prec)
    replace_module(cg.model, norm.module, torch.nn.Identity())
    return changes + [Change("folded", norm.module, f"{norm.kind} norm of {src.module} folded into its table "
                                                    "(now Identity)")]


def _foldable_groups(structure):
    """The stream norms whose fold is proven, and the places that left the others as they are."""
    groups, left = [], []
    for group in structure.stream.groups:
        if group.norm is None:
            continue
        stop = structure.blocking([scope(NORM_FOLD, group.norm.module)])
        if stop:
            left += stop
        else:
            groups.append(group)
    return groups, tuple(dict.fromkeys(left))


def _mean_free(t: torch.Tensor, transposed: bool) -> bool:
    """Every output (row of [out, in]: column of the stored tensor when transposed) sums to ~0."""
    w = t.detach().double()
    w = w if transposed else w.transpose(-1, -2)  # -> [..., in, out]: mean over the stream width
    return bool((w.mean(dim=-1).abs() <= CENTRED_ATOL * w.abs().amax(dim=-1).clamp_min(1e-30)).all())


def _refuse_uncentred(cg, structure) -> None:
    pieces = [(s.module, cg.param(s.weight), True) for s in structure.stream.sources]
    pieces += [(w.module, cg.param(w.weight), w.transposed) for w in structure.stream.writers]
    for module, weight, transposed in pieces:
        if not _mean_free(weight, transposed):
            raise UnsupportedPatternError(
                f"layernorms_to_rms refused, nothing was changed: '{module}' writes to the residual stream "
                "values that are not mean-free, so LayerNorm and RMSNorm differ there; run fold_norms first")


@fxpass(requires={"norms_folded", "weights_float"}, provides={"norms_rms"}, invalidates={"graph"})
def layernorms_to_rms(cg, structure, cfg) -> PassResult:
    """Swap each folded stream LayerNorm for a weightless RMSNorm (equal on a mean-free stream)."""
    norms = [g.norm for g in structure.stream.groups if g.norm is not None and g.norm.kind == "layer"]
    if not norms:
        return PassResult()
    unproven = structure.blocking([RESIDUAL])
    if unproven:  # the stream was not centred (fold_norms said why): the LayerNorms must stay
        return PassResult((), (Blocked(unproven[0].node, unproven[0].module, "LayerNorms kept: the stream "
                                       "cannot be centred, " + unproven[0].reason, unproven[0].blocks),))
    _refuse_uncentred(cg, structure)
    for norm in norms:
        for ref, identity, what in ((norm.weight, 1.0 - norm.offset, "weight"), (norm.bias, 0.0, "bias")):
            if ref is not None and not bool((cg.param(ref) == identity).all()):
                raise UnsupportedPatternError(
                    f"layernorms_to_rms refused, nothing was changed: LayerNorm '{norm.module}' still has a "
                    f"non-trivial {what}; run fold_norms first")
    changes = []
    for norm in norms:
        old = cg.model.get_submodule(norm.module)
        like = next(iter(old.parameters()), None)
        rms = torch.nn.RMSNorm(norm.width, eps=norm.eps, elementwise_affine=False)
        replace_module(cg.model, norm.module, rms.to(like.device) if like is not None else rms)
        changes.append(Change("replaced", norm.module, f"LayerNorm -> RMSNorm(eps={norm.eps:g})"))
    return PassResult(tuple(changes))
