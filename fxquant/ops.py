"""The op-semantics table: which aten ops commute with transforms of the channel (last) dim.

Every walker in analysis reads `classify(node)` and nothing else, so what fxquant believes about an
op is written down once, here. An op missing from the table is a BARRIER: walkers stop there and
report it (a barrier is never silently dropped).

Channel = the last dim of a hidden-state tensor. A transform T of that dim is an orthogonal matrix
(rotation, R1/R2) or a positive diagonal (equalization scale). An op "commutes" with T when
op(x T) = op(x) T.
"""
from __future__ import annotations

import enum
import operator

import torch
import torch.fx

from fxquant.runtime.kernels.ops import (
    FAST_FAKE_QUANT, FAST_HADAMARD, FAST_HADAMARD_FAKE_QUANT, INT4_TINYGEMM, INT8_WEIGHT_MM,
)
from fxquant.runtime.library import FAKE_QUANT, HADAMARD, QUANTIZED_LINEAR

aten = torch.ops.aten


class OpClass(enum.Enum):
    VIEW = "view"  # moves data, keeps values: reshape, transpose, slice, dtype casts, eval dropout
    COMMUTES_ORTHOGONAL = "commutes_orthogonal"  # x * s with s a scalar or per-token: (x T) s = (x s) T
    COMMUTES_DIAG = "commutes_diag"  # relu(x D) = relu(x) D for positive diagonal D
    ELEMENTWISE = "elementwise"  # other pointwise math (gelu, silu, x*y, x+c): commutes with neither
    RESIDUAL_ADD = "residual_add"  # x + y of equal shape: (x T) + (y T) = (x + y) T
    NORM = "norm"  # a fused norm op (layer_norm, rms_norm); decomposed RMSNorm is recognised by analysis.norms
    ATTENTION = "attention"  # SDPA, or softmax(.) @ v written out: head h = weighted sum of value head kv(h) over tokens
    LINEAR = "linear"  # reads a weight: linear, addmm (Conv1D), matmul with a parameter
    EMBEDDING = "embedding"
    ONLINE = "online"  # an fxquant online transform (fxquant::hadamard): orthogonal, mixes channels
    IGNORE = "ignore"  # no tensor output that feeds computation (shape asserts, sym sizes)
    BARRIER = "barrier"  # unknown: walkers stop and report


_VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.contiguous.default, aten.clone.default,
    aten.alias.default, aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.type_as.default, aten.detach.default, aten.flatten.using_ints, aten.unflatten.int, aten.t.default,
    aten.numpy_T.default, aten.repeat.default, operator.getitem,
}
_DTYPE_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
_POSITIVE_HOMOGENEOUS = {aten.relu.default, aten.leaky_relu.default}  # f(a x) = a f(x) for a > 0
_POINTWISE = {
    aten.gelu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default, aten.neg.default,
    aten.pow.Tensor_Scalar, aten.exp.default, aten.sub.Tensor, aten.div.Tensor, aten.rsqrt.default,
    aten.sqrt.default, aten.mean.dim, aten.erf.default, aten.square.default, aten.softplus.default,
    aten.expm1.default, aten.log1p.default, aten.abs.default, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.minimum.default, aten.maximum.default, aten.where.self, aten.gt.Scalar,
    aten.lt.Scalar, aten.ge.Scalar, aten.le.Scalar, aten.mish.default, aten.hardtanh.default,
    aten.elu.default, aten.log.default,
}
_IGNORE = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default,
           # read only their input's shape and dtype (MLA builds its keys in a new_empty of v's shape)
           aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.empty_like.default,
           aten.zeros_like.default, aten.ones_like.default}
# grouped (MoE expert) matmuls: x[tokens of expert e] @ W[e]; transformers registers its own fallback
_GROUPED_MM = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")
_TABLE: dict[object, OpClass] = {
    **{op: OpClass.VIEW for op in _VIEW_OPS},
    **{op: OpClass.COMMUTES_DIAG for op in _POSITIVE_HOMOGENEOUS},
    **{op: OpClass.ELEMENTWISE for op in _POINTWISE},
    **{op: OpClass.IGNORE for op in _IGNORE},
    aten.layer_norm.default: OpClass.NORM,
    aten.rms_norm.default: OpClass.NORM,  # torch.nn.RMSNorm (what layernorms_to_rms installs)
    aten.scaled_dot_product_attention.default: OpClass.ATTENTION,
    aten.linear.default: OpClass.LINEAR,
    aten.addmm.default: OpClass.LINEAR,
    aten.embedding.default: OpClass.EMBEDDING,
}


