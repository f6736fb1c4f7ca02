"""Online rotations (QuaRot / SpinQuant): R4 on every down_proj input, R3 on queries and keys.

R4, `insert_online_hadamard`:

    x' = hadamard(x) = x H^T / sqrt(n)      (an fxquant::hadamard op, run by a pre-hook on down_proj)
    W' = W H^T / sqrt(n)                     =>  x' W'^T = x (H^T H / n) W^T = x W^T

The activation between up/gate and down cannot be rotated by folding (the SiLU/GELU in front of it
does not commute with a rotation), so the rotation runs at inference; it spreads the outliers of
down_proj's input, the one linear input R1/R2 leave untouched. The sites come from the Structure
(`online_sites`); a site whose linear runs inside a larger module (stacked MoE experts) is reported
blocked.

R3, `rotate_qk`: (q H)(k H)^T = q k^T per head, so a Hadamard on post-RoPE queries and keys costs no
weight edit; it spreads the outliers of keys, which makes a quantized KV cache (`quantize_kv_cache`
in quantize_activations.py, inside the same attention implementation) usable.
"""
from __future__ import annotations

import torch

from fxquant.analysis.dataflow import hookable_modules, shape_of
from fxquant.analysis.structure import INPUT, Blocked
from fxquant.config import NormFoldConfig
from fxquant.errors import NoHadamardError
from fxquant.hadamard import check_rotation
from fxquant.install import attention_nodes, install_in_attention, install_online_hadamard
from fxquant.pipeline import Change, PassResult, fxpass


def check_online_sizes(cg, structure, cfg) -> None:
    """Before any pass runs, with `strict`: each online site's width has a Hadamard matrix (without it a
    site whose width has none is left and reported)."""
    if cfg is not None and cfg.strict:
        for width in sorted({site.linear.in_features for site in structure.online_sites}):
            check_rotation("hadamard", width)


def _no_hadamard(width: int) -> str | None:
    """Why `width` has no Hadamard matrix (the NoHadamardError's message), or None when it has one."""
    try:
        check_rotation("hadamard", width)
    except NoHadamardError as exc:
        return str(exc).splitlines()[0]
    return None


@fxpass(requires={"weights_float"}, provides={"online_r4"}, invalidates={"graph"}, check=check_online_sizes)
def insert_online_hadamard(cg, structure, cfg: NormFoldConfig | None) -> PassResult:
    """Hadamard-rotate each down_proj input online and fold the inverse into down_proj's weight."""
    cfg = cfg or NormFoldConfig()
    structure.refuse_if_blocked("insert_online_hadamard (R4)", (), strict=cfg.strict)
    prec = getattr(torch, cfg.precision)
    hookable = hookable_modules(cg)
    changes, blocked = [], list(structure.blocking([INPUT]))  # unexplained inputs: left as they are
    for online in structure.online_sites:
        site = online.linear
        if site.module not in hookable:
            blocked.append(Blocked(site.node, site.module, "R4: the linear runs inside a larger module, so no "
                                                            "hook can rotate its input alone"))
            continue
        if (why := _no_hadamard(site.in_features)) is not None:
            blocked.append(Blocked(site.node, site.module, f"R4: {why}"))
            continue
        install_online_hadamard(cg, site, prec)
        changes.append(Change("inserted", site.module, f"R4 online Hadamard({site.in_features}) on its input"))
    return PassResult(tuple(changes), tuple(blocked))


def check_head_sizes(cg, structure, cfg) -> None:
    """Before any pass runs: each attention's head size has a Hadamard matrix."""
    for head_dim in sorted({shape_of(node.args[0])[-1] for node in attention_nodes(cg).values()}):
        check_rotation("hadamard", head_dim)


@fxpass(provides={"online_r3"}, invalidates={"graph"}, check=check_head_sizes)
def rotate_qk(cg, structure, cfg) -> PassResult:
    """R3: a Hadamard on every query and key head after RoPE (it cancels in q k^T); no weight changes.

    The transform runs inside fxquant's attention implementation; a probe run checks that each
    module really dispatches through it (an attention that bypasses AttentionInterface is blocked).
    """
    return install_in_attention(cg, "R3", lambda node: f"online Hadamard({shape_of(node.args[0])[-1]}) on q and k "
                                "after RoPE", rotate_qk=True)
