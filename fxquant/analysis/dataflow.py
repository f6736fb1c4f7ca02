"""Data-flow helpers every finder shares: linear sites, view tracing, containment, channel maps.

The one idea: channel maps are *computed*, not reasoned about. To learn which output channel of a
linear reaches which input column of a later linear, `channel_labels` runs the view ops between them
on a tensor whose every entry holds its channel index. Reshapes into heads, GQA repeats, fused-qkv
slices and Conv1D flattening then give exact maps with no per-architecture code.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from transformers.pytorch_utils import Conv1D

from fxquant.analysis.structure import LinearSite
from fxquant.ir import META_MODULE, CapturedGraph, ParamRef
from fxquant.ops import OpClass, attention_mixers, attention_value, classify, is_dtype_cast, matmul_weight

aten = torch.ops.aten
Node = torch.fx.Node


def module_of(node: Node) -> str:
    return node.meta.get(META_MODULE, "")


def shape_of(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def param_ref(cg: CapturedGraph, placeholder, user: Node) -> ParamRef | None:
    """The ParamRef `user` reads through `placeholder` (through dtype casts), tie-aware.

    torch.export keeps one name for a tied tensor (often `lm_head.weight`); the reference returned
    names the module that ran `user`, so the embedding's lookup links to the embedding module.
    """
    while isinstance(placeholder, Node) and is_dtype_cast(placeholder):
        placeholder = placeholder.args[0]
    if not isinstance(placeholder, Node) or placeholder.op != "placeholder":
        return None
    ref = cg.params.get(placeholder.name)
    if ref is None:
        return None
    for group in cg.tied:
        if ref.fqn in group:
            for fqn in group:
                module, _, name = fqn.rpartition(".")
                if module == module_of(user):
                    return ParamRef(module, name)
    return ref


def linear_input(node: Node) -> Node | None:
    """The activation a LINEAR node multiplies (linear: arg 0; addmm: arg 1)."""
    if node.target is aten.addmm.default:
        return node.args[1]
    return node.args[0] if node.args else None  # linear, grouped mm (x, W, offsets)


def linear_site(cg: CapturedGraph, node: Node) -> LinearSite | None:
    """A LinearSite for a linear/addmm whose weight is a model parameter, else None."""
    if classify(node) is not OpClass.LINEAR:
        return None
    if node.target is aten.addmm.default:  # Conv1D: bias + x @ W, W stored [in, out]
        bias_arg, weight_arg, transposed = node.args[0], node.args[2], True
    elif (written := matmul_weight(node)) is not None:  # x @ W.T written out: no bias in the op
        (weight_arg, transposed), bias_arg = written, None
        if len(shape_of(weight_arg)) == 3:  # bmm over stacked experts
            return _stacked_site(cg, node, weight_arg, transposed)
    elif node.target not in (aten.linear.default,):  # grouped mm: x @ W[e], W read as [E, in, out]
        return _expert_site(cg, node)
    else:
        weight_arg = node.args[1]
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        transposed = False
    weight = param_ref(cg, weight_arg, node)
    shape = shape_of(weight_arg)
    if weight is None or shape is None or len(shape) != 2:
        return None
    out_f, in_f = (shape[1], shape[0]) if transposed else shape
    bias = param_ref(cg, bias_arg, node) if isinstance(bias_arg, Node) else None
    return LinearSite(node.name, module_of(node), weight, bias, int(in_f), int(out_f), transposed)


def _expert_site(cg, node) -> LinearSite | None:
    """A grouped (MoE) matmul whose right operand is a stacked parameter, maybe read transposed."""
    weight_arg, transposed = node.args[1], True
    if isinstance(weight_arg, Node) and weight_arg.target is aten.transpose.int and set(
            d % 3 for d in weight_arg.args[1:3]) == {1, 2}:
        weight_arg, transposed = weight_arg.args[0], False  # stored [E, out, in] like nn.Linear
    return _stacked_site(cg, node, weight_arg, transposed)


def _stacked_site(cg, node, weight_arg, transposed: bool) -> LinearSite | None:
    """The site of stacked expert matrices [E, in, out] (`transposed`) or [E, out, in]."""
    weight, shape = param_ref(cg, weight_arg, node), shape_of(weight_arg)
    if weight is None or shape is None or len(shape) != 3:
        return None
    out_f, in_f = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
    return LinearSite(node.name, module_of(node), weight, None, int(in_f), int(out_f), transposed, int(shape[0]))


def real_users(node: Node) -> list[Node]:
    """Users that consume the value (shape assertions, size queries and `y.type_as(node)`, which reads
    only node's dtype, excluded)."""
    return [u for u in node.users if classify(u) is not OpClass.IGNORE
            and not (u.target is aten.type_as.default and u.args[0] is not node)]


def trace_views_back(node: Node) -> tuple[Node, list[Node]]:
    """Follow VIEW ops backwards from `node`; returns (first non-view producer, views passed)."""
    passed = []
    while classify(node) is OpClass.VIEW:
        passed.append(node)
        node = node.args[0]
    return node, passed


def users_outside(nodes: list[Node], allowed: set[Node]) -> list[Node]:
    """Legality of a fold: users of `nodes` that are neither on the path nor allowed exits.

    A rotation folded at one end of a path changes every value on it; a consumer outside the
    path would see the changed value, so a fold is legal only when this returns [].
    """
    inside = set(nodes) | allowed
    return [u for n in nodes for u in n.users if u not in inside and classify(u) is not OpClass.IGNORE]


def channel_labels(src: Node, chain: list[Node], labels: torch.Tensor | None = None) -> torch.Tensor:
    """Run `chain` (topologically ordered, src first) on labels = channel index of src's output.

    Every chain op after src must be a VIEW, an ATTENTION whose value input is on the chain
    (output head h takes value head kv(h): labels pass through unchanged), or a product whose
    other factor is off the chain (labels of the chain factor pass through). Raises ValueError
    naming the node that is none of these.
    """
    if labels is None:
        shape = shape_of(src)
        labels = torch.arange(shape[-1], dtype=torch.float64).expand(shape)
    env = {src: labels}
    for node in chain[1:]:
        env[node] = _label_step(node, env)
    return env[chain[-1]]


def _label_step(node: Node, env: dict) -> torch.Tensor:
    cls = classify(node)
    if cls is OpClass.VIEW:
        if is_dtype_cast(node):
            return env[node.args[0]]
        off_chain = [a for a in node.all_input_nodes if a not in env]
        if off_chain:
            raise ValueError(f"{node.target} at node '{node.name}' also reads '{off_chain[0].name}', off the traced path")
        args = [env.get(a, a) if isinstance(a, Node) else a for a in node.args]
        return node.target(*args, **node.kwargs)
    if cls is OpClass.ATTENTION:
        return _attention_values(node, env)
    if node.target is aten.mul.Tensor:
        on_chain = [a for a in node.args if isinstance(a, Node) and a in env]
        if len(on_chain) == 1:
            return env[on_chain[0]].expand(shape_of(node))
    raise ValueError(f"{node.target} at node '{node.name}' does not keep channel identity")


def _attention_values(node: Node, env: dict) -> torch.Tensor:
    """Attention with identity weights: out[b, h, t] = v[b, kv(h), t]; q, k (or the softmax
    probabilities) must be off the chain."""
    v = attention_value(node)
    if any(a in env for a in attention_mixers(node)) or v not in env:
        raise ValueError(f"attention '{node.name}': only its value input may carry the channels traced")
    labels, out_shape = env[v], shape_of(node)
    if labels.shape[-2] != out_shape[-2]:
        raise ValueError(f"attention '{node.name}': query and key lengths differ; recapture with one sequence")
    groups = out_shape[-3] // labels.shape[-3]
    return labels.repeat_interleave(groups, dim=-3) if groups > 1 else labels



def linear_sites(cg: CapturedGraph) -> list[tuple[LinearSite, bool]]:
    """Every linear whose weight is a model parameter, in graph order, with whether it makes the output.

    The output layer (lm_head) is the linear whose value reaches the graph's output without passing
    through another linear (views, logit scaling or soft-capping may follow it); quantizers keep it
    in float by default, as QuaRot and llm-compressor do.
    """
    sites = []
    for node in cg.graph.nodes:
        site = linear_site(cg, node)
        if site is not None:
            sites.append((site, _reaches_output(node)))
    return sites


LINEAR_MODULES = (torch.nn.Linear, Conv1D)  # modules whose forward input is the linear's input


def hookable_modules(cg: CapturedGraph) -> set[str]:
    """Paths of the modules whose forward pre-hook sees exactly their linear's input: the module is
    an nn.Linear (or Conv1D) and runs one linear site (a stacked-expert block runs several)."""
    runs = Counter(site.module for site, _ in linear_sites(cg))
    return {path for path, n in runs.items()
            if n == 1 and isinstance(cg.model.get_submodule(path), LINEAR_MODULES)}


def weight_sites(cg: CapturedGraph) -> list[LinearSite]:
    """The linears a quantizer edits: all but the output layer (it stays float), in graph order."""
    return [site for site, is_output in linear_sites(cg) if not is_output]


def quantized_sites(cg: CapturedGraph) -> tuple[list[LinearSite], list[LinearSite]]:
    """`weight_sites`, split into those whose module's forward input is the linear's input (hooks
    can observe it) and the others."""
    sites = weight_sites(cg)
    hookable = hookable_modules(cg)
    return [s for s in sites if s.module in hookable], [s for s in sites if s.module not in hookable]


def _reaches_output(node: Node) -> bool:
    return reaches_output(node, lambda user: classify(user) is not OpClass.LINEAR)


def reaches_output(node: Node, flows_through) -> bool:
    """Whether `node`'s value reaches the graph's output through users for which `flows_through`
    holds (the output layer: through no other linear)."""
    frontier, seen = [node], {node}
    while frontier:
        current = frontier.pop()
        for user in real_users(current):
            if user.op == "output":
                return True
            if flows_through(user) and user not in seen:
                seen.add(user)
                frontier.append(user)
    return False
