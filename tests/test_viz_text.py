"""viz.text: the graph dump names weights and modules, and op counts are exact; viz.names: the one
layer-index folding rule every table uses."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx

from fxquant.capture import capture
from fxquant.ir import META_FROM
from fxquant.models import tiny_model
from fxquant.viz import fold_indices, graph_text, op_counts


@pytest.fixture(scope="module")
def tiny_llama():
    return capture(tiny_model("llama"))


def test_linear_count_is_exact(tiny_llama):
    counts = op_counts(tiny_llama.gm)
    assert counts["aten.linear.default"] == 15  # 7 per layer (q k v o gate up down) x 2 + lm_head
    assert counts["aten.scaled_dot_product_attention.default"] == 2
    assert counts["aten.embedding.default"] == 1
    assert op_counts(tiny_llama) == counts


def test_dump_names_parameters_and_modules(tiny_llama):
    lines = graph_text(tiny_llama).splitlines()
    assert ("p_model_layers_0_self_attn_q_proj_weight = param model.layers.0.self_attn.q_proj.weight"
            "  # f32[64, 64]") in lines
    (q_line,) = [ln for ln in lines if ln.startswith("linear = ")]
    assert q_line.endswith(", p_model_layers_0_self_attn_q_proj_weight)  # model.layers.0.self_attn.q_proj  f32[1, 16, 64]")
    assert q_line.startswith("linear = aten.linear.default(")
    assert "input_ids = input  # i64[1, 16]" in lines
    assert lines[-1] == "return (linear_14,)"


def test_header_holds_op_counts(tiny_llama):
    text = graph_text(tiny_llama)
    header = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert header[0].startswith(f"# {len(tiny_llama.graph.nodes)} nodes: ")
    assert "#     15  aten.linear.default" in header
    assert "(23 params)" in header[0]  # 9 per layer x 2 + embed, norm, lm_head + 2 rotary buffers (ParamRefs)


def test_graph_module_alone_reads_param_meta(tiny_llama):
    assert "param model.layers.0.self_attn.q_proj.weight" in graph_text(tiny_llama.gm)


class _TwoInputs(torch.nn.Module):
    def forward(self, x, y):
        return torch.relu(x * 2.0 + y).sum(dim=-1, keepdim=True)


def test_synthetic_graph_literals_and_provenance():
    gm = torch.fx.symbolic_trace(_TwoInputs())
    (add,) = [n for n in gm.graph.nodes if n.target is operator.add]
    add.meta[META_FROM] = "mul"
    lines = graph_text(gm).splitlines()
    assert "x = input" in lines
    assert "mul = mul(x, 2.0)" in lines
    assert "add = add(mul, y)  # from mul" in lines
    assert "sum_1 = call_method sum(relu, dim=-1, keepdim=True)" in lines
    assert op_counts(gm) == {"add": 1, "mul": 1, "relu": 1}


def test_rejects_other_objects():
    with pytest.raises(TypeError, match="CapturedGraph or torch.fx.GraphModule"):
        graph_text(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("text, folded", [
    ("model.layers.3.mlp", "model.layers.*.mlp"),
    ("input channels by model.layers.12.input_layernorm", "input channels by model.layers.*.input_layernorm"),
    ("model.layers.0.mlp.up_proj[0:128] -> down_proj", "model.layers.*.mlp.up_proj[0:128] -> down_proj"),
    ("transformer.h.11", "transformer.h.*"),  # a trailing index folds too
    ("model.layers.0.experts.3.w1", "model.layers.*.experts.*.w1"),
    ("rms, eps 0.1, ln_1, kv0:v[0:16], 1.8x fewer", "rms, eps 0.1, ln_1, kv0:v[0:16], 1.8x fewer"),  # not path components
])
def test_one_rule_folds_layer_indices_and_nothing_else(text, folded):
    assert fold_indices(text) == folded
