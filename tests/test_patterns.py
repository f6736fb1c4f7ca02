"""Patterns read from ops and data flow, each on a model that writes it: in-place residual adds,
`x @ W.T` linears, an embedding's own norm, a LayerNorm written out, eager attention, a fused qkv read
by `select`. Each test checks what analysis found (so a misread fails here) and that the float
transforms keep the model's outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxquant.analysis import analyse
from fxquant.api import apply_recipe
from fxquant.capture import capture
from fxquant.models import _COMMON

REL_TOL = 2e-4


def _hf(arch, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model


def _ids(vocab=128):
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out


def _keeps_function(model, recipe, ids):
    ref = _logits(model, ids)
    result = apply_recipe(model, recipe, calibration=ids)
    err = (_logits(model, ids) - ref).abs().max().item()
    assert err <= REL_TOL * ref.abs().max().item(), f"max |diff| {err:.3g}"
    return result


class _Block(nn.Module):
    """A residual block written by hand: x @ W.T linears on raw parameters, the residual added in place."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.w_up = nn.Parameter(torch.randn(2 * d, d) / 8)  # [out, in], read as x @ W.T
        self.w_down = nn.Parameter(torch.randn(2 * d, d) / 8)  # [in, out], read as x @ W

    def forward(self, h):
        return h.add_(torch.relu(self.norm(h) @ self.w_up.T) @ self.w_down)


class _HandWritten(nn.Module):
    """Embedding -> its own LayerNorm -> blocks -> norm -> head: a plain PyTorch causal LM."""

    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.emb, self.emb_norm = nn.Embedding(vocab, d), nn.LayerNorm(d)
        self.blocks = nn.ModuleList([_Block(d) for _ in range(2)])
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            norms = (self.emb_norm.weight, self.emb_norm.bias, self.norm.weight, *(b.norm.weight for b in self.blocks))
            for p in norms:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() and p is not self.emb_norm.bias else 0.0))

    def forward(self, input_ids):
        h = self.emb_norm(self.emb(input_ids))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def test_in_place_adds_and_written_out_linears_are_the_stream_and_its_readers():
    torch.manual_seed(0)
    model = _HandWritten().eval()
    s = analyse(capture(model, (_ids(64),)))
    assert s.blocked == ()
    assert len(s.stream.adds) == 2 and [w.module for w in s.stream.writers] == ["blocks.0", "blocks.1"]
    ups = [r for g in s.stream.groups for r in g.readers if r.module.startswith("blocks")]
    assert [(r.weight.name, r.in_features, r.out_features, r.transposed) for r in ups] == [("w_up", 32, 64, False)] * 2
    assert [(w.weight.name, w.in_features, w.transposed) for w in s.stream.writers] == [("w_down", 64, True)] * 2
    assert [(c.up.weight.name, c.down.weight.name) for c in s.mlp_chains] == [("w_up", "w_down")] * 2


def test_an_embedding_s_own_norm_folds_into_its_table_and_r1_follows():
    torch.manual_seed(0)
    model = _HandWritten().eval()
    source = analyse(capture(model, (_ids(64),))).stream.sources[0]
    assert source.norm is not None and source.norm.module == "emb_norm" and source.norm.kind == "layer"
    result = _keeps_function(model, {"passes": [{"pass": "fold_norms"}, {"pass": "rotate_residual"}]}, _ids(64))
    assert isinstance(model.emb_norm, nn.Identity)
    folds, r1 = result.results["fold_norms"].changes, result.results["rotate_residual"].changes
    assert any(c.target == "emb_norm" and "folded into its table" in c.detail for c in folds)
    assert sum(c.kind == "rotated" for c in r1) == 1 + 2 + 2 + 1  # the table, 2 writers, 2 readers, the head


def test_r1_refuses_an_embedding_norm_left_in_place():
    from fxquant.errors import UnsupportedPatternError
    from fxquant.rotations import refuse_unfolded_norms

    torch.manual_seed(0)
    cg = capture(_HandWritten().eval(), (_ids(64),))
    with pytest.raises(UnsupportedPatternError, match=r"embedding 'emb' is followed by its own norm 'emb_norm'.*"
                                                      r"run fold_norms first"):
        refuse_unfolded_norms(cg, analyse(cg), "rotate_residual (R1)")


