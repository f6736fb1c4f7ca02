"""R4 (QuaRot / SpinQuant): an online Hadamard on every down_proj input, its inverse folded into the weight.

    x' = hadamard(x) = x H^T / sqrt(n)      (an fxquant::hadamard op, run by a pre-hook on down_proj)
    W' = W H^T / sqrt(n)                     =>  x' W'^T = x (H^T H / n) W^T = x W^T

The activation between up/gate and down cannot be rotated by folding (the SiLU/GELU in front of it
does not commute with a rotation), so the rotation runs at inference; it spreads the outliers of
down_proj's input, the one linear input R1/R2 leave untouched. The sites come from the Structure
(`online_sites`); a site whose linear runs inside a larger module (stacked MoE experts) is reported
blocked.
"""
from __future__ import annotations

from collections import Counter

import torch

from fxquant.analysis.dataflow import linear_sites
from fxquant.analysis.structure import Blocked
from fxquant.config import NormFoldConfig
from fxquant.hadamard import check_rotation, hadamard_transform
from fxquant.online import OnlineHadamard
from fxquant.pipeline import Change, PassResult, fxpass
from fxquant.quant.fake import input_is_hookable
from fxquant.weights import rotate_in


def check_online_sizes(cg, structure, cfg) -> None:
    """Before any pass runs: each online site's width has a Hadamard matrix."""
    for width in sorted({site.linear.in_features for site in structure.online_sites}):
        check_rotation("hadamard", width)


@fxpass(requires={"weights_float"}, provides={"online_r4"}, invalidates={"graph"}, check=check_online_sizes)
def insert_online_hadamard(cg, structure, cfg: NormFoldConfig | None) -> PassResult:
    """Hadamard-rotate each down_proj input online and fold the inverse into down_proj's weight."""
    prec = getattr(torch, (cfg or NormFoldConfig()).precision)
    runs = Counter(site.module for site, _ in linear_sites(cg))
    changes, blocked = [], []
    for online in structure.online_sites:
        site = online.linear
        module = cg.model.get_submodule(site.module)
        if not input_is_hookable(module, runs[site.module]):
            blocked.append(Blocked(site.node, site.module, "R4: the linear runs inside a larger module, so no "
                                                            "hook can rotate its input alone"))
            continue
        rotate_in(cg.param(site.weight), hadamard_transform, transposed=site.transposed, precision=prec)
        module.register_forward_pre_hook(OnlineHadamard(), prepend=True)  # before any activation quantizer
        changes.append(Change("inserted", site.module, f"R4 online Hadamard({site.in_features}) on its input"))
    return PassResult(tuple(changes), tuple(blocked))
