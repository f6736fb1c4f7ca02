"""R1 (SpinQuant / QuaRot): rotate the whole residual stream by one orthogonal Q, folded into weights.

    embeddings:  E' = E Q                 (the stream starts rotated: x' = x Q)
    writers:     W' = Q^T W,  b' = b Q     (each residual add stays rotated)
    readers:     W' = W Q                  (x' W'^T = x Q Q^T W^T = x W^T)

Weightless RMSNorms in between commute with Q (||x Q|| = ||x||), so the float model computes the same
function, while the stream (and every reader's weight) loses its outlier channels. Requires
`fold_norms` (and `layernorms_to_rms` for LayerNorm models). Tied embeddings stay tied: the
embedding and a tied lm_head both become E Q, so the shared tensor is rotated once.

Online R1 (`mode = "online"`, or `"auto"` where analysis cannot prove the fold, e.g. a norm on a
writer's output in sandwich-norm blocks): the stream is left as it is and each reader's input is
rotated at inference instead, x -> hadamard(x) with W' = W H^T / sqrt(n), the same activation benefit
for one online op per reader (it fuses with the reader's activation quantizer when lowered).
"""
from __future__ import annotations

import torch

from fxquant.analysis.dataflow import hookable_modules
from fxquant.analysis.structure import NORM_FOLD, RESIDUAL, Blocked, scope
from fxquant.config import ResidualRotationConfig
from fxquant.errors import UnsupportedPatternError
from fxquant.hadamard import check_rotation, rotation_operator
from fxquant.install import install_online_hadamard
from fxquant.rotations import R1, check_learned_source, learned_matrix, refuse_unfolded_norms, residual_edits
from fxquant.pipeline import GRAPH, Change, PassResult, fxpass
from fxquant.weights import rotate_in, rotate_out, shared_names, untie_shared

PURPOSE = "rotate_residual (R1)"
STILL = ("rotate_residual with mode = 'online' or 'auto' (each reader's input rotated at inference), rotate_vo "
         "(R2), insert_online_hadamard (R4), rotate_qk (R3) and every quantizer")


def _math(role: str, transposed: bool) -> str:
    """The identity an edit applies to the stored tensor, to detect ties that need the same edit."""
    if role == "reader":
        return "T @ Q" if not transposed else "Q^T @ T"
    return "T @ Q" if transposed else "Q^T @ T"  # embedding / writer: rotate the output channels


def resolved_mode(structure, cfg) -> str:
    """"fold" or "online": what `cfg.mode` means on this model ("auto": fold unless a place blocks it)."""
    mode = getattr(cfg, "mode", "fold")  # a RotationConfig saved before modes existed folded
    if mode == "auto":
        return "online" if structure.blocking([RESIDUAL]) else "fold"
    return mode


def check_rotation_size(cg, structure, cfg: ResidualRotationConfig | None) -> None:
    """Before any pass runs: the rotation asked for exists for the widths it will touch."""
    cfg = cfg or ResidualRotationConfig()
    online = resolved_mode(structure, cfg) == "online"
    if online and cfg.rotation == "learned":
        first = structure.blocking([RESIDUAL])
        why = f": {first[0]}" if first else ""
        raise UnsupportedPatternError(
            f"{PURPOSE}: a learned R1 is folded into the stream, but this model needs R1 online{why}. Use "
            "rotate_residual's rotation = 'random-hadamard' (R2 alone is then learned), or mode = 'fold' where the "
            "model allows it")
    if cfg.rotation == "learned":
        check_learned_source(cg, cfg, PURPOSE)
    elif online:
        for width in sorted({r.in_features for g in structure.stream.groups for r in g.readers}):
            check_rotation("hadamard", width)
    else:
        check_rotation(cfg.rotation, structure.stream.width, cfg.block_size)


