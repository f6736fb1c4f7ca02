"""The W4A4KV4 levers (issue 16, item 4): KV clip ratio, KV groups within a head, attention sinks kept
float, mixed-precision activations (inputs an online Hadamard rotates, the output layer): numerics on
hand-computed tensors, recipe errors, save/load, lowering, the compile backend, and generate with a cache."""
from __future__ import annotations

import copy

import pytest
import torch

import fxquant
from fxquant import apply_recipe, quantize
from fxquant.config import ActQuantConfig, KVQuantConfig
from fxquant.errors import RecipeError
from fxquant.models import tiny_model
from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import CLIP_GRID, clip_errors, fake_quantize
from fxquant.recipes import Recipe, load_recipe
from fxquant.runtime.attention import ATTR, AttentionTransform, quantize_kv
from fxquant.runtime.hooks import ActivationFakeQuant, activation_hooks
from fxquant.runtime.library import fake_quant
from fxquant.runtime.lowered import FastAttentionTransform

LEVERS = {"preset": "quarot-w4a4kv4", "kv_group_size": 8, "sink_tokens": 3,
          "kv_clip_ratio": 0.9, "rotated_input_bits": 8, "output_layer_bits": 8}


@pytest.fixture(scope="module")
def levered():
    """A tiny llama under quarot-w4a4kv4 with every lever set (read-only: copy it to change it)."""
    model = tiny_model("llama").eval()
    return model, apply_recipe(model, LEVERS)


def _ids(n=12, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _transforms(model) -> list:
    return [getattr(m, ATTR) for m in model.modules() if hasattr(m, ATTR)]


# --- numerics ---------------------------------------------------------------------------------------

def test_kv_groups_give_one_scale_per_group_of_a_head_hand_computed():
    x = torch.tensor([0.75, 7.0, 3.0, -28.0]).reshape(1, 1, 1, 4)  # [batch, heads, tokens, head_dim]
    sym4 = AttentionTransform(kv_bits=4, kv_symmetric=True)
    # whole head: s = 28/7 = 4; 0.75/4 -> 0, 7/4 = 1.75 -> 2, 3/4 -> 1, -28/4 = -7
    assert torch.equal(quantize_kv(x, fake_quant, sym4).flatten(), torch.tensor([0.0, 8.0, 4.0, -28.0]))
    # groups of 2: (0.75, 7) with s = 1 -> 1, 7;  (3, -28) with s = 4 -> 1, -7
    grouped = quantize_kv(x, fake_quant, AttentionTransform(kv_bits=4, kv_symmetric=True, kv_group_size=2))
    assert torch.equal(grouped.flatten(), torch.tensor([1.0, 7.0, 4.0, -28.0]))
    y = torch.randn(2, 3, 5, 16)  # = the numerics' groups of the last dim, asymmetric (the KV default) too
    t = AttentionTransform(kv_bits=4, kv_symmetric=False, kv_group_size=4)
    assert torch.equal(quantize_kv(y, fake_quant, t), fake_quantize(y, QuantFormat(4, False, 4, "int")))


def test_kv_clip_ratio_shrinks_each_row_before_rounding():
    x = torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(1))
    clipped = quantize_kv(x, fake_quant, AttentionTransform(kv_bits=4, kv_clip_ratio=0.8))
    assert torch.equal(clipped, fake_quantize(x, QuantFormat(4, False, None, "int"), 0.8))
    assert not torch.equal(clipped, quantize_kv(x, fake_quant, AttentionTransform(kv_bits=4)))


def test_sink_tokens_stay_float_and_the_other_rows_round_as_without_sinks():
    x = torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(2))
    plain = quantize_kv(x, fake_quant, AttentionTransform(kv_bits=4))
    sinks = quantize_kv(x, fake_quant, AttentionTransform(kv_bits=4, kv_sink_tokens=2))
    assert torch.equal(sinks[..., :2, :], x[..., :2, :])
    assert torch.equal(sinks[..., 2:, :], plain[..., 2:, :])
    assert not torch.equal(plain[..., :2, :], x[..., :2, :])
    short = x[..., :2, :]  # no row past the sinks: nothing is quantized
    assert torch.equal(quantize_kv(short, fake_quant, AttentionTransform(kv_bits=4, kv_sink_tokens=5)), short)


