"""Capture: every weight-reading node links to the real module and parameter; failures name the module."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, captured
from fxquant.analysis.dataflow import linear_site, param_ref
from fxquant.capture import capture
from fxquant.errors import CaptureError
from fxquant.ir import META_MODULE, ParamRef
from fxquant.ops import OpClass, classify


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_and_embedding_links_to_a_live_parameter(arch):
    cg, _ = captured(arch)
    weight_nodes = [n for n in cg.graph.nodes if classify(n) in (OpClass.LINEAR, OpClass.EMBEDDING)]
    assert weight_nodes
    for node in weight_nodes:
        if classify(node) is OpClass.EMBEDDING:
            ref = param_ref(cg, node.args[0], node)
        else:
            ref = linear_site(cg, node).weight
        assert ref is not None and ref.module == node.meta[META_MODULE], node.name
        assert cg.param(ref) is cg.model.get_submodule(ref.module).get_parameter(ref.name)


def test_link_is_the_model_parameter_itself_so_edits_reach_the_model():
    cg, _ = captured("llama")
    site = linear_site(cg, cg.node("linear"))
    assert site.weight == ParamRef("model.layers.0.self_attn.q_proj", "weight")
    assert cg.param(site.weight) is cg.model.model.layers[0].self_attn.q_proj.weight


def test_tied_embedding_links_to_the_embedding_module_not_lm_head():
    cg, _ = captured("gemma")
    emb = next(n for n in cg.graph.nodes if classify(n) is OpClass.EMBEDDING)
    assert emb.args[0].name == "p_lm_head_weight"  # export keeps one name for the tied tensor
    assert param_ref(cg, emb.args[0], emb) == ParamRef("model.embed_tokens", "weight")


def test_gpt2_conv1d_is_a_transposed_linear_site():
    cg, s = captured("gpt2")
    c_attn = s.stream.groups[0].readers[0]
    assert (c_attn.transposed, c_attn.in_features, c_attn.out_features) == (True, 64, 192)
    assert c_attn.bias == ParamRef("transformer.h.0.attn.c_attn", "bias")


def test_plain_module_with_example_inputs():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    cg = capture(model, (torch.randn(2, 8),))
    assert sorted(str(r) for r in cg.params.values()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert {n.meta[META_MODULE] for n in cg.graph.nodes if classify(n) is OpClass.LINEAR} == {"0", "2"}


def test_plain_module_without_example_inputs_is_refused():
    with pytest.raises(CaptureError, match="needs example_inputs"):
        capture(torch.nn.Linear(4, 4))


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch: torch.export cannot trace it
            return x * 2
        return x


def test_capture_failure_names_the_module():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _DataDependent())
    with pytest.raises(CaptureError, match=r"inside module '1' \(_DataDependent\)"):
        capture(model, (torch.randn(2, 4),))


def test_capture_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).train()
    capture(model, (torch.randn(1, 4),))
    assert model.training
