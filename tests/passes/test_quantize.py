"""Round-to-nearest fake-quant passes: grids, hooks the graph shows, the output layer kept, quality."""
from __future__ import annotations

import torch

from conftest import logit_change

from fxquant import apply_recipe, quantize
from fxquant.capture import capture
from fxquant.models import tiny_model
from fxquant.quant.pack import pack_model
from fxquant.recipes import load_recipe
from fxquant.runtime.hooks import AbsorbedActivationQuant, ActivationFakeQuant, activation_hooks
from fxquant.viz.text import op_counts


def _ids(seed=0):
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_w8a8_puts_weights_on_a_per_channel_grid_and_hooks_every_linear_but_lm_head():
    model = tiny_model("llama")
    head = model.lm_head.weight.detach().clone()
    result = apply_recipe(model, "w8a8")
    assert result.results["quantize_weights"].summary() == "14 quantized, 0 blocked"  # 7 linears x 2 layers
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    steps = w.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(w / steps, (w / steps).round(), atol=1e-3)
    assert torch.equal(model.lm_head.weight, head)
    hooks = activation_hooks(model)
    assert len(hooks) == 14 and "lm_head" not in hooks
    assert set(hooks.values()) == {AbsorbedActivationQuant(8, True)}  # packed: each layer quantizes its input
    assert {m.act for m in model.modules() if getattr(m, "fmt", None) is not None} == {ActivationFakeQuant(8, True)}


def test_a_recapture_shows_the_activation_quant_ops_as_nodes():
    model = tiny_model("llama")
    assert "fxquant.fake_quant.default" not in op_counts(capture(model).gm)
    quantize(model, _unpacked_w8a8())
    assert op_counts(capture(model).gm)["fxquant.fake_quant.default"] == 14
    pack_model(model)  # packed, each layer's op quantizes its input: the quantizer's fields are its arguments
    nodes = [n for n in capture(model).gm.graph.nodes if str(n.target) == "fxquant.quantized_linear.default"]
    assert len(nodes) == 14 and {tuple(n.args[11:]) for n in nodes} == {(8,)}  # export drops default arguments
    assert "fxquant.fake_quant.default" not in op_counts(capture(model).gm)


def _unpacked_w8a8() -> dict:
    recipe = load_recipe("w8a8").to_dict()
    recipe["passes"] = [p for p in recipe["passes"] if p["pass"] != "pack"]
    return recipe


