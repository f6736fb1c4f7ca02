"""Recipes and the public API: presets, dict overrides, files, errors that list what is allowed,
calibration checks, and an error that leaves the model exactly as it was."""
from __future__ import annotations

import pytest
import torch

from fxquant import quantize
from fxquant.api import calibration_batches
from fxquant.config import ResidualRotationConfig, RotationConfig, WeightQuantConfig
from fxquant.errors import CalibrationError, CaptureError, PassError, RecipeError, UnsupportedPatternError
from fxquant.models import tiny_model
from fxquant.recipes import load_recipe


def test_preset_steps_and_configs():  # the set of preset names: tests/test_presets.py
    assert [k for k, _ in load_recipe("rotate-r1r2r4-w16a4").steps][-2:] == ["insert_online_hadamard",
                                                                             "quantize_activations"]
    r = load_recipe("rotate-r1r2")
    assert [k for k, _ in r.steps] == ["fold_norms", "layernorms_to_rms", "rotate_residual", "rotate_vo"]
    assert r.steps[2][1] == ResidualRotationConfig("random-hadamard", 0, mode="auto")


def test_dict_overrides_every_pass_that_has_the_field():
    r = load_recipe({"preset": "rotate-r1r2-w4a16", "rotation": "random-orthogonal", "seed": 3, "group_size": 64})
    cfgs = dict(r.steps)
    assert cfgs["rotate_residual"] == ResidualRotationConfig("random-orthogonal", 3)
    assert cfgs["rotate_vo"] == RotationConfig("random-orthogonal", 3)
    assert cfgs["quantize_weights"] == WeightQuantConfig(bits=4, symmetric=False, group_size=64)


def test_toml_and_yaml_files_and_the_dict_round_trip(tmp_path):
    (tmp_path / "mine.toml").write_text(
        'rotation = "hadamard"\n[[passes]]\npass = "fold_norms"\n[[passes]]\npass = "rotate_residual"\nseed = 7\n')
    r = load_recipe(tmp_path / "mine.toml")
    assert r.name == "mine" and r.steps[1][1] == ResidualRotationConfig("hadamard", 7)
    (tmp_path / "w.yaml").write_text("preset: w4a16\ngroup_size: 32\n")
    assert dict(load_recipe(str(tmp_path / "w.yaml")).steps)["quantize_weights"].group_size == 32
    again = load_recipe(load_recipe("rotate-r1r2-w8a8").to_dict())
    assert again == load_recipe("rotate-r1r2-w8a8")


@pytest.mark.parametrize("spec,match", [
    ("rotate-everything", r"unknown preset 'rotate-everything'; presets are \[.*'rotate-r1r2'"),
    ({"passes": [{"pass": "spin"}]}, r"unknown pass 'spin'; passes are \[.*'fold_norms'"),
    ({"preset": "rotate-r1r2", "group_size": 64}, r"unknown field 'group_size' .* take \[.*'rotation'"),
    ({"preset": "rotate-r1r2", "rotation": "haar"}, r"rotation = 'haar' is not one of \['hadamard'"),
    ({"passes": [{"pass": "rotate_vo", "sead": 1}]}, r"unknown field 'sead'; allowed fields are \['rotation'"),
    ({"preset": "w4a16", "bits": 5}, r"bits = 5 is not one of \[2, 3, 4, 8\]"),
    ({"preset": "w8a8", "passes": []}, "either 'preset' or 'passes'"),
    (3.5, "a recipe is a preset name"),
])
def test_bad_recipes_list_what_is_allowed(spec, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(spec)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[n], state[n]) for n in state)


def test_group_size_that_does_not_fit_fails_before_any_change():
    model = tiny_model("llama")
    state = _state(model)
    with pytest.raises(RecipeError, match=r"group_size=128 does not divide in_features=64 of layer "
                                          r"'model.layers.0.self_attn.q_proj'.*fit every layer.*\[32, 64\]"):
        quantize(model, "rotate-r1r2-w4a16")
    assert _same(model, state)


