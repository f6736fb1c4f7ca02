"""Text dump of a captured graph: one line per node, parameters and module paths spelled out.

Entry point: `graph_text(gm_or_cg)`. The one idea: a dump should read like the model, so a parameter
placeholder shows the weight it is (`param model.layers.0.self_attn.q_proj.weight`) and each call
shows the module that ran it, with the shape from `node.meta["val"]`. The header holds `op_counts`,
which golden snapshots diff. Reads only fxquant.ir and torch.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from fxquant.ir import META_FROM, META_MODULE, META_PARAM, CapturedGraph

_DTYPES = {
    torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8",
}


def graph_text(gm_or_cg) -> str:
    """A readable dump: a header of node and op counts, then `name = target(args)  # module  shape`.

    Example::

        print(graph_text(capture(tiny_model("llama"))))
        # p_lm_head_weight = param lm_head.weight  # f32[128, 64]
        # linear_14 = aten.linear.default(alias, p_lm_head_weight)  # lm_head  f32[1, 16, 128]
    """
    gm, params = _unpack(gm_or_cg)
    nodes = list(gm.graph.nodes)
    return "\n".join([*_header(nodes, params), *(_node_line(n, params) for n in nodes)])


def op_counts(gm_or_cg) -> dict[str, int]:
    """call_function targets by aten name (`aten.linear.default`), most frequent first."""
    gm, _ = _unpack(gm_or_cg)
    counts = Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def op_name(target) -> str:
    """`aten.linear.default` for an OpOverload, the function's name otherwise (`getitem`)."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", None) or str(target)


def _unpack(gm_or_cg) -> tuple[torch.fx.GraphModule, dict]:
    if isinstance(gm_or_cg, CapturedGraph):
        return gm_or_cg.gm, gm_or_cg.params
    if isinstance(gm_or_cg, torch.fx.GraphModule):
        return gm_or_cg, {}
    raise TypeError(f"graph_text needs a CapturedGraph or torch.fx.GraphModule, got {type(gm_or_cg).__name__}")


def _header(nodes, params) -> list[str]:
    kinds = Counter(n.op for n in nodes)
    n_params = sum(1 for n in nodes if n.op == "placeholder" and _param(n, params) is not None)
    lines = [
        f"# {len(nodes)} nodes: {kinds['placeholder']} placeholders ({n_params} params), "
        f"{kinds['call_function']} call_function, {kinds['get_attr']} get_attr, {kinds['output']} output",
        "# op counts:",
    ]
    counts = Counter(op_name(n.target) for n in nodes if n.op == "call_function")
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"#   {count:4d}  {name}")
    return lines


def _param(node, params):
    return node.meta.get(META_PARAM) or params.get(node.name)


def _node_line(node: torch.fx.Node, params) -> str:
    if node.op == "output":
        return f"return {_fmt(node.args[0] if len(node.args) == 1 else node.args)}"
    if node.op == "placeholder":
        ref = _param(node, params)
        rhs = f"param {ref}" if ref is not None else "input"
    elif node.op == "get_attr":
        rhs = f"get_attr {node.target}"
    else:
        callee = op_name(node.target) if node.op == "call_function" else f"{node.op} {node.target}"
        rhs = f"{callee}({_call_args(node)})"
    notes = [node.meta.get(META_MODULE, ""), _shape(node.meta.get("val"))]
    if META_FROM in node.meta:
        notes.append(f"from {node.meta[META_FROM]}")
    comment = "  ".join(n for n in notes if n)
    return f"{node.name} = {rhs}" + (f"  # {comment}" if comment else "")


def _call_args(node: torch.fx.Node) -> str:
    parts = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
    return ", ".join(parts)


def _fmt(value) -> str:
    """Nodes by name, containers recursively, dtypes and devices bare, other literals by repr."""
    if isinstance(value, torch.fx.Node):
        return value.name
    if isinstance(value, list):
        return "[" + ", ".join(map(_fmt, value)) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_fmt, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (torch.device, torch.layout, torch.memory_format)):
        return str(value).removeprefix("torch.")
    return repr(value)


def _shape(val) -> str:
    """`f32[1, 16, 64]` for a (fake) tensor, a tuple of those for multi-output nodes, else ''."""
    if isinstance(val, torch.Tensor):
        dtype = _DTYPES.get(val.dtype, str(val.dtype).removeprefix("torch."))
        return f"{dtype}[{', '.join(str(d) for d in val.shape)}]"
    if isinstance(val, (tuple, list)):
        inner = [_shape(v) or "?" for v in val]
        return "(" + ", ".join(inner) + ")" if inner else ""
    if isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat)):
        return str(val)
    return ""
