"""Find norms and read their semantics from ops: RMS vs LayerNorm, eps, weight, (1 + w), bias.

RMSNorm arrives decomposed from torch.export; it is recognised from its anchor, `rsqrt`:

    x * rsqrt(mean(x ** 2, -1, keepdim) + eps)  [-> cast]  [* (w | 1 + w)]  [-> cast]

LayerNorm arrives as one `aten.layer_norm`, torch.nn.RMSNorm as one `aten.rms_norm`. Entry point: `find_norms(cg) -> NormMatches`.
A norm-like anchor that fails a check is returned as Blocked with the failed check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.analysis.dataflow import Node, module_of, param_ref, real_users, shape_of
from fxquant.analysis.structure import Blocked, NormSite
from fxquant.ir import CapturedGraph
from fxquant.ops import is_dtype_cast

aten = torch.ops.aten


@dataclass(frozen=True)
class NormMatch:
    site: NormSite
    nodes: frozenset  # every node inside the norm (not its input): walkers treat them as one op


def find_norms(cg: CapturedGraph) -> tuple[list[NormMatch], list[Blocked]]:
    matches, blocked = [], []
    for node in cg.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (aten.layer_norm.default, aten.rms_norm.default):
            found = _fused_norm(cg, node)
        elif node.target is aten.rsqrt.default:
            found = _rms_norm(cg, node)
        else:
            continue
        (matches if isinstance(found, NormMatch) else blocked).append(found)
    return matches, blocked


def _fused_norm(cg, node) -> NormMatch | Blocked:
    """layer_norm(x, shape, w, b, eps) or rms_norm(x, shape, w, eps) over the last dim."""
    layer = node.target is aten.layer_norm.default
    x, shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else None
    bias = node.args[3] if layer and len(node.args) > 3 else None
    eps = node.args[4 if layer else 3] if len(node.args) > (4 if layer else 3) else None
    if eps is None:  # torch's defaults: 1e-5 for layer_norm, the dtype's epsilon for rms_norm
        eps = 1e-5 if layer else torch.finfo(_dtype_of(x)).eps
    width = shape_of(x)[-1]
    if list(shape) != [width]:
        return Blocked(node.name, module_of(node), f"{node.target.__name__} over {list(shape)}, not the last dim only")
    site = NormSite(
        node=node.name, input=x.name, module=module_of(node), kind="layer" if layer else "rms", eps=float(eps),
        width=width,
        weight=param_ref(cg, weight, node) if weight is not None else None,
        bias=param_ref(cg, bias, node) if bias is not None else None,
    )
    return NormMatch(site, frozenset([node]))


def _dtype_of(node) -> torch.dtype:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else torch.float32


def _rms_norm(cg, rsqrt) -> NormMatch | Blocked:
    def fail(why):
        return Blocked(rsqrt.name, module_of(rsqrt), f"rsqrt is not an RMSNorm I can read: {why}")

    add_eps = rsqrt.args[0]
    if not _is(add_eps, aten.add.Tensor) or not isinstance(add_eps.args[1], (int, float)):
        return fail("its input is not mean(x**2) + eps")
    mean = add_eps.args[0]
    if not _is(mean, aten.mean.dim) or not _last_dim_keepdim(mean):
        return fail("the mean is not over the last dim with keepdim")
    power = mean.args[0]
    if not _is(power, aten.pow.Tensor_Scalar) or power.args[1] != 2:
        return fail("the mean is not of x ** 2")
    x = power.args[0]
    normed = next((u for u in rsqrt.users if _is(u, aten.mul.Tensor) and set(u.args[:2]) == {x, rsqrt}), None)
    if normed is None:
        return fail("no x * rsqrt(...) product follows")
    nodes = {power, mean, add_eps, rsqrt, normed}
    out = _through_casts(normed, nodes)
    weight, offset, out = _weight_product(cg, out, nodes)
    site = NormSite(
        node=out.name, input=x.name, module=module_of(rsqrt), kind="rms", eps=float(add_eps.args[1]),
        width=shape_of(x)[-1], weight=weight, offset=offset,
    )
    return NormMatch(site, frozenset(nodes))


def _weight_product(cg, out, nodes):
    """Absorb `out * w` or `out * (1 + w)` (either operand order), then trailing casts."""
    users = [u for u in real_users(out) if _is(u, aten.mul.Tensor)]
    if len(real_users(out)) != 1 or not users:
        return None, 0.0, out
    mul = users[0]
    other = mul.args[1] if mul.args[0] is out else mul.args[0]
    offset, expr = 0.0, [other]
    if _is(other, aten.add.Tensor) and other.args[1] == 1.0:
        offset, expr = 1.0, [other]
        other = other.args[0]
    while isinstance(other, Node) and is_dtype_cast(other):
        expr.append(other)
        other = other.args[0]
    ref = param_ref(cg, other, mul)
    if ref is None or shape_of(other) is None or len(shape_of(other)) != 1:
        return None, 0.0, out
    nodes.update(e for e in expr if isinstance(e, Node) and e.op == "call_function")
    nodes.add(mul)
    return ref, offset, _through_casts(mul, nodes)


def _through_casts(node, nodes):
    while len(real_users(node)) == 1:
        user = real_users(node)[0]
        if not is_dtype_cast(user) or user.args[0] is not node:
            break
        nodes.add(user)
        node = user
    return node


def _is(node, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is target


def _last_dim_keepdim(mean) -> bool:
    dims = list(mean.args[1]) if len(mean.args) > 1 else []
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    rank = len(shape_of(mean.args[0]) or ())
    return keep and len(dims) == 1 and dims[0] in (-1, rank - 1)
