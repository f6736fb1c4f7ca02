"""A graph dynamo hands over, raised back into a module tree at the model's own paths.

Entry point: `raise_graph(gm, example_inputs, clone=...) -> RaisedGraph`. The one idea: dynamo
inlines every module and lifts each weight to a placeholder whose source names it
(`L['self']._modules['model']...._parameters['weight']`). Raising gives every weight back its path,
every linear call its `nn.Linear` (or `QuantizedLinear`) at the module path that ran it, the fxquant
ops just before a linear their hooks again (input scale, online Hadamard, activation quantizer), and
every SDPA call a `GraphAttention` at its attention module's path. The result is an ordinary model,
so capture, analysis, every pass, `pack` and `lower` run on it exactly as on the user's model, and
`clone=True` keeps the user's tensors untouched (a recipe edits the copies).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from fxquant.analysis.dataflow import reaches_output
from fxquant.quant import records
from fxquant.quant.format import QuantFormat
from fxquant.runtime.attention import GraphAttention
from fxquant.runtime.hooks import INPUT_SCALE, ActivationFakeQuant, InputScale, OnlineHadamard
from fxquant.runtime.library import FAKE_QUANT, HADAMARD, QUANTIZED_LINEAR
from fxquant.runtime.linear import QuantizedLinear, absorb_input_quantizer

LINEAR = (F.linear, torch._C._nn.linear)
SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
QUANTIZED = (QUANTIZED_LINEAR, torch.ops.fxquant.quantized_linear)  # dynamo records the packet
MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)
_TENSOR_DICTS = {"_parameters": "parameter", "_buffers": "buffer"}


@dataclass(frozen=True)
class RaisedGraph:
    """The module tree (`module(*user inputs)` computes what the graph did), and which of dynamo's
    example inputs are the user's (the rest were weights, now owned by the tree)."""

    module: torch.fx.GraphModule
    user_positions: tuple[int, ...]
    linears: int  # call sites raised to linear modules
    attentions: int  # SDPA calls raised to GraphAttention
    left: tuple[str, ...] = ()  # call sites left as graph ops, each with its reason
    sources: dict = None  # fqn -> the user's tensor it was raised from (what `reuse` matches on)


def raise_graph(gm: torch.fx.GraphModule, example_inputs, *, clone: bool) -> RaisedGraph:
    """Raise dynamo's `gm` into a module tree; `clone`: the tree owns copies of the weights."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    root = _root_prefix(placeholders)
    tree, weights, user, sources = torch.nn.Module(), {}, [], {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        where = _tensor_path(node, root)
        if where is None or not isinstance(value, torch.Tensor):
            user.append(i)
            continue
        fqn, kind = where
        _attach(tree, fqn, _owned(value, clone, kind), kind)
        weights[node], sources[fqn] = fqn, value
    builder = _Builder(tree, weights, root)
    for node in gm.graph.nodes:
        builder.copy(node)
    module = torch.fx.GraphModule(tree, builder.graph, class_name="RaisedGraph")
    module.graph.eliminate_dead_code()  # the quantizer / Hadamard nodes that became a linear's hooks
    module.recompile()
    return RaisedGraph(module, tuple(user), builder.linears, builder.attentions, tuple(builder.left), sources)


def _owned(value: torch.Tensor, clone: bool, kind: str) -> torch.Tensor:
    tensor = value.detach().clone() if clone else value
    if kind == "parameter" and not isinstance(tensor, torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor, requires_grad=False)
    return tensor


def _attach(tree: torch.nn.Module, fqn: str, tensor: torch.Tensor, kind: str) -> None:
    path, _, name = fqn.rpartition(".")
    owner = _module_at(tree, path)
    if kind == "parameter":
        owner.register_parameter(name, tensor)
    else:
        owner.register_buffer(name, tensor)


def _module_at(tree: torch.nn.Module, path: str) -> torch.nn.Module:
    module = tree
    for part in filter(None, path.split(".")):
        if part not in module._modules:
            module.add_module(part, torch.nn.Module())
        module = module._modules[part]
    return module


def _root_prefix(placeholders) -> str | None:
    """`L['self']`-style name of the root module: the object whose `_modules` / `_parameters` /
    `_buffers` the outermost weight access reads."""
    for node in placeholders:
        source = getattr(node, "_dynamo_source", None)
        chain = []
        while source is not None:
            chain.append(source)
            source = getattr(source, "base", None)
        for src in reversed(chain):  # from the local outwards
            if type(src).__name__ == "AttrSource" and src.member in ("_modules", *_TENSOR_DICTS):
                return src.base.name
    return None


def _tensor_path(node, root: str | None) -> tuple[str, str] | None:
    """(dotted path, "parameter" | "buffer") of a placeholder that reads a module's tensor."""
    source = getattr(node, "_dynamo_source", None)
    if source is None or root is None or not source.name.startswith(root):
        return None
    tokens = _tokens(source.name[len(root):])
    if len(tokens) < 2 or tokens[-2] not in _TENSOR_DICTS:
        return None
    return ".".join(t for t in tokens if t not in ("_modules", *_TENSOR_DICTS)), _TENSOR_DICTS[tokens[-2]]