@pytest.mark.parametrize("fields", [dict(), dict(kv_group_size=4), dict(kv_sink_tokens=2),
                                    dict(kv_group_size=8, kv_sink_tokens=1, kv_clip_ratio=0.9, kv_symmetric=True)])
@pytest.mark.parametrize("rotate_qk", [False, True])
def test_the_fast_attention_transform_computes_the_reference(fields, rotate_qk):
    q, k, v = torch.randn(3, 1, 4, 7, 16, generator=torch.Generator().manual_seed(3)).unbind(0)
    ref = AttentionTransform(rotate_qk=rotate_qk, kv_bits=4, **fields).apply(q, k, v)
    fast = FastAttentionTransform(rotate_qk=rotate_qk, kv_bits=4, **fields).apply(q, k, v)
    torch.testing.assert_close(fast[2], ref[2], rtol=0, atol=0)  # values: the quantizer alone, bit-identical
    if rotate_qk:  # the Kronecker-GEMM Hadamard can move a rounded key by one step (as the fused op documents)
        assert (fast[1] - ref[1]).abs().gt(1e-5).float().mean() < 0.05
        torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(fast[1], ref[1], rtol=0, atol=0)


def test_the_triton_quantizer_takes_grouped_rows_of_a_transposed_cache():
    th = pytest.importorskip("fxquant.runtime.kernels.triton.hadamard")  # CUDA's kernel (interpreted on CPU)
    x = torch.randn(1, 6, 4, 16, generator=torch.Generator().manual_seed(4)).transpose(1, 2)  # [b, h, t, d] view
    t = AttentionTransform(kv_bits=4, kv_group_size=8, kv_sink_tokens=2)
    assert torch.equal(quantize_kv(x, th.fake_quant, t), quantize_kv(x, fake_quant, t))


# --- configs and recipe errors ----------------------------------------------------------------------

@pytest.mark.parametrize("cls,fields,message", [
    (KVQuantConfig, {"kv_clip_ratio": 1.5}, r"KVQuantConfig.kv_clip_ratio = 1.5 must be in \(0, 1\]"),
    (KVQuantConfig, {"kv_group_size": 0}, r"KVQuantConfig.kv_group_size = 0 must be an integer in \[1, "),
    (KVQuantConfig, {"kv_group_size": 8.0}, r"KVQuantConfig.kv_group_size = 8.0 must be an integer"),
    (KVQuantConfig, {"sink_tokens": -1}, r"KVQuantConfig.sink_tokens = -1 must be an integer in \[0, "),
    (ActQuantConfig, {"rotated_input_bits": 6}, r"ActQuantConfig.rotated_input_bits = 6 is not one of \[4, 8\]"),
    (ActQuantConfig, {"output_layer_bits": 16}, r"ActQuantConfig.output_layer_bits = 16 is not one of \[4, 8\]"),
])
def test_bad_lever_values_are_refused_with_the_allowed_values(cls, fields, message):
    with pytest.raises(RecipeError, match=message):
        cls(**fields)


def test_a_kv_group_size_that_does_not_divide_the_head_is_refused_before_any_change():
    model = tiny_model("llama")  # head_dim 16
    with pytest.raises(RecipeError, match=r"kv_group_size = 6 does not divide the key/value head sizes \[16\].*"
                                          r"nothing was changed.*fit: \[1, 2, 4, 8, 16\]"):
        quantize(model, {"preset": "quarot-w4a4kv4", "kv_group_size": 6})
    assert not _transforms(model) and not activation_hooks(model)


