"""The op-semantics table, checked on tiny synthetic graphs."""
from __future__ import annotations

import pytest
import torch

from fxquant.capture import capture
from fxquant.ops import OpClass, classify, keeps_channels

aten = torch.ops.aten


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _graph(fn, *shapes):
    cg = capture(_Fn(fn), tuple(torch.randn(s) for s in shapes))
    return [n for n in cg.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("fn,shapes,want", [
    (lambda x: x * 2.0, [(2, 3, 8)], OpClass.COMMUTES_ORTHOGONAL),  # scalar scale
    (lambda x, s: x * s, [(2, 3, 8), (2, 3, 1)], OpClass.COMMUTES_ORTHOGONAL),  # per-token scale
    (lambda x, w: x * w, [(2, 3, 8), (8,)], OpClass.ELEMENTWISE),  # per-channel: not orthogonal-safe
    (lambda x, y: x + y, [(2, 3, 8), (2, 3, 8)], OpClass.RESIDUAL_ADD),
    (lambda x: x + 1.0, [(2, 3, 8)], OpClass.ELEMENTWISE),  # a shift breaks rotations
    (lambda x: torch.relu(x), [(2, 3, 8)], OpClass.COMMUTES_DIAG),
    (lambda x: torch.nn.functional.silu(x), [(2, 3, 8)], OpClass.ELEMENTWISE),
    (lambda x: x.transpose(0, 1), [(2, 3, 8)], OpClass.VIEW),
    (lambda x: torch.cumsum(x, -1), [(2, 3, 8)], OpClass.BARRIER),  # unknown to the table
])
def test_classify(fn, shapes, want):
    assert classify(_graph(fn, *shapes)[-1]) is want


@pytest.mark.parametrize("fn,keeps", [
    (lambda x: x.reshape(6, 8), True),
    (lambda x: x.transpose(0, 1), True),
    (lambda x: x.transpose(1, 2), False),
    (lambda x: x[:, 1:], True),  # slice over tokens
    (lambda x: x[..., :4], False),  # slice over channels
    (lambda x: x.view(2, 3, 2, 4), False),  # split into heads
    (lambda x: x.to(torch.float64), True),
])
def test_keeps_channels(fn, keeps):
    node = _graph(fn, (2, 3, 8))[-1]
    assert keeps_channels(node, node.args[0]) is keeps