def test_a_failure_mid_recipe_restores_weights_modules_ties_and_config(monkeypatch):
    import importlib

    r1 = importlib.import_module("fxquant.passes.rotate_residual")  # the module, not the function it exports

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure inside R1")

    monkeypatch.setattr(r1, "rotation_operator", broken)
    model = tiny_model("opt")  # fold_norms unties lm_head and centres; layernorms_to_rms swaps modules
    state, modules = _state(model), dict(model.named_modules())
    tied = model.lm_head.weight is model.model.decoder.embed_tokens.weight
    with pytest.raises(PassError, match=r"pass 'rotate_residual' failed after \[fold_norms, layernorms_to_rms\]"):
        quantize(model, "rotate-r1r2")
    assert _same(model, state) and dict(model.named_modules()) == modules
    assert tied and model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert model.config.tie_word_embeddings is True


def test_blocked_stream_is_refused_naming_the_module_before_any_weight_moves():
    model = tiny_model("opt", do_layer_norm_before=False)  # post-norm: a norm on the writers' outputs
    state = _state(model)
    with pytest.raises(UnsupportedPatternError, match=r"(?s)model.decoder.layers.0.self_attn_layer_norm.*"
                                                      r"blocks .*the residual rotation.*mode = 'online'"):
        quantize(model, {"preset": "rotate-r1r2", "mode": "fold"})
    assert _same(model, state)


