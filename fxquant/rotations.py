"""Which weights R1 and R2 touch, their values as functions of the rotations, and learned matrices.

Entry points: `rotation_sites(structure, r1, r2) -> tuple[RotationSite, ...]`,
`rotated_values(sites, base, matrices) -> {fqn: tensor}` and, for `rotation = "learned"`,
`learned_matrix(cg, key, purpose)`. The one idea: one list of edits serves
both folding and learning. `rotate_residual` and `rotate_vo` fold a fixed matrix into exactly these
tensors; the `learn_rotations` pass computes the same products (`fxquant.weights.rotated`) through autograd
every step, so the model it trains is the model the folds will produce:

    R1 reader:  W' = W R1        R1 writer / embedding:  W' = R1^T W,  b' = b R1
    R2 v rows:  W_v' = R2^T W_v  (per KV head)          R2 o columns:  W_o' = W_o R2 (per query head)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.errors import RecipeError, UnsupportedPatternError
from fxquant.weights import canonical, rotated

NORM_ATOL = 1e-6  # a folded norm weight must be this close to its identity value
R1 = "R1"
LEARNED = "rotations_learned"  # the fact a step that trains rotations provides
Blocks = tuple[tuple[tuple[int, int] | None, str], ...]  # (span of rows/columns or None = all, matrix key)


def r2_key(chain) -> str:
    """The key of a v->o chain's R2 in a run's learned matrices: `R2:<v module>`."""
    return f"R2:{chain.v.module}"


@dataclass(frozen=True)
class RotationSite:
    """One stored tensor and the rotations on its input columns and output rows (canonical layout)."""

    weight: str  # fqn
    bias: str | None
    transposed: bool
    inputs: Blocks = ()
    outputs: Blocks = ()


def residual_edits(structure):
    """(role, module, weight ParamRef, bias ParamRef, transposed) for each tensor R1 touches, in graph order."""
    for src in structure.stream.sources:
        yield "embedding", src.module, src.weight, None, True  # [vocab, hidden]: E' = E Q
    for w in structure.stream.writers:
        yield "writer", w.module, w.weight, w.bias, w.transposed
    for group in structure.stream.groups:
        for r in group.readers:
            yield "reader", r.module, r.weight, None, r.transposed


def rotation_sites(structure, r1: bool = True, r2: bool = True) -> tuple[RotationSite, ...]:
    """Every tensor R1 (when `r1`) and each layer's R2 (when `r2`) edit, one site per tensor."""
    sites: dict[str, dict] = {}

    def site(ref, bias, transposed):
        return sites.setdefault(ref.fqn, {"weight": ref.fqn, "bias": bias.fqn if bias else None,
                                          "transposed": transposed, "inputs": [], "outputs": []})

    if r1:
        for role, _, ref, bias, transposed in residual_edits(structure):
            side = "inputs" if role == "reader" else "outputs"
            entry = site(ref, bias, transposed)
            if (None, R1) not in entry[side]:  # a tied tensor (embedding and lm_head) is rotated once
                entry[side].append((None, R1))
    if r2:
        for chain in structure.vo_chains:
            key = r2_key(chain)
            v, o = site(chain.v.weight, chain.v.bias, chain.v.transposed), site(chain.o.weight, None, chain.o.transposed)
            for head in chain.heads:
                v["outputs"].append((head.v_rows, key))
                o["inputs"].extend((cols, key) for cols in head.o_cols)
    return tuple(RotationSite(s["weight"], s["bias"], s["transposed"], tuple(s["inputs"]), tuple(s["outputs"]))
                 for s in sites.values())


def _side(blocks: Blocks, size: int, matrices: dict, like: torch.Tensor) -> torch.Tensor | None:
    """The dense [size, size] rotation of one side: one matrix, or blocks on the diagonal (identity elsewhere)."""
    if not blocks:
        return None
    if len(blocks) == 1 and blocks[0][0] is None:
        return matrices[blocks[0][1]]
    full = torch.eye(size, dtype=like.dtype, device=like.device)
    for span, key in blocks:
        a, b = span if span is not None else (0, size)
        full[a:b, a:b] = matrices[key]
    return full


def rotated_values(sites, base: dict[str, torch.Tensor], matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fqn -> the rotated weight (and bias) of every site, from the unrotated `base` tensors."""
    out = {}
    for s in sites:
        w = base[s.weight]
        out_rows, in_cols = canonical(w, s.transposed).shape[-2:]
        q_in = _side(s.inputs, in_cols, matrices, w)
        q_out = _side(s.outputs, out_rows, matrices, w)
        out[s.weight], bias = rotated(w, base.get(s.bias) if s.bias else None, q_in=q_in, q_out=q_out,
                                      transposed=s.transposed)
        if s.bias is not None:
            out[s.bias] = bias
    return out


def refuse_unfolded_norms(cg, structure, purpose: str) -> None:
    """Raise before any edit when a stream norm still scales or centres its input."""
    for src in structure.stream.sources:
        if src.norm is not None:
            raise UnsupportedPatternError(
                f"{purpose} refused, nothing was changed: embedding '{src.module}' is followed by its own norm "
                f"'{src.norm.module}', which a rotation of the stream cannot pass; run fold_norms first (it folds "
                "that norm into the table)")
    for group in structure.stream.groups:
        norm = group.norm
        if norm is None:
            continue
        if norm.kind == "layer":
            raise UnsupportedPatternError(
                f"{purpose} refused, nothing was changed: LayerNorm '{norm.module}' subtracts the mean, which "
                "does not commute with a rotation; run fold_norms then layernorms_to_rms first")
        if norm.weight is not None:
            w = cg.param(norm.weight).detach().double() + norm.offset
            if not torch.allclose(w, torch.ones_like(w), atol=NORM_ATOL, rtol=0):
                raise UnsupportedPatternError(
                    f"{purpose} refused, nothing was changed: norm '{norm.module}' still has a weight "
                    "(a rotation does not commute with a per-channel scale); run fold_norms first")


def learned_matrix(cg, key: str, purpose: str) -> torch.Tensor:
    """The matrix `key` a learn_rotations step of this run trained (float64)."""
    found = cg.context.learned.get(key)
    if found is None:
        raise RecipeError(f"{purpose}: rotation = 'learned' found no learned matrix {key!r}; put a learn_rotations "
                          "step before it in the recipe (it trains the matrices this step folds)")
    return found


def check_learned_source(cg, cfg, purpose: str) -> None:
    """Before any pass runs: a 'learned' rotation needs a step earlier in the run that learns rotations."""
    steps = cg.context.steps
    here = next((i for i, s in enumerate(steps) if s.cfg is cfg), len(steps))
    if not any(LEARNED in s.info.provides for s in steps[:here]):
        raise RecipeError(f"{purpose}: rotation = 'learned' needs a learn_rotations step earlier in the recipe "
                          "(it trains the matrices this step folds); or choose a fixed rotation "
                          "('hadamard', 'random-hadamard', 'random-orthogonal')")
