"""R1 (SpinQuant / QuaRot): rotate the whole residual stream by one orthogonal Q, folded into weights.

    embeddings:  E' = E Q                 (the stream starts rotated: x' = x Q)
    writers:     W' = Q^T W,  b' = b Q     (each residual add stays rotated)
    readers:     W' = W Q                  (x' W'^T = x Q Q^T W^T = x W^T)

Weightless RMSNorms in between commute with Q (||x Q|| = ||x||), so the float model computes the same
function, while the stream (and every reader's weight) loses its outlier channels. Requires
`fold_norms` (and `layernorms_to_rms` for LayerNorm models). Tied embeddings stay tied: the
embedding and a tied lm_head both become E Q, so the shared tensor is rotated once.
"""
from __future__ import annotations

import torch

from fxquant.config import RotationConfig
from fxquant.errors import UnsupportedPatternError
from fxquant.hadamard import check_rotation, rotation_operator
from fxquant.rotations import R1, check_learned_source, learned_matrix, refuse_unfolded_norms, residual_edits
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.weights import rotate_in, rotate_out

def _math(role: str, transposed: bool) -> str:
    """The identity an edit applies to the stored tensor, to detect ties that need the same edit."""
    if role == "reader":
        return "T @ Q" if not transposed else "Q^T @ T"
    return "T @ Q" if transposed else "Q^T @ T"  # embedding / writer: rotate the output channels


def check_rotation_size(cg, structure, cfg: RotationConfig | None) -> None:
    """Before any pass runs: the stream width has the rotation asked for (a Hadamard size, a block)."""
    cfg = cfg or RotationConfig()
    if cfg.rotation == "learned":
        check_learned_source(cg, cfg, "rotate_residual (R1)")
        return
    check_rotation(cfg.rotation, structure.stream.width, cfg.block_size)


@fxpass(requires={"norms_folded", "weights_float"}, provides={"residual_rotated"}, check=check_rotation_size)
def rotate_residual(cg, structure, cfg: RotationConfig | None) -> PassResult:
    """Fold one orthogonal Q (R1) into every embedding, residual writer and residual reader."""
    cfg = cfg or RotationConfig()
    structure.refuse_if_blocked("rotate_residual (R1)")
    refuse_unfolded_norms(cg, structure, "rotate_residual (R1)")
    prec = getattr(torch, cfg.precision)
    if cfg.rotation == "learned":
        q = learned_matrix(cg, R1, "rotate_residual (R1)")
    else:
        q = rotation_operator(cfg.rotation, structure.stream.width, seed=cfg.seed, block_size=cfg.block_size)
    done: dict[int, tuple[str, str]] = {}  # id(tensor) -> (math, module): a tied tensor is edited once
    changes = []
    for role, module, ref, bias, transposed in residual_edits(structure):
        tensor, math = cg.param(ref), _math(role, transposed)
        if id(tensor) in done:
            if done[id(tensor)][0] != math:
                raise UnsupportedPatternError(
                    f"rotate_residual (R1): '{ref.fqn}' is tied to '{done[id(tensor)][1]}' but needs a different "
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
