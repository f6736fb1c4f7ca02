"""Identical decoder blocks, found once per step, so the page draws `layers.0-29 x 30` as one group.

Entry point: `repeat_classes(record)`. The one idea: a block's signature is its graph written
relative to the block (module paths below the block, ops, shapes, inputs as positions inside the
block or "outside", what the step did to each node, the chains and blocked reasons that touch it),
so two blocks are identical exactly when the page would draw them the same. A pass that treats
layer 3 differently splits `layers.0-29` into `layers.0-2,4-29 x 29` and `layers.3`.
"""
from __future__ import annotations

import re
from collections import defaultdict

from fxquant.viz.graphdata import (
    BLOCKED, CREATED, EDITED, ERASED, FLAG, HIDDEN, INPUTS, ORIGIN, SHAPE, SHARED, GraphRecord, block_of, numbered_blocks,
)
from fxquant.viz.names import fold_indices

_DRAWN_FLAGS = CREATED | EDITED | ERASED | HIDDEN | BLOCKED


def repeat_classes(record: GraphRecord) -> dict[str, list[list]]:
    """Parent path -> `[[label, [indices]], ...]`, one entry per distinct block, in index order:
    `{"model.layers": [["0-29", [0, 1, ..., 29]]]}`."""
    numbered = numbered_blocks(record.modules)
    members = defaultdict(list)
    for i, module in enumerate(record.modules):
        block = block_of(module, numbered)
        if block is not None:
            members[block].append(i)
    chains = _chains_by_node(record)
    blocked = {b[0]: _reason_key(b[2]) for b in record.blocked if b[0] >= 0}
    classes: dict[str, dict[tuple, list[int]]] = defaultdict(dict)
    for block in sorted(members, key=lambda b: (b.rsplit(".", 1)[0], int(b.rsplit(".", 1)[1]))):
        parent, index = block.rsplit(".", 1)
        sig = _signature(record, block, members[block], (chains, blocked))
        classes[parent].setdefault(sig, []).append(int(index))
    return {parent: [[ranges(ids), ids] for ids in sigs.values()] for parent, sigs in classes.items()}


_NODE_NAME = re.compile(r"'([A-Za-z_]+?)_\d+'")  # 'add_8' in a reason: graph numbering, not structure


def _reason_key(reason: str) -> str:
    """A blocked reason as blocks compare it: layer indices and node numbers folded (`'add_8'` in layer
    0 and `'add_16'` in layer 1 name the same place)."""
    return _NODE_NAME.sub(r"'\1_#'", fold_indices(reason))


def _chains_by_node(record: GraphRecord) -> dict[int, tuple[str, ...]]:
    out = defaultdict(list)
    for chain in record.chains:
        cls, nodes = chain[0], chain[3]
        for i in nodes:
            out[i].append(cls)
    return {i: tuple(sorted(c)) for i, c in out.items()}


def _signature(record: GraphRecord, block: str, rows: list[int], marks) -> tuple:
    """The block's graph relative to itself (see the module docstring)."""
    chains, blocked = marks
    local = {i: k for k, i in enumerate(rows)}
    cut = len(block)
    sig = []
    for i in rows:
        row = record.nodes[i]
        inputs = tuple(local.get(a, "shared" if record.nodes[a][FLAG] & SHARED else "outside") for a in row[INPUTS])
        sig.append((record.modules[i][cut:], record.tokens[i] if not record.tokens[i].startswith("param ") else
                    "param " + record.tokens[i][6 + cut:], row[SHAPE], row[FLAG] & _DRAWN_FLAGS, row[ORIGIN], inputs,
                    chains.get(i, ()), blocked.get(i, "")))
    return tuple(sig)


def ranges(ids: list[int]) -> str:
    """`[0, 1, 2, 4, 5]` -> `0-2,4-5`."""
    out, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)
