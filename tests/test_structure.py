"""Exact structure of every tiny architecture: which norm feeds which linears, who writes the
stream, which KV head feeds which o columns, which rows of up reach down. Found from data flow."""
from __future__ import annotations

import pytest

from conftest import captured
from fxquant.analysis import HeadMap
from fxquant.viz import format_structure

L = 2  # layers in every tiny model
LLAMA_LIKE = ["llama", "qwen2", "qwen3", "mistral", "gemma"]
GQA = (  # 4 query heads share 2 KV heads, head_dim 16
    HeadMap(0, (0, 16), (0, 1), ((0, 16), (16, 32))),
    HeadMap(1, (16, 32), (2, 3), ((32, 48), (48, 64))),
)


def _mha(v_offset):
    return tuple(HeadMap(h, (v_offset + 16 * h, v_offset + 16 * h + 16), (h,), ((16 * h, 16 * h + 16),)) for h in range(4))


def _llama_like(p="model.layers", final="model.norm"):
    return {
        "groups": {
            **{f"{p}.{i}.input_layernorm": (f"{p}.{i}.self_attn.q_proj", f"{p}.{i}.self_attn.k_proj", f"{p}.{i}.self_attn.v_proj") for i in range(L)},
            **{f"{p}.{i}.post_attention_layernorm": (f"{p}.{i}.mlp.gate_proj", f"{p}.{i}.mlp.up_proj") for i in range(L)},
            final: ("lm_head",),
        },
        "writers": {m for i in range(L) for m in (f"{p}.{i}.self_attn.o_proj", f"{p}.{i}.mlp.down_proj")},
        "vo": [(f"{p}.{i}.self_attn.v_proj", f"{p}.{i}.self_attn.o_proj", GQA) for i in range(L)],
        "mlp": [(f"{p}.{i}.mlp.up_proj", (0, 128), f"{p}.{i}.mlp.gate_proj", f"{p}.{i}.mlp.down_proj") for i in range(L)],
        "sources": [("model.embed_tokens", "token")],
    }


EXPECTED = {arch: _llama_like() for arch in LLAMA_LIKE}
EXPECTED["phi3"] = {
    "groups": {
        **{f"model.layers.{i}.input_layernorm": (f"model.layers.{i}.self_attn.qkv_proj",) for i in range(L)},
        **{f"model.layers.{i}.post_attention_layernorm": (f"model.layers.{i}.mlp.gate_up_proj",) for i in range(L)},
        "model.norm": ("lm_head",),
    },
    "writers": EXPECTED["llama"]["writers"],
    # fused qkv: q rows 0:64, k rows 64:96, v rows 96:128
    "vo": [(f"model.layers.{i}.self_attn.qkv_proj", f"model.layers.{i}.self_attn.o_proj",
            tuple(HeadMap(h.kv_head, (96 + h.v_rows[0], 96 + h.v_rows[1]), h.q_heads, h.o_cols) for h in GQA)) for i in range(L)],
    # fused gate_up: gate rows 0:128, up rows 128:256
    "mlp": [(f"model.layers.{i}.mlp.gate_up_proj", (128, 256), f"model.layers.{i}.mlp.gate_up_proj", f"model.layers.{i}.mlp.down_proj") for i in range(L)],
    "sources": [("model.embed_tokens", "token")],
}
_D = "model.decoder.layers"
EXPECTED["opt"] = {
    "groups": {
        **{f"{_D}.{i}.self_attn_layer_norm": (f"{_D}.{i}.self_attn.q_proj", f"{_D}.{i}.self_attn.k_proj", f"{_D}.{i}.self_attn.v_proj") for i in range(L)},
        **{f"{_D}.{i}.final_layer_norm": (f"{_D}.{i}.fc1",) for i in range(L)},
        "model.decoder.final_layer_norm": ("lm_head",),
    },
    "writers": {m for i in range(L) for m in (f"{_D}.{i}.self_attn.out_proj", f"{_D}.{i}.fc2")},
    "vo": [(f"{_D}.{i}.self_attn.v_proj", f"{_D}.{i}.self_attn.out_proj", _mha(0)) for i in range(L)],
    "mlp": [(f"{_D}.{i}.fc1", (0, 128), None, f"{_D}.{i}.fc2") for i in range(L)],
    "sources": [("model.decoder.embed_tokens", "token"), ("model.decoder.embed_positions", "position")],
}
EXPECTED["gpt2"] = {
    "groups": {
        **{f"transformer.h.{i}.ln_1": (f"transformer.h.{i}.attn.c_attn",) for i in range(L)},
        **{f"transformer.h.{i}.ln_2": (f"transformer.h.{i}.mlp.c_fc",) for i in range(L)},
        "transformer.ln_f": ("lm_head",),
    },
    "writers": {m for i in range(L) for m in (f"transformer.h.{i}.attn.c_proj", f"transformer.h.{i}.mlp.c_proj")},
    # fused c_attn [q | k | v], 64 rows each; Conv1D weights are stored [in, out]
    "vo": [(f"transformer.h.{i}.attn.c_attn", f"transformer.h.{i}.attn.c_proj", _mha(128)) for i in range(L)],
    "mlp": [(f"transformer.h.{i}.mlp.c_fc", (0, 256), None, f"transformer.h.{i}.mlp.c_proj") for i in range(L)],
    "sources": [("transformer.wte", "token"), ("transformer.wpe", "position")],
}