def test_a_layernorm_written_out_is_read_as_one_and_swapped_for_rms():
    model = _hf("cohere", **_COMMON)  # Cohere: mean, subtract, mean of squares, rsqrt, weight
    s = analyse(capture(model))
    norms = {n.module: n.kind for n in s.norms}
    assert norms["model.layers.0.input_layernorm"] == "layer" and norms["model.norm"] == "layer"
    assert s.blocked == ()
    result = _keeps_function(model, "quarot-float", _ids())
    assert sum(c.kind == "replaced" for c in result.results["layernorms_to_rms"].changes) == 3
    assert isinstance(model.model.layers[0].input_layernorm, nn.RMSNorm)


def test_eager_attention_gives_the_same_v_o_chains_as_sdpa():
    def chains(impl):
        s = analyse(capture(_hf("llama", **_COMMON, attn_implementation=impl)))
        return [(c.v.module, c.o.module, c.heads) for c in s.vo_chains], s.blocked

    eager, sdpa = chains("eager"), chains("sdpa")
    assert eager == sdpa and len(eager[0]) == 2 and eager[1] == ()


def test_soft_capped_eager_attention_rotates_v_o_and_reports_r3_and_the_kv_quantizer_blocked():
    model = _hf("gemma2", **_COMMON, head_dim=16, attn_implementation="eager")  # soft-capped: computed eagerly
    result = _keeps_function(model, "quarot-float", _ids())
    assert sum(c.kind == "rotated" for c in result.results["rotate_vo"].changes) == 2
    r3 = result.results["rotate_qk"]
    assert r3.changes == () and len(r3.blocked) == 2 and "computed by the model's own code" in r3.blocked[0].reason
    kv = apply_recipe(_hf("gemma2", **_COMMON, head_dim=16, attn_implementation="eager"),
                      {"passes": [{"pass": "quantize_kv_cache"}]})
    assert kv.results["quantize_kv_cache"].changes == () and len(kv.results["quantize_kv_cache"].blocked) == 2


def test_bloom_embedding_norm_alibi_and_select_fused_qkv():
    model = _hf("bloom", hidden_size=64, n_layer=2, n_head=4, vocab_size=128)
    s = analyse(capture(model))
    assert s.stream.sources[0].norm.module == "transformer.word_embeddings_layernorm"
    assert [c.v.module for c in s.vo_chains] == [f"transformer.h.{i}.self_attention.query_key_value" for i in range(2)]
    # v rows of each head: BLOOM's fused output is [head, (q, k, v), head_dim]
    assert [h.v_rows for h in s.vo_chains[0].heads] == [(16 * (3 * h + 2), 16 * (3 * h + 3)) for h in range(4)]
    result = _keeps_function(model, "rotate-r1r2", _ids())
    assert sum(c.kind == "rotated" for c in result.results["rotate_vo"].changes) == 2


MLA = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, vocab_size=128, max_position_embeddings=128, q_lora_rank=32, kv_lora_rank=32,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, pad_token_id=0, bos_token_id=1,
           eos_token_id=2)


def test_multi_head_latent_attention_gets_r1_r2_and_leaves_its_latent_inputs_with_the_reason():
    model = _hf("deepseek_v3", **MLA)  # q/kv down-projections, a norm on each latent, up-projections
    s = analyse(capture(model))
    # kv_b_proj's output is [head, (k_nope 16, v 16)]: R2 rotates the v half of each head
    assert [h.v_rows for h in s.vo_chains[0].heads] == [(32 * h + 16, 32 * h + 32) for h in range(4)]
    latent = sorted(b.module for b in s.blocked)
    assert latent == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("kv_b_proj", "q_b_proj")]
    assert all("low-rank latent" in b.reason for b in s.blocked)
    result = _keeps_function(model, "quarot-float", _ids())
    assert sum(c.kind == "rotated" for c in result.results["rotate_vo"].changes) == 2
    assert result.results["rotate_qk"].summary() == "2 inserted, 0 blocked"