def test_calibration_forms_become_single_sequences_then_batches_of_batch_size():
    from fxquant.calibration import Calibration

    ids = torch.randint(0, 10, (3, 8))
    assert [b["input_ids"].shape for b in calibration_batches(ids)] == [(1, 8)] * 3
    assert [b["input_ids"].shape for b in calibration_batches([ids[0], ids])] == [(1, 8)] * 4
    assert [b["input_ids"].shape for b in calibration_batches(Calibration([ids[0], ids], batch_size=3))] == [(3, 8), (1, 8)]
    masked = calibration_batches({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert [b.keys() for b in masked] == [{"input_ids", "attention_mask"}] * 3
    assert calibration_batches(None) == []


@pytest.mark.parametrize("bad,match", [
    (torch.randn(2, 8), r"calibration\[0\]: token ids must be a non-empty integer tensor"),
    ([{"ids": 1}], r"calibration\[0\] is a dict without an 'input_ids' tensor"),
    (["text"], r"calibration\[0\] is text: give fxquant.Calibration\(text, tokenizer=...\)"),
    ({"input_ids": torch.ones(1, 2)}, r"calibration\[0\]: token ids must be a non-empty integer tensor"),
    ([[torch.ones(1, 2, dtype=torch.long)]], r"calibration\[0\] is a nested list"),
    (3, r"calibration\[0\] is a int: calibration takes a LongTensor"),
])
def test_bad_calibration_is_refused(bad, match):
    with pytest.raises(CalibrationError, match=match):
        calibration_batches(bad)


def test_the_readme_recipe_file_loads(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```toml\n# my_recipe.toml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_recipe.toml").write_text(block)
    r = load_recipe(tmp_path / "my_recipe.toml")
    assert [k for k, _ in r.steps] == ["fold_norms", "layernorms_to_rms", "rotate_residual", "quantize_weights"]
    assert r.steps[2][1].rotation == "hadamard" and r.steps[3][1] == WeightQuantConfig(4, False, 64)


def test_cli_quantize_prints_each_pass_and_rejects_bad_fields(capsys):
    from fxquant.cli import main

    assert main(["quantize", "--model", "tiny-llama", "--recipe", "rotate-r1r2-w4a16", "--set", "group_size=32"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "16 rotated" in rows["rotate_residual"] and "14 quantized" in rows["quantize_weights"]
    assert "int4 asym float-zero group 32" in rows["quantize_weights"]
    assert main(["quantize", "--model", "tiny-llama", "--set", "grup=3"]) == 2
    assert "unknown field 'grup'" in capsys.readouterr().err


class _PlainDecoder(torch.nn.Module):
    """A plain PyTorch pre-norm decoder (no transformers): emb -> x + mlp(norm(x)) -> norm -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32)
        self.norm1, self.norm2 = torch.nn.RMSNorm(16), torch.nn.RMSNorm(16)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        with torch.no_grad():
            self.norm1.weight.uniform_(0.5, 1.5)
            self.norm2.weight.uniform_(0.5, 1.5)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        x = x + self.down(torch.relu(self.up(self.norm1(x))))
        return self.head(self.norm2(x))


def test_a_plain_pytorch_model_is_captured_from_its_calibration_data():
    model, ids = _PlainDecoder().eval(), torch.randint(0, 32, (4, 10))
    with torch.no_grad():
        ref = model(ids)
    w = model.up.weight.detach().clone()
    assert quantize(model, "rotate-r1r2", calibration=ids) is model
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=2e-4 * ref.abs().max().item())
    assert not torch.equal(model.up.weight, w)
    with pytest.raises(CaptureError, match=r"capture\(_PlainDecoder\) needs example_inputs"):
        quantize(_PlainDecoder(), "rotate-r1r2")


def test_rotation_sizes_are_checked_before_any_pass_runs():
    model = tiny_model("llama")
    state = _state(model)
    with pytest.raises(RecipeError, match=r"pass 'rotate_residual' \(checked before any pass ran\): "
                                          r"block_size=48 must be a positive divisor of the size 64"):
        quantize(model, {"preset": "rotate-r1r2", "rotation": "hadamard", "block_size": 48})
    assert _same(model, state)


def test_folding_after_weight_quantization_is_refused_by_the_fact_order():
    bad = {"passes": [{"pass": "quantize_weights"}, {"pass": "fold_norms"}]}
    with pytest.raises(RecipeError, match="step 'fold_norms' requires fact 'weights_float'.*'quantize_weights' then "
                                          "invalidated it"):
        quantize(tiny_model("llama"), bad)


def test_bfloat16_models_rotate_within_their_own_rounding():
    model, ids = tiny_model("llama", dtype=torch.bfloat16), torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits.float()
    quantize(model, "rotate-r1r2")
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert (model(ids).logits.float() - ref).abs().max() <= 4 * 2 ** -7 * ref.abs().max()


@pytest.mark.parametrize("fields,match", [({"bits": 8.0}, r"bits = 8.0 is not one of"),
                                          ({"symmetric": 1}, r"symmetric = 1 is not one of"),
                                          ({"clip_ratio": True}, r"clip_ratio = True must be in")])
def test_config_values_must_have_the_exact_type(fields, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe({"passes": [{"pass": "quantize_weights", **fields}]})


def test_rollback_removes_the_attention_transform_a_pass_attached(monkeypatch):
    import importlib

    from fxquant.runtime.attention import ATTR

    online = importlib.import_module("fxquant.passes.online_rotations")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure inside R4")

    monkeypatch.setattr(online, "install_online_hadamard", broken)
    model = tiny_model("llama")
    implementation = model.config._attn_implementation
    with pytest.raises(PassError, match=r"pass 'insert_online_hadamard' failed after .*rotate_qk\]: "
                                        r"RuntimeError: simulated failure inside R4"):
        quantize(model, "quarot-float")
    assert not any(hasattr(m, ATTR) for m in model.modules())
    assert model.config._attn_implementation == implementation


def test_register_pass_refuses_what_a_recipe_could_not_run():
    from fxquant.passes import PASSES
    from fxquant.pipeline import PassResult, fxpass
    from fxquant.recipes import register_pass

    def plain(cg, structure, cfg):
        return PassResult()

    with pytest.raises(RecipeError, match="is not an @fxpass function"):
        register_pass("plain_pass", plain)
    with pytest.raises(RecipeError, match="'fold_norms' is already the pass 'fold_norms'"):
        register_pass("fold_norms", fxpass()(plain))
    with pytest.raises(RecipeError, match="config must be a frozen dataclass"):
        register_pass("plain_pass", fxpass()(plain), config=dict)
    assert "plain_pass" not in PASSES


def test_registered_pass_with_its_own_config_round_trips_through_a_recipe_dict():
    import dataclasses

    from fxquant.passes import PASSES
    from fxquant.pipeline import PassResult, fxpass
    from fxquant.recipes import register_pass

    @dataclasses.dataclass(frozen=True)
    class NudgeConfig:
        amount: float = 0.5

    @fxpass()
    def nudge(cg, structure, cfg):
        return PassResult()

    register_pass("nudge", nudge, NudgeConfig)
    try:
        recipe = load_recipe({"passes": [{"pass": "nudge", "amount": 0.25}]})
        assert recipe.to_dict() == {"name": "custom", "passes": [{"pass": "nudge", "amount": 0.25}]}
        assert load_recipe(recipe.to_dict()) == recipe
    finally:
        del PASSES["nudge"]
