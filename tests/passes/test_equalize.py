"""Equalization passes: SmoothQuant, AWQ (scales and clip) and cross-layer equalization.

Exactness on every architecture with quantizers off (and scales that are not 1), where each scale
went (norm, v rows, up rows, or an inserted multiply visible after re-capture), the balance each
method promises, AWQ beating round-to-nearest on planted outliers, and refusals.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, planted_outliers
from fxquant import apply_recipe, capture, load, quantize, save
from fxquant.calibrate import block_sweep, decoder_blocks
from fxquant.errors import CalibrationError
from fxquant.models import tiny_model
from fxquant.runtime.hooks import INPUT_SCALE, input_scale_hooks
from fxquant.viz.text import op_counts

REL_TOL = 2e-4
FLOAT_RECIPES = {
    "smooth_quant": {"passes": [{"pass": "smooth_quant", "scope": "all"}]},
    "awq_scale": {"passes": [{"pass": "awq_scale", "group_size": 16, "scope": "all", "grid": 5}]},
    "cross_layer_equalize": {"passes": [{"pass": "cross_layer_equalize"}]},
}


def _ids(seed=0, n=2, length=12):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _calibration(n=4, length=16):
    return [_ids(seed=10 + i, n=1, length=length) for i in range(n)]


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(FLOAT_RECIPES))
def test_equalization_keeps_the_function_with_scales_that_are_not_one(arch, name):
    model, ids = tiny_model(arch), _ids()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    tokens = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    before = _weights(model)
    result = apply_recipe(model, FLOAT_RECIPES[name], calibration=_calibration())
    with torch.no_grad():
        assert (model(ids, use_cache=False).logits - ref).abs().max() <= REL_TOL * ref.abs().max()
    assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0), tokens)
    changes = result.results[name].changes
    assert changes, f"{name} changed nothing on {arch}"
    after = _weights(model)
    moved = [n for n in before if n in after and not torch.allclose(before[n], after[n], rtol=1e-3, atol=1e-6)]
    # every change moved the weights of its readers (non-vacuous: a scale of all ones moves nothing)
    for change in changes:
        reader = change.target.split("+")[0]
        assert any(n.startswith(reader + ".") for n in moved), (change, moved[:8])


def test_on_llama_scales_fold_into_norms_and_v_and_up_rows_with_no_new_op():
    model = tiny_model("llama")
    ops_before = op_counts(capture(model))
    result = apply_recipe(model, {"passes": [{"pass": "smooth_quant"}]}, calibration=_calibration())
    details = {c.target: c.detail for c in result.results["smooth_quant"].changes}
    assert details == {
        **{f"model.layers.{i}.self_attn.q_proj+k_proj+v_proj": f"1/s folded into model.layers.{i}.input_layernorm"
           for i in range(2)},
        **{f"model.layers.{i}.mlp.gate_proj+up_proj": f"1/s folded into model.layers.{i}.post_attention_layernorm"
           for i in range(2)},
        **{f"model.layers.{i}.self_attn.o_proj": f"1/s folded into model.layers.{i}.self_attn.v_proj rows"
           for i in range(2)},
        **{f"model.layers.{i}.mlp.down_proj": f"1/s folded into model.layers.{i}.mlp.up_proj rows" for i in range(2)},
    }
    assert op_counts(capture(model)) == ops_before and input_scale_hooks(model) == []


def test_where_no_weight_can_absorb_the_scale_a_multiply_is_inserted_and_saved(tmp_path):
    model, ids = tiny_model("gpt2"), _ids()
    muls = op_counts(capture(model)).get("aten.mul.Tensor", 0)
    foldable = apply_recipe(model, {"passes": [{"pass": "smooth_quant"}]}, calibration=_calibration())
    gelu = [b for b in foldable.results["smooth_quant"].blocked if "c_proj" in b.module and ".mlp." in b.module]
    assert len(gelu) == 2 and all("scope='all' inserts a multiply" in b.reason for b in gelu)

    model = tiny_model("gpt2")
    result = apply_recipe(model, {"passes": [{"pass": "smooth_quant", "scope": "all"}]}, calibration=_calibration())
    inserted = [c for c in result.results["smooth_quant"].changes if c.kind == "inserted"]
    assert [c.target for c in inserted] == [f"transformer.h.{i}.mlp.c_proj" for i in range(2)]
    assert input_scale_hooks(model) == [f"transformer.h.{i}.mlp.c_proj" for i in range(2)]
    assert op_counts(capture(model))["aten.mul.Tensor"] == muls + 2
    scale = getattr(model.get_submodule("transformer.h.0.mlp.c_proj"), INPUT_SCALE)
    assert not torch.allclose(scale, torch.ones_like(scale))
    save(model, tmp_path / "m")
    again = load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert input_scale_hooks(again) == input_scale_hooks(model)


def _input_abs_max(model, path, ids):
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax((0, 1))))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.stack(seen).amax(0)


def test_smooth_quant_with_alpha_half_balances_activation_and_weight_ranges():
    model, calibration = tiny_model("llama"), _calibration()
    # scope "norms": no later fold into up_proj's rows moves the columns measured here
    quantize(model, {"passes": [{"pass": "smooth_quant", "alpha": 0.5, "scope": "norms"}]}, calibration=calibration)
    ids = torch.cat(calibration)
    x_max = _input_abs_max(model, "model.layers.1.mlp.gate_proj", ids)
    w_max = torch.stack([model.get_submodule(f"model.layers.1.mlp.{p}").weight.abs().amax(0)
                         for p in ("gate_proj", "up_proj")]).amax(0)
    torch.testing.assert_close(x_max, w_max, rtol=1e-4, atol=1e-6)  # s = sqrt(max|x| / max|W|) evens them


def test_cross_layer_equalization_evens_the_ranges_of_each_pair():
    model = tiny_model("opt")
    result = apply_recipe(model, {"passes": [{"pass": "cross_layer_equalize"}]})
    assert {c.target for c in result.results["cross_layer_equalize"].changes} >= {"model.decoder.layers.0.fc2"}
    fc1, fc2 = (model.get_submodule(f"model.decoder.layers.0.{n}") for n in ("fc1", "fc2"))
    torch.testing.assert_close(fc1.weight.abs().amax(1), fc2.weight.abs().amax(0), rtol=1e-5, atol=1e-6)


def test_relu_pairs_get_positive_scales_only():
    from fxquant.analysis import analyse
    from fxquant.analysis.equalize import scale_groups

    cg = capture(tiny_model("opt"))
    relu = [g for g in scale_groups(cg, analyse(cg)) if g.kind == "mlp"]
    assert relu and all(g.positive and g.fold == "rows" for g in relu)


def test_gqa_value_rows_scale_every_query_head_that_reads_them():
    from fxquant.analysis import analyse
    from fxquant.analysis.equalize import scale_groups

    cg = capture(tiny_model("llama"))  # 4 query heads over 2 KV heads of 16
    vo = next(g for g in scale_groups(cg, analyse(cg)) if g.kind == "vo")
    assert vo.width == 32 and len(vo.columns) == 64
    assert vo.columns[:16] == vo.columns[16:32] == tuple(range(16))
    assert vo.columns[32:48] == vo.columns[48:] == tuple(range(16, 32))


def test_block_sweep_reproduces_the_model_block_by_block():
    model = tiny_model("qwen2")
    blocks = decoder_blocks(model, ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"])
    assert blocks == ["model.layers.0", "model.layers.1"]
    seen = []
    handle = model.get_submodule("model.layers.1").register_forward_hook(lambda m, a, o: seen.append(o))
    batches = [{"input_ids": ids} for ids in _calibration(2)]
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    handle.remove()
    last = None
    for block in block_sweep(model, batches, blocks):
        last = block
    outputs = [last.module(*c.args, **c.kwargs) for c in last.calls]
    for got, want in zip(outputs, seen):
        torch.testing.assert_close(got, want)


def _layer_error(model, reference, ids):
    with torch.no_grad():
        return float(((model(ids, use_cache=False).logits - reference) ** 2).mean())


def test_awq_beats_round_to_nearest_on_planted_outlier_channels():
    ids, calibration = _ids(seed=99, n=4, length=16), _calibration(8)
    reference_model = planted_outliers(tiny_model("llama"))
    with torch.no_grad():
        reference = reference_model(ids, use_cache=False).logits
    w4 = {"bits": 4, "symmetric": False, "group_size": 16}
    rtn = quantize(planted_outliers(tiny_model("llama")), {"passes": [{"pass": "quantize_weights", **w4}]})
    awq = quantize(planted_outliers(tiny_model("llama")),
                   {"passes": [{"pass": "awq_scale", **w4}, {"pass": "quantize_weights", **w4}]},
                   calibration=calibration)
    assert _layer_error(awq, reference, ids) < 0.7 * _layer_error(rtn, reference, ids)
    # and at the output of the first decoder layer, where the quantized linears' error first lands
    first = [_block_output(m, ids) for m in (reference_model, rtn, awq)]
    assert float(((first[2] - first[0]) ** 2).mean()) < 0.7 * float(((first[1] - first[0]) ** 2).mean())


def _block_output(model, ids):
    seen = []
    handle = model.get_submodule("model.layers.0").register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("bits,zero_point", [(3, "int"), (4, "float")])
def test_awq_clip_shrinks_ranges_and_lowers_the_quantized_output_error(bits, zero_point):
    ids, calibration = _ids(seed=98, n=4, length=16), _calibration(8)
    reference_model = tiny_model("llama")
    with torch.no_grad():
        reference = reference_model(ids, use_cache=False).logits
    w3 = {"bits": bits, "symmetric": False, "group_size": 16, "zero_point": zero_point}
    plain = quantize(tiny_model("llama"), {"passes": [{"pass": "quantize_weights", **w3}]})
    model = tiny_model("llama")
    result = apply_recipe(model, {"passes": [{"pass": "awq_clip", **w3}, {"pass": "quantize_weights", **w3}]},
                          calibration=calibration)
    clipped = {c.target.rsplit(".", 1)[-1] for c in result.results["awq_clip"].changes}
    assert clipped == {"v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # never q and k
    assert _layer_error(model, reference, ids) < _layer_error(plain, reference, ids)


def test_calibrated_passes_refuse_without_data_before_touching_the_model():
    model = tiny_model("llama")
    before = _weights(model)
    for preset in ("awq-w4a16", "smoothquant-w8a8"):
        with pytest.raises(CalibrationError, match="needs calibration data"):
            quantize(model, preset)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_equalization_composes_with_rotations():
    model, ids = tiny_model("llama"), _ids()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    recipe = {"preset": "quarot-awq-w4a16", "group_size": 16, "grid": 4}
    result = apply_recipe(model, recipe, calibration=_calibration())
    assert list(result.results)[:6] == ["fold_norms", "layernorms_to_rms", "rotate_residual", "rotate_vo",
                                        "awq_scale", "awq_clip"]
    assert len(result.results["awq_scale"].changes) == 8
    with torch.no_grad():
        err = (model(ids, use_cache=False).logits - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.5  # quantized, and still the same model

    float_only = tiny_model("llama")
    quantize(float_only, {"passes": [{"pass": p} for p in ("fold_norms", "rotate_residual", "rotate_vo")]
                          + [{"pass": "awq_scale", "group_size": 16, "grid": 4}]}, calibration=_calibration())
    with torch.no_grad():
        assert (float_only(ids, use_cache=False).logits - ref).abs().max() <= REL_TOL * ref.abs().max()


@pytest.mark.parametrize("preset", ["awq-w4a16", "smoothquant-w8a8", "quarot-awq-w4a16"])
def test_presets_take_overrides(preset):
    from fxquant.recipes import load_recipe

    recipe = load_recipe({"preset": preset, "group_size": 64})
    groups = {type(cfg).__name__: cfg.group_size for _, cfg in recipe.steps if hasattr(cfg, "group_size")}
    assert set(groups.values()) <= {64, None}
    if preset != "smoothquant-w8a8":
        assert groups == {"AWQConfig": 64, "WeightQuantConfig": 64}


def test_the_sweep_puts_back_a_forward_that_was_already_wrapped():
    model = tiny_model("llama")
    layer = model.get_submodule("model.layers.0")
    calls = []

    def wrapped(*args, **kwargs):  # what accelerate's offload hooks install
        calls.append(1)
        return type(layer).forward(layer, *args, **kwargs)

    layer.forward = wrapped
    for _ in block_sweep(model, [{"input_ids": _ids(n=1)}], decoder_blocks(model, ["model.layers.0.mlp.up_proj"])):
        pass
    assert layer.forward is wrapped and "forward" not in model.get_submodule("model.layers.1").__dict__
    with torch.no_grad():
        model(_ids(n=1))
    assert calls


def test_scope_norms_leaves_the_linear_folds_and_says_why():
    model = tiny_model("llama")
    result = apply_recipe(model, {"passes": [{"pass": "smooth_quant", "scope": "norms"}]}, calibration=_calibration())
    res = result.results["smooth_quant"]
    assert len(res.changes) == 4 and all("layernorm" in c.detail for c in res.changes)
    reasons = {b.module: b.reason for b in res.blocked}
    assert reasons["model.layers.0.self_attn.o_proj"] == ("its input is not made by a norm (scope='norms'); "
                                                          "scope='foldable' folds it into model.layers.0.self_attn.v_proj rows")
