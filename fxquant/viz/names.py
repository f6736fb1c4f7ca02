"""Short names for tables: the one rule that folds layer indices, and a module path's last component.

Entry point: `fold_indices(text)`. The one idea: a layer index is an all-digit component of a dotted
module path (`model.layers.3.mlp`), so every renderer folds `model.layers.0..29.mlp` into one
`model.layers.*.mlp` row with the same rule, while numbers that are not path components
(`eps 0.1`, `1.8x`, `ln_1`, `kv0`) stay as they are.
"""
from __future__ import annotations

import re

_DOTTED_PATH = re.compile(r"\b[A-Za-z_]\w*(?:\.\w+)+")


def fold_indices(text: str) -> str:
    """`model.layers.3.mlp.up_proj` -> `model.layers.*.mlp.up_proj`, wherever a dotted path is in `text`.

    Example::

        fold_indices("input channels by model.layers.12.input_layernorm")
        # 'input channels by model.layers.*.input_layernorm'
    """
    return _DOTTED_PATH.sub(lambda m: ".".join("*" if p.isdigit() else p for p in m.group().split(".")), text)


def leaf(path: str) -> str:
    """`model.layers.0.mlp.down_proj` -> `down_proj`."""
    return path.rsplit(".", 1)[-1]
