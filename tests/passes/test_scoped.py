"""Refusals scoped to what they block, `strict`, and R1 online where the stream cannot be folded.

An unproven place blocks only the transforms that would edit or rely on it (`Blocked.blocks`): an
MLP activation fxquant does not know leaves down_proj's input alone (R4, equalization) while R1, R2
and weight quantization go on; a norm on a writer's output (sandwich norms) blocks the folded R1, and
`rotate_residual` then rotates each reader's input online instead. `strict = true` refuses as before.
"""
from __future__ import annotations

import pytest
import torch

from conftest import logit_change, planted_outliers
from fxquant import quantize
from fxquant.analysis import analyse
from fxquant.analysis.structure import INPUT, RESIDUAL, scope
from fxquant.api import apply_recipe
from fxquant.capture import capture
from fxquant.errors import UnsupportedPatternError
from fxquant.models import tiny_model
from fxquant.runtime.hooks import online_hooks

REL_TOL = 2e-4


def _ids():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _unknown_act_mlp():
    """A tiny llama whose MLP activation is one fxquant's op table does not know (log-sigmoid)."""
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.LogSigmoid()
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and not online_hooks(model)


def _keeps_function(model, recipe):
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    result = apply_recipe(model, recipe)
    with torch.no_grad():
        err = (model(ids).logits - ref).abs().max().item()
    assert err <= REL_TOL * ref.abs().max().item()
    return result


def test_an_unknown_activation_blocks_only_the_input_of_its_down_proj():
    s = analyse(capture(_unknown_act_mlp()))
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert sorted(b.module for b in s.blocked) == downs
    assert all(b.blocks == {scope(INPUT, b.module)} for b in s.blocked)
    assert s.blocking([RESIDUAL]) == () and s.blocking([scope(INPUT, downs[0])]) == s.blocked[:1]


def test_r1_r2_and_weight_quantization_go_on_and_r4_reports_what_it_left():
    model = _unknown_act_mlp()
    result = _keeps_function(model, "quarot-float")
    assert sum(c.kind == "rotated" for c in result.results["rotate_residual"].changes) > 0  # R1 folded
    assert sum(c.kind == "rotated" for c in result.results["rotate_vo"].changes) == 2
    r4 = result.results["insert_online_hadamard"]
    assert r4.changes == () and sorted(b.module for b in r4.blocked) == [f"model.layers.{i}.mlp.down_proj"
                                                                           for i in range(2)]
    assert "neither a reader of the residual stream" in r4.blocked[0].reason
    quantize(model, {"preset": "w4a16", "group_size": 32})  # weight quantization never needed that input space


@pytest.mark.parametrize("step", ["fold_norms", "rotate_residual", "rotate_vo"])
def test_strict_refuses_on_any_unproven_place_and_changes_nothing(step):
    model = _unknown_act_mlp()
    state = _state(model)
    recipe = {"passes": [{"pass": "fold_norms"}, {"pass": "rotate_residual"}, {"pass": "rotate_vo"}]}
    for entry in recipe["passes"]:
        entry["strict"] = entry["pass"] == step
    with pytest.raises(UnsupportedPatternError, match=rf"(?s){step}.*refused, nothing was changed.*"
                                                      r"model\.layers\.0\.mlp\.down_proj.*blocks the input transform"):
        quantize(model, recipe)
    assert _unchanged(model, state)


def test_top_level_strict_reaches_every_pass_that_has_it():
    with pytest.raises(UnsupportedPatternError, match=r"fold_norms refused"):
        quantize(_unknown_act_mlp(), {"preset": "rotate-r1r2", "strict": True})


def test_sandwich_norms_block_the_folded_r1_naming_the_norm_and_what_still_works():
    model = tiny_model("olmo2")
    state = _state(model)
    with pytest.raises(UnsupportedPatternError, match=r"(?s)rotate_residual \(R1\) refused, nothing was changed.*"
                                                      r"model\.layers\.0\.post_attention_layernorm.*post-norm block.*"
                                                      r"blocks the residual rotation.*still works.*mode = 'online'"):
        quantize(model, {"preset": "rotate-r1r2", "mode": "fold"})
    assert _unchanged(model, state)