def _tokens(expression: str) -> list[str]:
    """`._modules['model'].layers[0]` -> ['_modules', 'model', 'layers', '0']."""
    return [a or b or c for a, b, c in re.findall(r"\.(\w+)|\['([^']*)'\]|\[(\d+)\]", expression)]


def module_path(node: torch.fx.Node, root: str | None) -> str:
    """Dotted path of the innermost module that ran `node`, relative to the root ('' when none)."""
    stack = node.meta.get("nn_module_stack") or {}
    return _dotted(list(stack.values())[-1][0], root) if stack else ""


def _dotted(path: str, root: str | None) -> str:
    """`L['self'].model.layers[0]` -> `model.layers.0` (relative to the root module)."""
    if root is None or not path.startswith(root):
        return ""
    return ".".join(t for t in _tokens(path[len(root):]) if t != "_modules")


class _Builder:
    """Copies dynamo's nodes into a new graph, raising weights, linears, their hooks and SDPA calls."""

    def __init__(self, tree: torch.nn.Module, weights: dict, root: str | None):
        self.tree, self.weights, self.root = tree, weights, root
        self.graph, self.env = torch.fx.Graph(), {}
        self.linears = self.attentions = 0
        self.used_paths: set[str] = set()
        self.left: list[str] = []

    def copy(self, node: torch.fx.Node) -> None:
        if node.op == "placeholder":
            self.env[node] = (self.graph.get_attr(self.weights[node]) if node in self.weights
                              else self.graph.placeholder(node.name))
        elif node.op == "call_function" and node.target in LINEAR + QUANTIZED:
            self.env[node] = self._linear(node)
        elif node.op == "call_function" and node.target in SDPA:
            self.env[node] = self._attention(node)
        else:
            self.env[node] = self.graph.node_copy(node, self._arg)
        if node.op != "output":
            self.env[node].meta.update(node.meta)
            if "nn_module_stack" in node.meta:  # dynamo's spelling of a path -> the tree's dotted one
                self.env[node].meta["nn_module_stack"] = {
                    key: (_dotted(path, self.root), cls) for key, (path, cls) in node.meta["nn_module_stack"].items()}

    def _arg(self, node: torch.fx.Node) -> torch.fx.Node:
        return self.env[node]

    def _free_path(self, node) -> str | None:
        """The module path a raised call site takes, or None (recorded in `left`) when it has none
        or another call site of the same module took it."""
        path = module_path(node, self.root)
        if not path or path in self.used_paths:
            why = "called outside any module" if not path else f"'{path}' makes more than one such call"
            self.left.append(f"{node.name} ({node.target.__name__}): {why}, so it stays a graph op")
            return None
        self.used_paths.add(path)
        return path

    def _linear(self, node: torch.fx.Node) -> torch.fx.Node:
        layer = _linear_module(node, self.tree, self.weights)
        if layer is None:
            self.left.append(f"{node.name} ({module_path(node, self.root) or 'no module'}): its weight is computed "
                             "in the graph, not read from a module, so no pass or kernel can take it")
        path = self._free_path(node) if layer is not None else None
        if path is None:
            return self.graph.node_copy(node, self._arg)
        x, hooks = _hooks_before(node.args[0], path, self.weights)
        for hook in hooks:
            layer.register_forward_pre_hook(hook)
        if isinstance(layer, QuantizedLinear) and layer.act is not None:  # the op quantized its input itself
            act, layer.act = layer.act, None
            layer.register_forward_pre_hook(act)
            absorb_input_quantizer(layer)
        parent, _, name = path.rpartition(".")
        owner = _module_at(self.tree, parent)
        _carry_children(owner._modules.get(name), layer)
        owner._modules[name] = layer
        self.linears += 1
        return self.graph.call_module(path, (self.env[x],))

    def _attention(self, node: torch.fx.Node) -> torch.fx.Node:
        path = self._free_path(node)
        if path is None:
            return self.graph.node_copy(node, self._arg)
        parent, _, name = path.rpartition(".")
        owner = _module_at(self.tree, parent)
        attention = GraphAttention()
        _carry_children(owner._modules.get(name), attention)
        owner._modules[name] = attention
        self.attentions += 1
        args, kwargs = torch.fx.map_arg((node.args, node.kwargs), self._arg)
        return self.graph.call_module(path, args, kwargs)


def _carry_children(old: torch.nn.Module | None, new: torch.nn.Module) -> None:
    """Keep the submodules and tensors already placed at a path on the module that replaces it."""
    if old is None:
        return
    for name, child in old._modules.items():
        new._modules.setdefault(name, child)
    for name, tensor in old._parameters.items():
        if name not in new._parameters or new._parameters[name] is None:
            new._parameters[name] = tensor
    for name, tensor in old._buffers.items():
        new._buffers.setdefault(name, tensor)


def _weight(arg, tree, weights):
    """The tree's tensor a node argument reads (a raised weight placeholder), or None."""
    if isinstance(arg, torch.fx.Node) and arg in weights:
        return tree.get_parameter(weights[arg]) if _is_param(tree, weights[arg]) else tree.get_buffer(weights[arg])
    return None