def test_w4a16_groups_and_generate_still_works():
    model = tiny_model("llama")
    quantize(model, {"preset": "w4a16", "group_size": 32})
    w = model.model.layers[1].self_attn.o_proj.weight.detach()
    assert max(g.unique().numel() for g in w.reshape(-1, 32)) <= 16
    out = model.generate(_ids()[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 20)


def test_moe_experts_are_quantized_and_their_inner_inputs_reported_blocked():
    result = apply_recipe(tiny_model("mixtral"), "w8a8")
    blocked = result.results["quantize_activations"].blocked
    # the router (a Linear-like module of its own class) and the stacked experts: named, not dropped
    assert {b.module.rsplit(".", 1)[1] for b in blocked} == {"gate", "experts"}
    assert any(c.target.endswith("experts") for c in result.results["quantize_weights"].changes)


def _outlier_model():
    """A tiny llama whose norms emit two huge channels, the activation outliers real LLMs have."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 40]] *= 20.0
            layer.post_attention_layernorm.weight[[3, 40]] *= 20.0
    return model


def _error(preset):
    return logit_change(_outlier_model(), _ids(), preset)


def test_rotation_makes_int8_and_int4_activations_more_accurate_on_outlier_channels():
    assert _error("rotate-r1r2-w8a8") < _error("w8a8")
    assert _error("rotate-r1r2-w16a4") < _error("w16a4")


def test_the_output_layer_is_found_behind_logit_scaling():
    """granite divides the logits by a scale: lm_head is still the output layer and stays float."""
    model = tiny_model("granite")
    head = model.lm_head.weight.detach().clone()
    result = apply_recipe(model, "w8a8")
    assert torch.equal(model.lm_head.weight, head) and "lm_head" not in activation_hooks(model)
    assert result.results["quantize_weights"].summary() == "14 quantized, 0 blocked"


def test_a_new_activation_config_replaces_the_old_hooks():
    model = tiny_model("llama")
    quantize(model, "w16a4")
    result = apply_recipe(model, {"passes": [{"pass": "quantize_activations", "bits": 8}]})
    assert set(activation_hooks(model).values()) == {ActivationFakeQuant(8, True)}
    assert all(len(m._forward_pre_hooks) <= 1 for m in model.modules())
    assert result.results["quantize_activations"].summary() == "14 act-quant, 0 blocked"


def test_clip_search_lowers_the_weight_error_of_rotated_int4():
    def weight_error(fields):
        model, ref = tiny_model("llama"), None
        quantize(model, {"preset": "rotate-r1r2"})
        ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
        quantize(model, {"preset": "w4a16", "group_size": 32, **fields})  # packed: .weight dequantizes
        return sum(((m.weight - ref[n]) ** 2).sum().item() for n, m in model.named_modules() if hasattr(m, "weight"))

    assert weight_error({"clip_search": True}) < 0.97 * weight_error({})


def test_the_fake_quant_op_passes_opcheck_and_shows_as_one_node():
    from fxquant.runtime.library import fake_quant

    for x in (torch.randn(3, 64), torch.randn(1, 4, 6, 16).transpose(1, 2)):
        torch.library.opcheck(fake_quant._opoverload, (x, 4, True, 0.9))
    model = tiny_model("llama")
    quantize(model, {"preset": "w16a4", "clip_ratio": 0.9})
    assert op_counts(capture(model))["fxquant.fake_quant.default"] == 14
    assert set(activation_hooks(model).values()) == {ActivationFakeQuant(4, True, 0.9)}


def test_fake_quant_passes_gradients_straight_through_the_rounding_and_exactly_through_the_range():
    from fxquant.quant.format import QuantFormat
    from fxquant.quant.numerics import fake_quantize_ste
    from fxquant.runtime.library import fake_quant

    x = torch.randn(5, 32, requires_grad=True)
    torch.library.opcheck(fake_quant._opoverload, (x, 4, False, 1.0))
    weights = torch.randn(5, 32)
    (fake_quant(x, 4, False) * weights).sum().backward()
    leaf = x.detach().requires_grad_()
    (fake_quantize_ste(leaf, QuantFormat(4, False, None, "int")) * weights).sum().backward()
    assert torch.equal(x.grad, leaf.grad)
    ends = torch.zeros_like(x, dtype=torch.bool)  # each row's min and max set the scale and zero
    ends.scatter_(1, x.detach().argmax(1, keepdim=True), True).scatter_(1, x.detach().argmin(1, keepdim=True), True)
    torch.testing.assert_close(x.grad[~ends], weights[~ends], atol=1e-5, rtol=1e-5)  # elsewhere: identity (STE)
    assert not torch.allclose(x.grad[ends], weights[ends], atol=1e-3)


def test_quantize_lm_head_unties_a_tied_output_layer_and_leaves_the_embedding_float(tmp_path):
    import fxquant
    from fxquant.models import tiny_model
    from fxquant.runtime.linear import QuantizedLinear

    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    result = fxquant.apply_recipe(model, {"preset": "w4a16-lm-head", "group_size": 32})
    changes = [c for c in result.results["quantize_lm_head"].changes]
    assert [c.kind for c in changes] == ["untied", "quantized"]
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.fmt.bits == 4
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert not model.config.tie_word_embeddings
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    fxquant.save(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(fxquant.load(tmp_path)(ids).logits, model(ids).logits)


def test_a_recipe_may_quantize_only_the_output_layer_and_pack_it():
    from fxquant.runtime.linear import QuantizedLinear

    model = tiny_model("llama")
    quantize(model, {"passes": [{"pass": "quantize_lm_head", "bits": 4, "symmetric": False, "group_size": 32},
                                {"pass": "pack"}]})
    assert [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)] == ["lm_head"]
