"""Find norms and read their semantics from ops: RMS vs LayerNorm, eps, weight, (1 + w), bias.

RMSNorm arrives decomposed from torch.export; it is recognised from its anchor, `rsqrt`:

    x * rsqrt(mean(x ** 2, -1, keepdim) + eps)  [-> cast]  [* (w | 1 + w)]  [-> cast]

and a LayerNorm written out the same way (Cohere's) is that with x = h - mean(h, -1, keepdim).

LayerNorm arrives as one `aten.layer_norm`, torch.nn.RMSNorm as one `aten.rms_norm`. Entry point: `find_norms(cg) -> NormMatches`.
A norm-like anchor that fails a check is returned as Blocked with the failed check.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fxquant.analysis.dataflow import Node, module_of, param_ref, real_users, shape_of
from fxquant.analysis.structure import NORM_FOLD, Blocked, NormSite, scope
from fxquant.ir import CapturedGraph
from fxquant.ops import OpClass, classify, is_dtype_cast

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
    return [_with_ownership(cg, m) for m in matches], blocked


def _with_ownership(cg, match: NormMatch) -> NormMatch:
    """Mark a norm whose module runs other math besides it (casts of its input aside): a pass that
    would swap the module whole must not."""
    others = [n for n in cg.graph.nodes if n.op == "call_function" and module_of(n) == match.site.module
              and n not in match.nodes and classify(n) not in (OpClass.VIEW, OpClass.IGNORE)]
    return match if not others else NormMatch(replace(match.site, owns_module=False), match.nodes)


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
        return Blocked(node.name, module_of(node), f"{node.target.__name__} over {list(shape)}, not the last dim only",
                       frozenset({scope(NORM_FOLD, module_of(node))}))
    nodes, offset, weight_ref = {node}, 0.0, None
    if weight is not None:
        if _is(weight, aten.add.Tensor) and weight.args[1] == 1.0:  # LayerNorm1P: layer_norm(x, w + 1)
            nodes.add(weight)
            weight, offset = weight.args[0], 1.0
        weight_ref = param_ref(cg, weight, node)
        if weight_ref is None:
            return Blocked(node.name, module_of(node), f"{node.target.__name__}'s weight is computed by "
                           f"{getattr(weight, 'target', weight)}, not a parameter fxquant can read",
                           frozenset({scope(NORM_FOLD, module_of(node))}))
    bias_ref = param_ref(cg, bias, node) if isinstance(bias, Node) else None
    if isinstance(bias, Node) and bias_ref is None:
        return Blocked(node.name, module_of(node), f"{node.target.__name__}'s bias is computed, not a parameter",
                       frozenset({scope(NORM_FOLD, module_of(node))}))
    site = NormSite(
        node=node.name, input=x.name, module=module_of(node), kind="layer" if layer else "rms", eps=float(eps),
        width=width, weight=weight_ref, bias=bias_ref, offset=offset,
    )
    return NormMatch(site, frozenset(nodes))


def _dtype_of(node) -> torch.dtype:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else torch.float32


def _rms_norm(cg, rsqrt) -> NormMatch | Blocked:
    def fail(why):
        return Blocked(rsqrt.name, module_of(rsqrt), f"rsqrt is not an RMSNorm I can read: {why}",
                       frozenset({scope(NORM_FOLD, module_of(rsqrt))}))

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
    centre = _centred(x)  # a LayerNorm written out: x = h - mean(h), as Cohere's is

    def same(y) -> bool:  # x itself, or the same h - mean(h) computed again
        return y is x or (centre is not None and _is(y, aten.sub.Tensor) and tuple(y.args[:2]) == centre)

    normed = next((u for u in rsqrt.users if _is(u, aten.mul.Tensor) and rsqrt in u.args[:2]
                   and same(u.args[1] if u.args[0] is rsqrt else u.args[0])), None)
    if normed is None:
        return fail("no x * rsqrt(...) product follows")
    nodes = {power, mean, add_eps, rsqrt, normed}
    if centre is not None:
        nodes |= {x, centre[1], *(a for a in normed.args[:2] if a is not rsqrt)}
    out = _through_casts(normed, nodes)
    weight, offset, out = _weight_product(cg, out, nodes)
    source = centre[0] if centre is not None else x
    site = NormSite(
        node=out.name, input=source.name, module=module_of(rsqrt), kind="layer" if centre else "rms",
        eps=float(add_eps.args[1]), width=shape_of(x)[-1], weight=weight, offset=offset,
    )
    return NormMatch(site, frozenset(nodes))


def _centred(x):
    """(h, mean) when x = h - mean(h, -1, keepdim) (a LayerNorm's centring written out), else None."""
    if not _is(x, aten.sub.Tensor) or not _is(x.args[1], aten.mean.dim):
        return None
    h, m = x.args[0], x.args[1]
    return (h, m) if m.args[0] is h and _last_dim_keepdim(m) else None


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