@fxpass(requires={"norms_folded", "weights_float"}, provides={"residual_rotated"}, check=check_rotation_size)
def rotate_residual(cg, structure, cfg: ResidualRotationConfig | None) -> PassResult:
    """Fold one orthogonal Q (R1) into every embedding, residual writer and reader, or rotate each
    reader's input online where the stream cannot be rotated by folding (`cfg.mode`)."""
    cfg = cfg or ResidualRotationConfig()
    if resolved_mode(structure, cfg) == "online":
        return _rotate_online(cg, structure, cfg)
    structure.refuse_if_blocked(PURPOSE, [RESIDUAL], strict=cfg.strict, still=STILL)
    refuse_unfolded_norms(cg, structure, PURPOSE)
    return _fold(cg, structure, cfg)


def _fold(cg, structure, cfg) -> PassResult:
    prec = getattr(torch, cfg.precision)
    if cfg.rotation == "learned":
        q = learned_matrix(cg, R1, PURPOSE)
    else:
        q = rotation_operator(cfg.rotation, structure.stream.width, seed=cfg.seed, block_size=cfg.block_size)
    done: dict[int, tuple[str, str]] = {}  # id(tensor) -> (math, module): a tied tensor is edited once
    changes = _untie_from_outside(cg, structure)
    for role, module, ref, bias, transposed in residual_edits(structure):
        tensor, math = cg.param(ref), _math(role, transposed)
        if id(tensor) in done:
            if done[id(tensor)][0] != math:
                raise UnsupportedPatternError(
                    f"{PURPOSE}: '{ref.fqn}' is tied to '{done[id(tensor)][1]}' but needs a different "
                    "rotation there; untie them (fold_norms does so when it scales a tied reader)")
            changes.append(Change("shared", module, f"tied to {done[id(tensor)][1]}, rotated once"))
            continue
        done[id(tensor)] = (math, module)
        if role == "reader":
            rotate_in(tensor, q, transposed=transposed, precision=prec)
        else:
            rotate_out(tensor, cg.param(bias) if bias else None, q, transposed=transposed, precision=prec)
        changes.append(Change("rotated", module, f"R1 {role}"))
    return PassResult(tuple(changes))


def _untie_from_outside(cg, structure) -> list[Change]:
    """A tensor R1 edits that is tied to a module R1 does not edit (an embedding shared with an output
    layer off the stream) gets its own copy first, so the other module keeps its values."""
    edited = {ref.fqn for _, _, ref, _, _ in residual_edits(structure)}
    names, changes = shared_names(cg.model), []
    for _, module, ref, _, _ in residual_edits(structure):
        twins = names.get(id(cg.param(ref)), ())
        if any(name not in edited for name in twins) and untie_shared(cg.model, module, ref.name):
            changes.append(Change("untied", ref.fqn, f"tied to {', '.join(n for n in twins if n not in edited)}, "
                                                     "which R1 does not edit"))
            names = shared_names(cg.model)
    return changes


def _rotate_online(cg, structure, cfg) -> PassResult:
    """Each reader of the stream: hadamard(x) online, its inverse folded into the reader's weight.

    Exact whatever the stream holds (the stream is not touched); a reader whose norm's output also
    feeds something else, or that runs inside a larger module (no hook sees its input alone), is left."""
    structure.refuse_if_blocked(PURPOSE, (), strict=cfg.strict)
    prec, hookable = getattr(torch, cfg.precision), hookable_modules(cg)
    why = structure.blocking([RESIDUAL])
    how = f"online: {why[0].reason}" if why else "online, as the recipe asks"
    changes, blocked = [], []
    for group in structure.stream.groups:
        if group.norm is not None and (stop := structure.blocking([scope(NORM_FOLD, group.norm.module)])):
            blocked += [Blocked(b.node, b.module, f"R1 online: {b.reason}", b.blocks) for b in stop]
            continue
        for reader in group.readers:
            if reader.module not in hookable:
                blocked.append(Blocked(reader.node, reader.module, "R1 online: the linear runs inside a larger "
                                                                    "module, so no hook can rotate its input alone"))
                continue
            if untie_shared(cg.model, reader.module, reader.weight.name):
                changes.append(Change("untied", reader.weight.fqn, "its tied twin keeps the old values"))
            install_online_hadamard(cg, reader, prec)
            changes.append(Change("inserted", reader.module, f"R1 {how}: Hadamard({reader.in_features}) on its input"))
    return PassResult(tuple(changes), tuple(blocked), invalidates={GRAPH})  # the hooks are new graph nodes