# fxquant's own torch.library ops; fake_quant keeps rows (tokens) apart but is not linear. A packed
# quantized linear reads no float weight a transform could edit: a barrier to every walker.
_FXQUANT_OPS = {HADAMARD: OpClass.ONLINE, FAKE_QUANT: OpClass.ELEMENTWISE, QUANTIZED_LINEAR: OpClass.BARRIER,
                # the kernels a lowered model runs (fxquant.runtime.kernels): the same semantics
                FAST_HADAMARD: OpClass.ONLINE, FAST_FAKE_QUANT: OpClass.ELEMENTWISE,
                FAST_HADAMARD_FAKE_QUANT: OpClass.BARRIER, INT4_TINYGEMM: OpClass.BARRIER,
                INT8_WEIGHT_MM: OpClass.BARRIER}


def classify(node: torch.fx.Node) -> OpClass:
    """The OpClass of a call node: the table entry, refined by operand shapes for mul/add."""
    if node.op != "call_function":
        return OpClass.BARRIER
    if node.target in _FXQUANT_OPS:
        return _FXQUANT_OPS[node.target]
    if node.target in (aten.mul.Tensor, aten.div.Tensor):
        # x * s commutes with any channel transform when s is constant along the channel dim
        return OpClass.COMMUTES_ORTHOGONAL if _scales_tokens_only(node) else OpClass.ELEMENTWISE
    if node.target in (aten.add.Tensor, aten.add_.Tensor):  # add_: the residual written in place
        # x + y commutes when both sides carry the channel dim: (xT + yT) = (x + y)T
        return OpClass.RESIDUAL_ADD if _same_shape_tensors(node) else OpClass.ELEMENTWISE
    if node.target is aten.sum.dim_IntList:
        # a sum over tokens / top-k experts is linear along other dims: sum_i(x_i T) = (sum_i x_i) T
        return OpClass.BARRIER if _touches_last_dim(node) else OpClass.COMMUTES_ORTHOGONAL
    if node.target is aten.index.Tensor:
        # gathering tokens (x[idx] over leading dims) moves rows, never channels
        return OpClass.BARRIER if len(node.args[1]) >= len(_shape(node.args[0]) or ()) else OpClass.VIEW
    if getattr(node.target, "_schema", None) is not None and node.target._schema.name in _GROUPED_MM:
        return OpClass.LINEAR
    if node.target in _MATMULS and is_eager_attention(node):
        return OpClass.ATTENTION
    if node.target in _MATMULS and matmul_weight(node) is not None:
        return OpClass.LINEAR  # x @ W.T (or x @ W) written out with a weight tensor
    return _TABLE.get(node.target, OpClass.BARRIER)


_MATMULS = (aten.matmul.default, aten.bmm.default, aten.mm.default)
_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.transpose.int)


def matmul_weight(node: torch.fx.Node) -> tuple[torch.fx.Node, bool] | None:
    """(placeholder, stored [..., in, out]) when the right operand of a matmul is a 2-D graph input (a
    weight candidate: `capture` lifts parameters to placeholders), or a 3-D one (stacked experts,
    `bmm(x[E, tokens, in], W[E, in, out])`), read through transposes of its last two dims and casts;
    else None. `x @ W.T` with W [out, in] (nn.Linear's layout) gives False, `x @ W` with W [in, out] True."""
    if node.op != "call_function" or node.target not in _MATMULS or len(node.args) < 2:
        return None
    w, flips = node.args[1], 0
    while isinstance(w, torch.fx.Node) and w.op == "call_function" and (is_dtype_cast(w) or w.target in _TRANSPOSES):
        rank = len(_shape(w.args[0]) or ())
        swaps_last_two = (w.target is aten.transpose.int and rank >= 2 and
                          {_normal_dim(d, rank) for d in w.args[1:3]} == {rank - 2, rank - 1})
        if not is_dtype_cast(w) and not swaps_last_two and not (rank == 2 and w.target in _TRANSPOSES):
            return None
        flips += not is_dtype_cast(w)
        w = w.args[0]
    if not isinstance(w, torch.fx.Node) or w.op != "placeholder" or len(_shape(w) or ()) not in (2, 3):
        return None
    return w, flips % 2 == 0
_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
_PASS_PROBS = (aten.dropout.default, aten.clone.default, aten.contiguous.default)  # keep P as it is


