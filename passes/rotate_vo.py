"""R2 (SpinQuant): rotate each attention head's value space, folded into v_proj rows and o_proj columns.

    v rows of KV head k:          W_v' = R^T W_v,  b_v' = b_v R     (v' = v R)
    o columns of each query head
    that reads KV head k (GQA):   W_o' = W_o R                      (attn' = attn R  =>  o unchanged)

Attention mixes value rows with weights that sum over tokens, never over channels, so a right
multiplication of v by R reaches o's input unchanged. One R (head_dim x head_dim) per layer, shared
by its heads; layer i draws seed `cfg.seed + i` so layers differ. Fused qkv (phi3, GPT-2 c_attn) is
covered by the row spans analysis computed.
"""
from __future__ import annotations

import torch

from fxquant.analysis.structure import VALUE_ROTATION
from fxquant.config import RotationConfig
from fxquant.hadamard import check_rotation, rotation_operator
from fxquant.rotations import check_learned_source, learned_matrix, r2_key
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.weights import rotate_in, rotate_out


def check_head_rotation(cg, structure, cfg: RotationConfig | None) -> None:
    """Before any pass runs: every head size has the rotation asked for."""
    cfg = cfg or RotationConfig()
    if cfg.rotation == "learned":
        check_learned_source(cg, cfg, "rotate_vo (R2)")
        return
    for head_dim in sorted({chain.head_dim for chain in structure.vo_chains}):
        check_rotation(cfg.rotation, head_dim, cfg.block_size)


@fxpass(requires={"weights_float"}, provides={"values_rotated"}, check=check_head_rotation)
def rotate_vo(cg, structure, cfg: RotationConfig | None) -> PassResult:
    """Fold one orthogonal R per layer (R2) into each v->o chain, per KV head, GQA-aware."""
    cfg = cfg or RotationConfig()
    structure.refuse_if_blocked("rotate_vo (R2)", (), strict=cfg.strict)  # each chain found is proven
    prec = getattr(torch, cfg.precision)
    changes, left = [], structure.blocking([VALUE_ROTATION])  # attentions with no provable v->o chain
    for index, chain in enumerate(structure.vo_chains):
        if cfg.rotation == "learned":
            r = learned_matrix(cg, r2_key(chain), "rotate_vo (R2)")
        else:
            r = rotation_operator(cfg.rotation, chain.head_dim, seed=cfg.seed + index, block_size=cfg.block_size)
        v_w = cg.param(chain.v.weight)
        v_b = cg.param(chain.v.bias) if chain.v.bias else None
        o_w = cg.param(chain.o.weight)
        for head in chain.heads:
            rotate_out(v_w, v_b, r, transposed=chain.v.transposed, rows=head.v_rows, precision=prec)
            for cols in head.o_cols:
                rotate_in(o_w, r, transposed=chain.o.transposed, cols=cols, precision=prec)
        changes.append(Change("rotated", chain.v.module, f"R2 {chain.num_kv_heads} value heads -> "
                                                          f"{chain.num_q_heads} heads of {chain.o.module}"))
    return PassResult(tuple(changes), left)