def test_kv_fields_are_not_taken_by_a_clip_ratio_or_group_size_override():
    recipe = load_recipe({"passes": [{"pass": "quantize_weights", "bits": 4}, {"pass": "quantize_activations"},
                                     {"pass": "quantize_kv_cache"}], "group_size": 32, "clip_ratio": 0.9})
    weights, act, kv = (cfg for _, cfg in recipe.steps)
    assert (weights.group_size, weights.clip_ratio, act.clip_ratio) == (32, 0.9, 0.9)
    assert kv == KVQuantConfig()  # the weights and activations took them, the KV cache did not


# --- the passes -------------------------------------------------------------------------------------

def test_the_pass_installs_every_kv_lever_and_says_so(levered):
    model, result = levered
    assert set(_transforms(model)) == {AttentionTransform(True, 4, False, 0.9, 8, 3)}
    changes = result.results["quantize_kv_cache"].changes
    assert len(changes) == 2 and changes[0].detail.endswith("int4 per (token, head, 8 channels), first 3 positions float")


def test_mixed_precision_activations_hook_rotated_inputs_and_the_output_layer_at_their_bits(levered):
    model, result = levered
    hooks = activation_hooks(model)
    down = {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert {p for p, h in hooks.items() if h.bits == 8} == down | {"lm_head"}
    assert len([h for h in hooks.values() if h.bits == 4]) == 12  # 7 linears x 2 layers, down_proj apart
    assert result.results["quantize_activations"].summary() == "15 act-quant, 0 blocked"
    plain = tiny_model("llama")  # rotated_input_bits needs an online Hadamard: without R4 every input takes bits
    quantize(plain, {"passes": [{"pass": "quantize_activations", "bits": 4, "rotated_input_bits": 8}]})
    assert {h.bits for h in activation_hooks(plain).values()} == {4}


def test_the_defaults_are_todays_quantizers_and_each_lever_changes_the_logits():
    ids = _ids()
    model = tiny_model("llama")
    steps = load_recipe("quarot-w4a4kv4").steps
    quantize(model, Recipe("unpacked", steps[:-1]))  # not packed: later recipes may still edit the quantizers
    assert steps[-1][0] == "pack" and set(_transforms(model)) == {AttentionTransform(rotate_qk=True, kv_bits=4)}
    assert set(activation_hooks(model).values()) == {ActivationFakeQuant(4, True, 1.0)}
    assert "lm_head" not in activation_hooks(model)
    ref = _logits(model, ids)
    for key, field, value in (("quantize_kv_cache", "kv_group_size", 8), ("quantize_kv_cache", "sink_tokens", 3),
                              ("quantize_kv_cache", "kv_clip_ratio", 0.9),
                              ("quantize_activations", "rotated_input_bits", 8),
                              ("quantize_activations", "output_layer_bits", 8)):
        apply_recipe(model, {"passes": [{"pass": key, "bits": 4, field: value}]}, verify=False, rollback=False)
        assert not torch.equal(_logits(model, ids), ref), field
        apply_recipe(model, {"passes": [{"pass": key, "bits": 4}]}, verify=False, rollback=False)
        assert torch.equal(_logits(model, ids), ref), field  # the default puts today's quantizer back


def test_finer_kv_groups_and_sinks_lower_the_kv_error():
    ids = _ids(32)
    model = tiny_model("llama")
    quantize(model, "quarot-float")
    ref = _logits(model, ids)

    def error(**fields):
        apply_recipe(model, {"passes": [{"pass": "quantize_kv_cache", "bits": 4, **fields}]}, verify=False,
                     rollback=False)
        return (_logits(model, ids) - ref).pow(2).mean().item()

    whole = error()
    assert error(kv_group_size=4) < whole and error(sink_tokens=4) < whole


def test_act_clip_search_picks_each_layers_ratio_of_least_weighted_error_on_calibration_data():
    calibration = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    model = tiny_model("llama")
    quantize(model, "rotate-r1r2r4")
    down = model.model.layers[1].mlp.down_proj
    inputs = []  # what the search sees: the input after R4, float activations (no quantizer yet)
    handle = down.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().flatten(0, -2)))
    with torch.no_grad():
        model(calibration)
    handle.remove()
    x, w = torch.cat(inputs), down.weight.detach().pow(2).sum(dim=0)
    expected = CLIP_GRID[int(clip_errors(x, QuantFormat(4, True, None, "int"), CLIP_GRID, w).argmin())]
    result = apply_recipe(model, {"passes": [{"pass": "quantize_activations", "bits": 4, "act_clip_search": True}]},
                          calibration=calibration)
    hooks = activation_hooks(model)
    assert hooks["model.layers.1.mlp.down_proj"].clip_ratio == expected
    assert len(hooks) == 14 and len({h.clip_ratio for h in hooks.values()}) > 1  # per layer, not one for all
    assert all(c.detail.startswith("int4 per token, clip ") and c.detail.endswith(" searched")
               for c in result.results["quantize_activations"].changes)
    with pytest.raises(fxquant.CalibrationError, match="needs calibration data"):
        quantize(tiny_model("llama"), {"preset": "w16a4", "act_clip_search": True})
    with pytest.raises(RecipeError, match="give clip_ratio or act_clip_search=true, not both"):
        ActQuantConfig(clip_ratio=0.9, act_clip_search=True)