def is_eager_attention(node: torch.fx.Node) -> bool:
    """`softmax(scores, -1) @ v` written out by the model (eager attention, e.g. with soft-capped
    scores): each output row is a weighted sum of v's rows over tokens, as in SDPA. The weights may
    pass dtype casts and eval dropout on the way."""
    if node.op != "call_function" or node.target not in _MATMULS or len(node.args) < 2:
        return False
    probs = node.args[0]
    while isinstance(probs, torch.fx.Node) and (is_dtype_cast(probs) or probs.target in _PASS_PROBS or (
            probs.op == "call_function" and probs.target in _VIEW_OPS and keeps_channels(probs, probs.args[0]))):
        probs = probs.args[0]  # views that keep the token axis the softmax ran over (heads folded into batch)
    if not isinstance(probs, torch.fx.Node) or probs.target not in _SOFTMAX:
        return False
    rank = len(_shape(probs) or ())
    return rank >= 2 and _normal_dim(probs.args[1], rank) == rank - 1


def attention_value(node: torch.fx.Node):
    """The value input of an ATTENTION node (SDPA's third argument; `v` in softmax(.) @ v)."""
    return node.args[2] if node.target is aten.scaled_dot_product_attention.default else node.args[1]


def attention_mixers(node: torch.fx.Node) -> tuple:
    """The inputs of an ATTENTION node that weigh tokens, not channels: SDPA's q and k (and mask);
    the probabilities of softmax(.) @ v."""
    value = attention_value(node)
    return tuple(a for a in node.all_input_nodes if a is not value)


def carried_input(node: torch.fx.Node):
    """The operand of a COMMUTES_ORTHOGONAL node whose channels it carries (x in x * s, sum(x))."""
    if node.target is aten.sum.dim_IntList:
        return node.args[0]
    return next((a for a in node.args[:2] if isinstance(a, torch.fx.Node) and _shape(a) == _shape(node)), None)


def is_dtype_cast(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _DTYPE_CASTS


def keeps_channels(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    """True when the VIEW `node` maps channel c of `src` to channel c of its output, for every c.

    Checked on the shapes export recorded: the last dim keeps its size and the op's own dim
    arguments (slice, split, transpose, ...) never touch it.
    """
    if is_dtype_cast(node) or node.target in (aten.clone.default, aten.contiguous.default,
                                              aten.alias.default, aten.dropout.default, aten.detach.default):
        return True
    shape_in, shape_out = _shape(src), _shape(node)
    if shape_in is None or shape_out is None or not shape_in or not shape_out:
        return False
    if shape_in[-1] != shape_out[-1]:
        return False
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                       aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default,
                       aten.flatten.using_ints):
        return True  # last dim size unchanged and these ops never permute within it
    if node.target is aten.index.Tensor:
        return True  # classify() admits only gathers over leading dims
    if node.target is aten.repeat.default:
        return len(node.args[1]) == len(shape_in) and node.args[1][-1] == 1  # copies rows, never channels
    if node.target in (aten.slice.Tensor, aten.select.int):
        return _normal_dim(node.args[1] if len(node.args) > 1 else 0, len(shape_in)) != len(shape_in) - 1
    if node.target is aten.transpose.int:
        last = len(shape_in) - 1
        return last not in {_normal_dim(d, len(shape_in)) for d in node.args[1:3]}
    if node.target is aten.permute.default:
        return _normal_dim(node.args[1][-1], len(shape_in)) == len(shape_in) - 1
    return False


def _shape(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _normal_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _touches_last_dim(node) -> bool:
    rank = len(_shape(node.args[0]) or ())
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else range(rank)
    return any(_normal_dim(d, rank) == rank - 1 for d in dims)


def _scales_tokens_only(node) -> bool:
    """One operand is a python number, or a tensor whose channel dim is 1 (broadcast)."""
    if len(node.args) < 2:
        return False
    a, b = node.args[0], node.args[1]
    if node.target is aten.div.Tensor:
        return _is_token_scale(b)
    return _is_token_scale(a) or _is_token_scale(b)


def _is_token_scale(x) -> bool:
    if isinstance(x, (int, float)):
        return True
    shape = _shape(x)
    return shape is not None and (len(shape) == 0 or shape[-1] == 1)


def _same_shape_tensors(node) -> bool:
    if len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = _shape(node.args[0]), _shape(node.args[1])
    return a is not None and b is not None and a == b and len(a) > 0