def _tiny(arch):
    """A tiny model of `arch`: the common tiny sizes (and MoE sizes) for whichever of them its config has."""
    from transformers import AutoConfig

    sizes = dict(_COMMON, head_dim=16, moe_intermediate_size=32, intermediate_size_mlp=128, num_local_experts=4,
                 num_experts=4, num_experts_per_tok=2, rotary_dim=16)
    default = AutoConfig.for_model(arch)
    return _hf(arch, **{k: v for k, v in sizes.items() if hasattr(default, k) and not isinstance(
        getattr(type(default), k, None), property)})


def test_experts_on_a_repeated_router_scaled_input_are_stacked_linears_bmm_reads():
    model = _tiny("llama4_text")  # x.repeat(E, 1) * router score -> bmm(x, W[E, in, out]) -> bmm -> sum
    s = analyse(capture(model))
    assert s.blocked == ()
    experts = [r for g in s.stream.groups for r in g.readers if r.experts]
    assert [(r.module, r.experts, r.in_features, r.out_features, r.transposed) for r in experts] == [
        (f"model.layers.{i}.feed_forward.experts", 4, 64, 256, True) for i in range(2)]
    assert sum(1 for w in s.stream.writers if w.experts) == 2 and len(s.mlp_chains) == 4  # experts + shared
    result = _keeps_function(model, "quarot-float", _ids())
    assert result.results["fold_norms"].blocked == () and result.results["rotate_residual"].blocked == ()


def test_a_dtype_only_read_of_the_normed_input_is_not_a_reader():
    model = _tiny("granitemoe")  # router probabilities .type_as(hidden_states): only the dtype is read
    assert analyse(capture(model)).blocked == ()
    result = _keeps_function(model, "rotate-r1r2", _ids())
    assert all(c.kind == "rotated" for c in result.results["rotate_residual"].changes)


def test_an_embedding_tied_to_an_output_layer_off_the_stream_is_untied_before_it_is_centred():
    model = _tiny("electra")  # the generator's lm_head shares the word embeddings but reads no stream norm
    assert model.generator_lm_head.weight is model.electra.embeddings.word_embeddings.weight
    result = _keeps_function(model, "rotate-r1r2", _ids())
    assert model.generator_lm_head.weight is not model.electra.embeddings.word_embeddings.weight
    assert any(c.kind == "untied" for c in result.results["fold_norms"].changes)


def test_a_layernorm_weight_read_as_w_plus_1_is_folded_with_its_offset():
    model = _tiny("nemotron")  # LayerNorm1P: layer_norm(x, w + 1, b)
    norm = next(n for n in analyse(capture(model)).norms if n.module == "model.layers.0.input_layernorm")
    assert (norm.kind, norm.offset, norm.weight.name, norm.bias.name) == ("layer", 1.0, "weight", "bias")
    _keeps_function(model, "quarot-float", _ids())


@pytest.mark.parametrize("arch,why", [("falcon", "does not run under another AttentionInterface implementation"),
                                      ("doge", "computes something else than this model's own")])
def test_attention_that_fxquant_s_implementation_would_change_is_left_with_the_reason(arch, why):
    model = _tiny(arch)
    implementation = model.config._attn_implementation
    result = _keeps_function(model, {"passes": [{"pass": "rotate_qk"}]}, _ids())
    r3 = result.results["rotate_qk"]
    assert r3.changes == () and r3.blocked and all(why in b.reason for b in r3.blocked)
    assert model.config._attn_implementation == implementation  # the model's own attention is back


def test_a_per_head_output_gate_between_attention_and_o_proj_keeps_the_v_o_chain():
    model = _tiny("granite_swa")  # attn_output * sigmoid(gate)[..., None]: one scale per (token, head)
    s = analyse(capture(model))
    assert s.blocked == () and len(s.vo_chains) == 2
    result = _keeps_function(model, "rotate-r1r2", _ids())
    assert sum(c.kind == "rotated" for c in result.results["rotate_vo"].changes) == 2