def test_auto_goes_online_on_sandwich_norms_and_says_why():
    model = tiny_model("olmo2")
    result = _keeps_function(model, "rotate-r1r2")
    r1 = result.results["rotate_residual"]
    readers = [f"model.layers.{i}.{m}" for i in range(2) for m in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
    assert sorted(online_hooks(model)) == sorted(readers + ["lm_head"])
    assert all(c.kind == "inserted" and "online: norm 'model.layers." in c.detail and "post-norm" in c.detail
               for c in r1.changes)
    assert r1.blocked == ()


def test_online_mode_on_a_pre_norm_model_leaves_the_stream_and_rotates_each_reader():
    model = tiny_model("llama")
    before = model.model.embed_tokens.weight.detach().clone()
    result = _keeps_function(model, {"preset": "rotate-r1r2", "mode": "online"})
    assert torch.equal(model.model.embed_tokens.weight, before)  # the stream is not rotated
    assert len(online_hooks(model)) == 2 * 5 + 1  # q, k, v, gate, up per layer and lm_head
    assert all("online, as the recipe asks" in c.detail for c in result.results["rotate_residual"].changes)


def test_online_r1_spreads_stream_outliers_for_4bit_activations():
    """Non-vacuity: on a sandwich-norm model with outlier channels in the stream, R1 online makes 4-bit
    activations more accurate than no R1 at all."""
    planted = {"passes": [{"pass": "fold_norms"}, {"pass": "quantize_activations", "bits": 4}]}
    online = {"passes": [{"pass": "fold_norms"}, {"pass": "rotate_residual"},
                         {"pass": "quantize_activations", "bits": 4}]}
    ids = _ids()

    def outliers():
        model = tiny_model("olmo2")
        with torch.no_grad():
            model.model.embed_tokens.weight[:, :3] *= 30.0
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight[:3] *= 30.0
        return model

    assert logit_change(outliers(), ids, online) < 0.75 * logit_change(outliers(), ids, planted)  # 0.53x measured


def test_a_learned_r1_cannot_go_online_and_is_refused_before_any_change():
    model = tiny_model("olmo2")
    state = _state(model)
    recipe = {"passes": [{"pass": "fold_norms"}, {"pass": "learn_rotations", "steps": 1},
                         {"pass": "rotate_residual", "rotation": "learned"}, {"pass": "quantize_activations"}]}
    with pytest.raises(UnsupportedPatternError, match=r"learned R1 is folded into the stream, but this model "
                                                      r"needs R1 online.*post_attention_layernorm"):
        quantize(model, recipe, calibration=_ids())
    assert _unchanged(model, state)


def test_rotated_input_bits_stay_with_r4_sites_when_r1_is_online():
    model = tiny_model("olmo2")
    quantize(model, {"passes": [{"pass": "fold_norms"}, {"pass": "rotate_residual"}, {"pass": "insert_online_hadamard"},
                                {"pass": "quantize_activations", "bits": 4, "rotated_input_bits": 8}]})
    from fxquant.runtime.hooks import activation_hooks

    eight = {p for p, h in activation_hooks(model).items() if h.bits == 8}
    assert eight == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}  # not the readers R1 rotates online
    assert len(online_hooks(model)) == 2 * 5 + 1 + 2


def test_an_online_site_without_a_hadamard_size_is_left_and_strict_refuses_it_before_any_pass():
    from fxquant.errors import NoHadamardError

    model = tiny_model("llama", intermediate_size=90)  # 4 does not divide 90: no Hadamard matrix of that order
    result = _keeps_function(model, "rotate-r1r2r4")
    r4 = result.results["insert_online_hadamard"]
    assert r4.changes == () and len(r4.blocked) == 2 and "No Hadamard matrix of size 90" in r4.blocked[0].reason
    model = tiny_model("llama", intermediate_size=90)
    state = _state(model)
    with pytest.raises(NoHadamardError, match="size 90"):
        quantize(model, {"preset": "rotate-r1r2r4", "strict": True})
    assert _unchanged(model, state)