def test_the_input_aware_target_turns_the_quantized_input_objective_into_gptqs():
    from fxquant.quant.gptq import cross_update, gram, input_aware_target

    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 16, generator=g, dtype=torch.float64)
    xq = fake_quantize(x, QuantFormat(4, True, None, "int"))
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    target = input_aware_target(w, gram(xq), cross_update(None, xq, x), damp=0.0)

    def objective(w_hat):  # ||X W^T - X~ W_hat^T||^2 - ||X~ (W* - W_hat)^T||^2 is the same for every W_hat
        return (x @ w.T - xq @ w_hat.T).pow(2).sum() - (xq @ (target - w_hat).T).pow(2).sum()

    a, b = (torch.randn(8, 16, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(objective(a), objective(b), rtol=1e-4, atol=0)  # Grams are summed in float32
    assert not torch.allclose(target, w, atol=1e-3)  # the quantized inputs move the target
    torch.testing.assert_close(input_aware_target(w, gram(x), cross_update(None, x, x), 0.0), w)  # float: W* = W


def _gptq_recipe(act_aware: bool) -> Recipe:
    steps = dict(load_recipe("quarot-gptq-w4a4kv4").steps)
    order = ["fold_norms", "layernorms_to_rms", "rotate_residual", "rotate_vo", "rotate_qk", "insert_online_hadamard",
             *(["quantize_activations", "gptq"] if act_aware else ["gptq", "quantize_activations"])]
    gptq = steps["gptq"].__class__(**{**vars(steps["gptq"]), "act_aware": act_aware})
    return Recipe("gptq", tuple((key, gptq if key == "gptq" else steps[key]) for key in order))


def test_act_aware_gptq_lowers_the_error_against_the_float_layer_on_quantized_inputs():
    calibration = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(5))
    ref = tiny_model("llama")
    quantize(ref, "quarot-float")  # the same rotations in float: layer 0's float weight W and inputs X
    inputs = []
    handle = ref.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: inputs.append(args[0].detach().flatten(0, -2)))
    with torch.no_grad():
        ref(calibration)
    handle.remove()
    x, w = torch.cat(inputs), ref.model.layers[0].self_attn.q_proj.weight.detach()
    x_hat = fake_quant(x, 4, True, 1.0)  # what the layer reads after quantize_activations
    errors, hooks = {}, {}
    for aware in (False, True):
        model = tiny_model("llama")
        result = apply_recipe(model, _gptq_recipe(aware), calibration=calibration)
        w_hat = model.model.layers[0].self_attn.q_proj.weight.detach()
        errors[aware] = (x @ w.T - x_hat @ w_hat.T).pow(2).sum().item()
        hooks[aware] = activation_hooks(model)
        details = {c.detail for c in result.results["gptq"].changes}
        assert details == {"int4 sym per channel GPTQ" + (" for int4 inputs" if aware else "")}, details
    assert hooks[True] == hooks[False] and len(hooks[True]) == 14  # taken off for the sweep, then put back
    assert errors[True] < errors[False]
    with pytest.raises(RecipeError, match="act_aware needs the activation quantizers on the model"):
        quantize(tiny_model("llama"), {"preset": "gptq-w4a16", "group_size": 32, "act_aware": True}, calibration=calibration)