@pytest.fixture(params=sorted(EXPECTED))
def found(request):
    return request.param, captured(request.param)[1], EXPECTED[request.param]


def test_norm_groups_exact(found):
    arch, s, want = found
    got = {g.norm.module: tuple(r.module for r in g.readers) for g in s.stream.groups}
    assert got == want["groups"]


def test_residual_writers_and_sources_exact(found):
    arch, s, want = found
    assert {w.module for w in s.stream.writers} == want["writers"]
    assert [(x.module, x.kind) for x in s.stream.sources] == want["sources"]
    assert len(s.stream.adds) == 2 * L + (1 if len(want["sources"]) == 2 else 0)


def test_vo_chains_exact_per_kv_head(found):
    arch, s, want = found
    assert [(c.v.module, c.o.module, c.heads) for c in s.vo_chains] == want["vo"]
    assert all(c.head_dim == 16 for c in s.vo_chains)


def test_mlp_chains_and_online_sites_exact(found):
    arch, s, want = found
    got = [(c.up.module, c.up_rows, c.gate.module if c.gate else None, c.down.module) for c in s.mlp_chains]
    assert got == want["mlp"]
    assert [o.linear.module for o in s.online_sites] == [c.down.module for c in s.mlp_chains]


def test_nothing_blocked_on_supported_architectures(found):
    assert found[1].blocked == ()


@pytest.mark.parametrize("arch,kind,offset,bias", [
    ("llama", "rms", 0.0, False), ("gemma", "rms", 1.0, False), ("opt", "layer", 0.0, True), ("gpt2", "layer", 0.0, True),
])
def test_norm_semantics_read_from_ops(arch, kind, offset, bias):
    s = captured(arch)[1]
    norms = [g.norm for g in s.stream.groups]
    assert {(n.kind, n.offset, n.bias is not None) for n in norms} == {(kind, offset, bias)}
    assert all(n.weight is not None and n.weight.module == n.module and n.width == 64 for n in norms)


def test_eps_is_read_from_the_graph():
    assert {g.norm.eps for g in captured("phi3")[1].stream.groups} == {1e-5}
    assert {g.norm.eps for g in captured("llama")[1].stream.groups} == {1e-6}


def test_qwen3_head_norms_are_found_but_do_not_read_the_stream():
    s = captured("qwen3")[1]
    head_norms = {n.module for n in s.norms if n.width == 16}
    assert head_norms == {f"model.layers.{i}.self_attn.{k}" for i in range(L) for k in ("q_norm", "k_norm")}
    assert not head_norms & {g.norm.module for g in s.stream.groups}


def test_activation_semantics():
    assert {(c.act, c.commutes) for c in captured("llama")[1].mlp_chains} == {("silu", "diag")}
    assert {(c.act, c.commutes) for c in captured("gemma")[1].mlp_chains} == {("gelu", "diag")}
    assert {(c.act, c.commutes) for c in captured("opt")[1].mlp_chains} == {("relu", "positive-diag")}
    # GPT-2's tanh GELU arrives decomposed; it is recognised as one pointwise region
    assert {(c.act, c.commutes) for c in captured("gpt2")[1].mlp_chains} == {("pointwise(add,mul,pow,tanh)", "none")}


