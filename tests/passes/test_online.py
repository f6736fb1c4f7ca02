"""R4: an online fxquant::hadamard on each down_proj input, inverse folded into the weight.

Exactness on every architecture, the inserted op visible as a graph node after re-capture, the
structure still complete, stacked-expert sites reported blocked, and what it buys 4-bit activations.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, SANDWICH, logit_change
from fxquant import analyse, apply_recipe, capture, quantize
from fxquant.models import tiny_model
from fxquant.runtime.hooks import online_hooks
from fxquant.viz.text import op_counts

REL_TOL = 2e-4
STACKED_EXPERTS = {"mixtral": 2, "qwen2_moe": 2}  # down projections inside a stacked-experts module


def _ids():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _apply_keeping_the_function(arch: str, preset: str):
    """Apply a float preset to a tiny `arch`; assert logits and cached greedy tokens did not move."""
    model, ids = tiny_model(arch), _ids()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    result = apply_recipe(model, preset)
    with torch.no_grad():
        assert (model(ids, use_cache=False).logits - ref).abs().max() <= REL_TOL * ref.abs().max()
    assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0), tokens)
    return model, result


@pytest.mark.parametrize("arch", ARCHS)
def test_r4_keeps_the_function_and_shows_one_hadamard_node_per_site(arch):
    model, result = _apply_keeping_the_function(arch, "rotate-r1r2r4")
    r4 = result.results["insert_online_hadamard"]
    inserted = sum(c.kind == "inserted" for c in r4.changes)
    assert inserted == 2 * (arch != "mixtral") and len(r4.blocked) == STACKED_EXPERTS.get(arch, 0)
    r1 = sum(c.kind == "inserted" for c in result.results["rotate_residual"].changes)  # R1 online
    assert (r1 > 0) == (arch in SANDWICH)
    cg = capture(model)
    assert op_counts(cg).get("fxquant.hadamard.default", 0) == inserted + r1 == len(online_hooks(model))
    # the rotated down_proj input is explained by the online op; after R1 online (sandwich norms) the
    # stream's readers sit behind Hadamards, which nothing may rotate further (and nothing else is unproven)
    left = analyse(cg).blocked
    assert all("hadamard" in b.reason or "post-norm" in b.reason for b in left) and bool(left) == bool(r1)


def test_r4_nodes_sit_right_before_down_proj():
    model = tiny_model("llama")
    quantize(model, "rotate-r1r2r4")
    cg = capture(model)
    nodes = [n for n in cg.graph.nodes if n.op == "call_function" and str(n.target) == "fxquant.hadamard.default"]
    assert [cg.module_of(n) for n in nodes] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert all(any(cg.module_of(u) == cg.module_of(n) and "linear" in str(u.target) for u in n.users) for n in nodes)


def test_r4_is_idempotent_on_an_already_rotated_model():
    model = tiny_model("llama")
    quantize(model, "rotate-r1r2r4")
    result = apply_recipe(model, {"passes": [{"pass": "insert_online_hadamard"}]})
    assert result.results["insert_online_hadamard"].summary() == "no changes, 0 blocked"
    assert len(online_hooks(model)) == 2


def _down_outliers():
    """A tiny llama whose down_proj inputs carry two huge channels (as real MLP activations do)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[[5, 77]] *= 30.0
            layer.mlp.down_proj.weight[:, [5, 77]] /= 30.0
    return model


def _error(preset):
    return logit_change(_down_outliers(), _ids(), preset)


def test_r4_makes_4bit_activations_more_accurate_when_down_proj_inputs_have_outliers():
    assert _error("rotate-r1r2r4-w16a4") < 0.8 * _error("rotate-r1r2-w16a4")


@pytest.mark.parametrize("arch", ARCHS)
def test_quarot_float_r3_and_r4_keep_logits_and_cached_generation(arch):
    model, result = _apply_keeping_the_function(arch, "quarot-float")
    assert result.results["rotate_qk"].summary() == "2 inserted, 0 blocked"
    r4 = sum(c.kind == "inserted" for c in result.results["insert_online_hadamard"].changes)
    r1 = sum(c.kind == "inserted" for c in result.results["rotate_residual"].changes)  # R1 online (sandwich)
    assert op_counts(capture(model))["fxquant.hadamard.default"] == 2 * 2 + r4 + r1  # q and k per layer, R4


def test_r3_nodes_take_the_post_rope_queries_and_keys():
    model = tiny_model("llama")
    quantize(model, "quarot-float")
    cg = capture(model)
    sdpa = [n for n in cg.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    for node in sdpa:
        q, k = node.args[0], node.args[1]
        assert [str(a.target) for a in (q, k)] == ["fxquant.hadamard.default"] * 2
        assert all("add" in str(a.args[0].target) for a in (q, k))  # RoPE ends in q*cos + rotate_half(q)*sin


def test_kv_cache_quantization_puts_keys_after_r3_and_values_on_a_4bit_grid(monkeypatch):
    import fxquant.runtime.attention as attention

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((key.detach().clone(), value.detach().clone()))
        return real(module, query, key, value, attention_mask, **kwargs)

    model = tiny_model("llama")
    result = apply_recipe(model, "quarot-w4a4kv4")
    assert result.results["quantize_kv_cache"].summary() == "2 inserted, 0 blocked"
    real = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    with torch.no_grad():
        model(_ids()[:1], use_cache=False)
    assert len(seen) == 2
    for key, value in seen:  # [batch, kv heads, tokens, head_dim]: 16 levels per (token, head) at most
        for t in (key, value):
            assert max(row.unique().numel() for row in t.reshape(-1, t.shape[-1])) <= 16
    tokens = model.generate(_ids()[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 16)



def test_torch_compile_of_a_quarot_float_model_matches_eager_and_export_shows_the_ops():
    """The custom op has a fake implementation: inductor (CPU) and torch.export both trace through it."""
    model, ids = tiny_model("llama"), _ids()[:1]
    quantize(model, "quarot-float")
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        compiled = torch.compile(model)(ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(model, (ids,), kwargs={"use_cache": False}, strict=False)
    targets = [str(n.target) for n in exported.graph.nodes]
    assert targets.count("fxquant.hadamard.default") == 6  # per layer: q, k (R3) and down_proj (R4)


def test_the_hadamard_op_passes_torch_library_opcheck():
    from fxquant.runtime.library import hadamard

    for x in (torch.randn(2, 64), torch.randn(1, 4, 6, 16).transpose(1, 2)):
        torch.library.opcheck(hadamard._opoverload, (x,))


def test_importing_fxquant_registers_no_attention_implementation_and_a_pass_that_needs_one_does():
    """transformers' AttentionInterface is global state: only R3 / KV-cache passes and load touch it."""
    import subprocess
    import sys

    code = ("import fxquant; from transformers import AttentionInterface\n"
            "from fxquant.runtime.attention import ATTENTION_IMPLEMENTATION as name\n"
            "print(name in AttentionInterface())\n"
            "from fxquant.models import tiny_model\n"
            "fxquant.quantize(tiny_model('llama'), 'quarot-float')\n"
            "print(name in AttentionInterface())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