# --- generate with a KV cache -----------------------------------------------------------------------

def test_sinks_are_sequence_positions_in_every_decode_step_of_a_cached_generate(levered):
    ids = _ids(10)
    model = copy.deepcopy(levered[0])
    with torch.no_grad():  # one decode step on the cache vs the whole sequence without one
        out = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:7], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    full = _logits(model, ids[:, :7], use_cache=False)[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    cached = model.generate(ids[:, :6], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    uncached = model.generate(ids[:, :6], max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    for module in model.modules():  # the new token (position 6) is quantized: as a sink it would be float
        if hasattr(module, ATTR):
            setattr(module, ATTR, AttentionTransform(**{**vars(getattr(module, ATTR)), "kv_sink_tokens": 7}))
    assert not torch.allclose(_logits(model, ids[:, :7], use_cache=False)[:, -1], full, rtol=1e-5, atol=1e-5)


# --- save / load, lowering, the compile backend ----------------------------------------------------

def test_levers_round_trip_through_save_and_load(tmp_path, levered):
    model = levered[0]
    fxquant.save(model, tmp_path / "m")
    loaded = fxquant.load(tmp_path / "m")
    assert set(_transforms(loaded)) == set(_transforms(model)) == {AttentionTransform(True, 4, False, 0.9, 8, 3)}
    assert activation_hooks(loaded) == activation_hooks(model)
    assert torch.equal(_logits(loaded, _ids()), _logits(model, _ids()))


def test_a_lowered_model_with_the_levers_computes_the_reference(levered):
    model = copy.deepcopy(levered[0])
    ids = _ids(9)
    ref = _logits(model, ids)
    fxquant.lower(model, plan="rule")
    assert all(isinstance(t, FastAttentionTransform) and t.kv_group_size == 8 and t.kv_sink_tokens == 3
               for t in _transforms(model))
    assert "lm_head" in activation_hooks(model)
    assert ("2 x attention R3 Hadamard + int4 KV quantizer (groups of 8, clip 0.9, first 3 positions float): "
            in fxquant.lowering_report(model).summary())
    out = _logits(model, ids)  # exact integer products; the Kronecker Hadamard may flip a rounded code
    assert (out - ref).norm() <= 1e-4 * ref.norm()
    generated = model.generate(ids[:, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_asymmetric_activations_lower_onto_the_exact_integer_product():
    steps = tuple((key, ActQuantConfig(bits=4, symmetric=False) if key == "quantize_activations" else cfg)
                  for key, cfg in load_recipe("quarot-w4a4kv4").steps)
    model = tiny_model("llama").eval()
    quantize(model, Recipe("asym", steps))
    ids = _ids(9)
    ref = _logits(model, ids)
    fxquant.lower(model, plan="rule")
    assert "14 x int4 sym per channel linear, int4 activations inside: exact integer product" in (
        fxquant.lowering_report(model).summary())
    out = _logits(model, ids)
    assert (out - ref).norm() <= 1e-4 * ref.norm() and not torch.equal(out, ref)


def test_the_compile_backend_keeps_the_kv_levers():
    recipe = {**LEVERS, "rotated_input_bits": None, "output_layer_bits": None}
    ids = _ids(8)

    def quantized(spec):
        model = tiny_model("llama").eval()
        quantize(model, spec)
        return model

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(quantized(recipe), backend="fxquant", options={"plan": "rule"})(ids, use_cache=False).logits
    finally:
        torch._dynamo.reset()
    ref = _logits(fxquant.lower(quantized(recipe), plan="rule"), ids, use_cache=False)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    plain = _logits(quantized("quarot-w4a4kv4"), ids, use_cache=False)
    assert not torch.allclose(out, plain, rtol=1e-3, atol=1e-3)  # the levers were not dropped on the way