def output_linear(module: torch.fx.GraphModule) -> str | None:
    """The path of the raised linear whose value reaches the graph's output through no other linear
    (the output layer: `lower` decodes it on the C float32 GEMV when it is float), or None."""
    linears = [n for n in module.graph.nodes if n.op == "call_module"
               and isinstance(module.get_submodule(n.target), (torch.nn.Linear, QuantizedLinear))]
    others = set(linears)
    return next((n.target for n in reversed(linears) if reaches_output(n, lambda user: user not in others)), None)


def _is_param(tree, fqn: str) -> bool:
    path, _, name = fqn.rpartition(".")
    return name in tree.get_submodule(path)._parameters


def _linear_module(node, tree, weights) -> torch.nn.Module | None:
    """The module a linear call site becomes, sharing the tree's tensors; None when its weights are
    not raised weights (computed in the graph, so no module can own them)."""
    args = list(node.args) + [node.kwargs.get("bias")] * (3 - len(node.args))
    if node.target in QUANTIZED:
        return _quantized_module(node, tree, weights)
    weight, bias = _weight(args[1], tree, weights), _weight(args[2], tree, weights)
    if weight is None or (args[2] is not None and bias is None) or not isinstance(weight, torch.nn.Parameter):
        return None
    layer = torch.nn.Linear.__new__(torch.nn.Linear)
    torch.nn.Module.__init__(layer)
    layer.out_features, layer.in_features = weight.shape
    layer.weight, layer.bias = weight, bias
    record = records.recorded_tensor(weight)  # quantized but not packed: `lower` packs it from these codes
    if record is not None:
        records.record(layer, "weight", *record)
    return layer


def _quantized_module(node, tree, weights) -> QuantizedLinear | None:
    x, codes, scale, zero, bias, bits, symmetric, group_size, float_zero, in_features, transposed = node.args[:11]
    defaults = {"act_bits": 0, "act_symmetric": True, "act_clip_ratio": 1.0}  # the input quantizer a layer absorbed
    given = dict(zip(defaults, node.args[11:])) | {k: v for k, v in node.kwargs.items() if k in defaults}
    act_bits, act_symmetric, act_clip = (_constant(given.get(k, d), node) for k, d in defaults.items())
    tensors = [_weight(a, tree, weights) for a in (codes, scale, zero, bias)]
    if any(t is None and a is not None for t, a in zip(tensors, (codes, scale, zero, bias))):
        return None
    codes, scale, zero, bias = tensors
    fmt = QuantFormat.from_float_zero(bits, symmetric, group_size or None, float_zero)
    layer = QuantizedLinear.__new__(QuantizedLinear)
    torch.nn.Module.__init__(layer)
    layer.in_features, layer.out_features, layer.fmt, layer.transposed = in_features, scale.shape[0], fmt, transposed
    for name, tensor in (("codes", codes), ("scale", scale), ("zero", zero)):
        layer.register_buffer(name, tensor)
    layer.bias = bias
    layer.act = ActivationFakeQuant(act_bits, act_symmetric, act_clip) if act_bits else None
    return layer


def _hooks_before(x: torch.fx.Node, path: str, weights) -> tuple[torch.fx.Node, list]:
    """Walk back from a linear's input through the ops its portable hooks emit (activation quantizer,
    online Hadamard, input scale, in reverse order), each used only on the way to this linear; return
    the input before them and the hooks in the order they run."""
    hooks = []
    if _single_use(x) and x.target is FAKE_QUANT:
        bits, symmetric, *clip = (_constant(a, x) for a in x.args[1:])
        clip = clip[0] if clip else _constant(x.kwargs.get("clip_ratio", 1.0), x)
        hooks.append(ActivationFakeQuant(bits, symmetric, clip))
        x = x.args[0]
    if _single_use(x) and x.target is HADAMARD:
        hooks.append(OnlineHadamard())
        x = x.args[0]
    scale = x.args[1] if _single_use(x) and x.target in MUL else None
    if isinstance(scale, torch.fx.Node) and scale.op == "call_method" and scale.target == "to":
        scale = scale.args[0]  # InputScale casts the scale to the input's dtype first
    if scale is not None and weights.get(scale) == f"{path}.{INPUT_SCALE}":
        hooks.append(InputScale())
        x = x.args[0]
    return x, hooks[::-1]


def _constant(arg, node: torch.fx.Node):
    """A quantizer's bits / symmetric / clip ratio as a Python value. Under `dynamic=True` dynamo
    makes a module's float constant (the hook's clip ratio) a graph input; its value is the hint
    of the symbol dynamo traced with, which the hook holds for good."""
    if not isinstance(arg, torch.fx.Node):
        return arg
    value = arg.meta.get("example_value", arg.meta.get("val"))
    hint = getattr(getattr(value, "node", None), "hint", value)
    if not isinstance(hint, (bool, int, float)):
        raise RuntimeError(f"fxquant backend: the quantizer {node.name} takes {arg.name}, which is not a "
                           "constant this graph can read; compile with dynamic=False")
    return hint


def _single_use(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and len(node.users) == 1