def test_tied_embeddings_are_reported():
    assert captured("gemma")[1].tied == (("lm_head.weight", "model.embed_tokens.weight"),)
    assert captured("llama")[1].tied == ()


def test_report_folds_layers_and_lists_counts():
    text = format_structure(captured("llama")[1])
    assert "1 stream sources, 5 norm->linear groups, 4 residual writers, 2 v->o chains" in text
    assert "model.layers.*.input_layernorm" in text and "q_proj k_proj v_proj  x2" in text
    assert "kv0:v[0:16]->q[0, 1] kv1:v[16:32]->q[2, 3]" in text
    full = format_structure(captured("llama")[1], full=True)
    assert "model.layers.0.input_layernorm" in full and "model.layers.1.input_layernorm" in full and "x2" not in full


def test_str_is_a_one_line_summary_pointing_at_the_tables():
    assert str(captured("llama")[1]) == (
        "Structure: 5 norm->linear groups, 4 residual writers, 2 v->o chains, 2 mlp chains, 2 online sites, "
        "0 blocked (fxquant.viz.format_structure(s) for the tables)")


def test_mixtral_router_and_stacked_experts():
    s = captured("mixtral")[1]
    p = "model.layers.0.mlp"
    group = s.group_of("model.layers.0.post_attention_layernorm")
    assert [(r.module, r.weight.name, r.experts) for r in group.readers] == [(f"{p}.gate", "weight", 0), (f"{p}.experts", "gate_up_proj", 4)]
    experts_down = [w for w in s.stream.writers if w.experts]
    assert [(w.module, w.weight.name, w.in_features, w.out_features) for w in experts_down] == [
        (f"model.layers.{i}.mlp.experts", "down_proj", 128, 64) for i in range(L)]
    # stacked gate_up [E, 2I, H]: gate rows 0:128, up rows 128:256 of every expert
    assert [(c.up.weight.name, c.up_rows, c.down.weight.name) for c in s.mlp_chains] == [("gate_up_proj", (128, 256), "down_proj")] * L
    assert s.blocked == ()


def test_qwen2_moe_shared_expert_and_its_gate():
    s = captured("qwen2_moe")[1]
    p = "model.layers.0.mlp"
    group = s.group_of("model.layers.0.post_attention_layernorm")
    assert [r.module for r in group.readers] == [
        f"{p}.shared_expert.gate_proj", f"{p}.shared_expert.up_proj", f"{p}.gate", f"{p}.experts", f"{p}.shared_expert_gate"]
    assert {w.module for w in s.stream.writers if "mlp" in w.module} == {
        f"model.layers.{i}.mlp.{m}" for i in range(L) for m in ("shared_expert.down_proj", "experts")}
    assert len(s.online_sites) == 2 * L and s.blocked == ()


def _one_layer(arch, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fxquant.analysis import analyse
    from fxquant.capture import capture

    cfg = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    return analyse(capture(AutoModelForCausalLM.from_config(cfg).eval()))


def test_parallel_attention_and_mlp_share_one_norm_and_one_add():
    s = _one_layer("phi")  # x + attn(ln(x)) + mlp(ln(x)): no code for it, only data flow
    p = "model.layers.0"
    assert {g.norm.module: tuple(r.module for r in g.readers) for g in s.stream.groups} == {
        f"{p}.input_layernorm": (f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj", f"{p}.mlp.fc1"),
        "model.final_layernorm": ("lm_head",)}
    assert {w.module for w in s.stream.writers} == {f"{p}.self_attn.dense", f"{p}.mlp.fc2"}
    assert len(s.stream.adds) == 1 and s.blocked == ()


def test_scaling_multipliers_commute_with_the_stream():
    s = _one_layer("granite", residual_multiplier=0.5, embedding_multiplier=2.0)  # x*c on embeddings and writers
    assert {w.module for w in s.stream.writers} == {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"}
    assert len(s.stream.groups) == 3 and len(s.stream.adds) == 2 and s.blocked == ()
