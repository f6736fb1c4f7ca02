"""learn_rotations: Cayley-SGD-trained R1 / R2, folded like fixed ones.

Learned beats the random-Hadamard start on planted outliers; the folds keep float outputs on
every architecture the fixed rotations handle; the gradient is the model's; save / load and
resume are exact; every bad input is refused by name before any change.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, SANDWICH, planted_outliers
from fxquant import load, quantize, save
from fxquant.api import apply_recipe
from fxquant.errors import CalibrationError, ModelLoadError, RecipeError
from fxquant.models import tiny_model
from fxquant.runtime.hooks import remove_activation_hooks

QUANTIZERS = [{"pass": "rotate_qk"}, {"pass": "insert_online_hadamard"},
              {"pass": "quantize_activations", "bits": 4}, {"pass": "quantize_kv_cache", "bits": 4}]


def _ids(seed=0, rows=4, seq=24):
    return torch.randint(3, 128, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _recipe(rotation="learned", tail=QUANTIZERS, **learn):
    fixed = {"rotation": rotation} if rotation == "learned" else {"rotation": rotation, "seed": 0}
    head = [{"pass": "fold_norms"}, {"pass": "layernorms_to_rms"}]
    if rotation == "learned":
        head.append({"pass": "learn_rotations", **{"steps": 4, "batch_size": 2, **learn}})
    return {"passes": head + [{"pass": "rotate_residual", **fixed}, {"pass": "rotate_vo", **fixed}, *tail]}


def _nll(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def test_learned_rotations_lower_the_quantized_loss_below_the_random_hadamard_start():
    ids = _ids(rows=4)
    fixed = quantize(planted_outliers(tiny_model("llama")), _recipe("random-hadamard"))
    learned = quantize(planted_outliers(tiny_model("llama")), _recipe(steps=12, batch_size=4, lr=1.0), calibration=ids)
    assert _nll(learned, ids) < _nll(fixed, ids)


def test_step_one_is_the_random_hadamard_model_and_the_loss_it_reports_is_that_model_s():
    ids = _ids(rows=2)
    fixed = quantize(tiny_model("llama"), _recipe("random-hadamard"))
    result = apply_recipe(tiny_model("llama"), _recipe(steps=1, batch_size=2), calibration=ids)
    reported = float(result.results["learn_rotations"].changes[0].detail.split("loss ")[1].split()[0])
    assert reported == pytest.approx(_nll(fixed, ids), rel=1e-4)


def _kl(model, teacher, ids) -> float:
    """Mean over tokens of KL(teacher || model) of the next-token distributions."""
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids, use_cache=False).logits[:, :-1], dim=-1)
        log_t = torch.log_softmax(teacher(ids, use_cache=False).logits[:, :-1], dim=-1)
    return (log_t.exp() * (log_t - log_p)).sum(-1).mean().item()


def test_the_kl_loss_is_the_quantized_model_s_divergence_from_the_float_one():
    ids = _ids(rows=2)
    fixed = quantize(tiny_model("llama"), _recipe("random-hadamard"))
    result = apply_recipe(tiny_model("llama"), _recipe(steps=1, batch_size=2, loss="kl"), calibration=ids)
    reported = float(result.results["learn_rotations"].changes[0].detail.split("loss ")[1].split()[0])
    # KL is small (1e-4 here): the training copy's float32-rotated weights against the float64 folds
    # flip a few 4-bit codes, a few percent of it
    assert reported == pytest.approx(_kl(fixed, tiny_model("llama"), ids), rel=0.05) and reported > 0


def test_learning_on_the_kl_loss_brings_the_quantized_model_closer_to_the_float_one():
    ids, teacher = _ids(rows=4), planted_outliers(tiny_model("llama"))
    fixed = quantize(planted_outliers(tiny_model("llama")), _recipe("random-hadamard"))
    learned = quantize(planted_outliers(tiny_model("llama")), _recipe(steps=12, batch_size=4, lr=1.0, loss="kl"),
                       calibration=ids)
    assert _kl(learned, teacher, ids) < _kl(fixed, teacher, ids)


def test_a_checkpoint_trained_on_another_loss_is_refused(tmp_path):
    ids, ckpt = _ids(rows=2), str(tmp_path / "r.safetensors")
    quantize(tiny_model("llama"), _recipe(steps=1, batch_size=1, checkpoint=ckpt), calibration=ids)
    with pytest.raises(ModelLoadError, match=r"trained on the cross_entropy loss, not kl"):
        quantize(tiny_model("llama"), _recipe(steps=2, batch_size=1, checkpoint=ckpt, loss="kl"), calibration=ids)
    with pytest.raises(RecipeError, match=r"loss"):
        quantize(tiny_model("llama"), _recipe(steps=2, loss="mse"), calibration=ids)


def _float_invariance_recipe(arch="llama"):
    recipe = _recipe(tail=[{"pass": "quantize_activations", "bits": 4}], steps=2, batch_size=2, lr=1.0)  # moves far
    if arch in SANDWICH:  # R1 goes online there (a Hadamard op, not a learned fold): R2 alone is learned
        recipe["passes"][3] = {"pass": "rotate_residual", "rotation": "random-hadamard"}
    return recipe


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_learned_rotations_keeps_the_float_function(arch):
    model, ids = tiny_model(arch), _ids(rows=2, seq=12)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    result = apply_recipe(model, _float_invariance_recipe(arch), calibration=ids)
    moved = [c for c in result.results["learn_rotations"].changes if c.kind == "learned"]
    assert moved and all(float(c.detail.split("= ")[1]) > 0 for c in moved)  # not the start matrix
    for module in model.modules():
        remove_activation_hooks(module)  # the float model, rotated by the learned R1 / R2
    with torch.no_grad():
        err = (model(ids, use_cache=False).logits - ref).abs().max().item()
    assert err <= 2e-4 * ref.abs().max().item(), f"{arch}: max |diff| {err:.3g}"


def test_learned_folds_differ_from_the_fixed_ones():
    ids = _ids(rows=2)
    fixed = quantize(tiny_model("llama"), _recipe("random-hadamard", tail=[]))
    learned = quantize(tiny_model("llama"), _float_invariance_recipe(), calibration=ids)
    w_fixed, w_learned = fixed.model.layers[0].self_attn.q_proj.weight, learned.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(w_fixed, w_learned, atol=1e-4)


def test_the_gradient_is_the_derivative_of_the_model_loss():
    """d loss / d R1 from the two-stage backward (through substituted weights, with block
    checkpointing) matches a central difference of the float model's loss along a random direction."""
    from fxquant.analysis import analyse
    from fxquant.capture import capture
    from fxquant.passes.learn_rotations import Target, _trainer, initial_matrices
    from fxquant.config import LearnRotationsConfig
    from fxquant.passes.fold_norms import fold_norms

    torch.set_default_dtype(torch.float64)
    try:
        model = tiny_model("llama", dtype=torch.float64)
        cg = capture(model)
        fold_norms(cg, analyse(cg), None)
        cg = capture(model)
        structure = analyse(cg)
        target = Target((), True, False, None, "")
        trainer = _trainer(cg, structure, target)
        start = initial_matrices(structure, target, LearnRotationsConfig())
        rows = [{"input_ids": _ids(rows=1)}]
        for checkpointing in (False, True):
            loss, grads = trainer.step({k: v.double() for k, v in start.items()}, rows, checkpointing)
            d = torch.randn(start["R1"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
            eps = 1e-3  # the norms compute in float32: a smaller step meets their rounding
            up, _ = trainer.step({"R1": start["R1"] + eps * d}, rows, checkpointing)
            down, _ = trainer.step({"R1": start["R1"] - eps * d}, rows, checkpointing)
            assert (up - down) / (2 * eps) == pytest.approx((grads["R1"].double() * d).sum().item(), rel=2e-2)
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_learned_model_saves_and_loads_bit_identically(tmp_path):
    ids = _ids(rows=2)
    recipe = _recipe(tail=[*QUANTIZERS, {"pass": "pack"}], steps=2, batch_size=2)
    recipe["passes"].insert(-3, {"pass": "gptq", "bits": 4, "symmetric": True, "group_size": 32})
    model = quantize(tiny_model("llama"), recipe, calibration=ids)
    save(model, tmp_path / "m", recipe)
    again = load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, again(ids, use_cache=False).logits)


def _learned_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    ids, ckpt = _ids(rows=4), str(tmp_path / "r.safetensors")
    straight = quantize(tiny_model("llama"), _recipe(steps=4, batch_size=1), calibration=ids)
    # one step, then stopped (its first step has the same learning rate as the 4-step run's)
    quantize(tiny_model("llama"), _recipe(steps=1, batch_size=1, checkpoint=ckpt), calibration=ids)
    resumed = apply_recipe(tiny_model("llama"), _recipe(steps=4, batch_size=1, checkpoint=ckpt), calibration=ids)
    assert "3 steps" in resumed.results["learn_rotations"].changes[0].detail
    assert "resumed after step 1" in resumed.results["learn_rotations"].changes[0].detail
    a, b = _learned_weights(straight), _learned_weights(resumed.cg.model)
    assert all(torch.allclose(a[n], b[n], atol=1e-6, rtol=0) for n in a)
    again = apply_recipe(tiny_model("llama"), _recipe(steps=4, batch_size=1, checkpoint=ckpt), calibration=ids)
    assert "0 steps" in again.results["learn_rotations"].changes[0].detail  # done: loading needs no training


def test_the_time_budget_stops_the_training():
    result = apply_recipe(tiny_model("llama"), _recipe(steps=50, max_minutes=1e-9), calibration=_ids(rows=2))
    assert result.results["learn_rotations"].changes[0].detail.startswith("0 steps")


def test_the_weights_trained_against_follow_the_recipe():
    from fxquant.config import LearnRotationsConfig
    from fxquant.passes import PASSES
    from fxquant.passes.learn_rotations import plan_target
    from fxquant.pipeline import Step
    from fxquant.recipes import load_recipe

    def target(name, **fields):
        steps = [Step(PASSES[key][0], cfg) for key, cfg in load_recipe({"preset": name, **fields}).steps]
        here = next(i for i, s in enumerate(steps) if s.name == "learn_rotations")
        return plan_target(tuple(steps[here + 1:]), steps[here].cfg or LearnRotationsConfig())

    assert target("spinquant-w4a4kv4").weights is None  # GPTQ follows the quantizers: float weights
    w4 = target("spinquant-w4a16").weights
    assert w4 is not None and (w4.bits, w4.symmetric, w4.group_size) == (4, False, 128)
    assert target("spinquant-w4a4kv4", weights="rtn").weights.bits == 4


def test_weight_only_recipes_train_through_rounded_weights():
    result = apply_recipe(planted_outliers(tiny_model("llama")), {"preset": "spinquant-w4a16", "steps": 3,
                                                                  "group_size": 32}, calibration=_ids(rows=2))
    trained = result.results["learn_rotations"].changes[0].detail
    assert "3 steps" in trained and "int4 asym group 32 weights (round to nearest)" in trained, trained


def test_every_bad_input_is_refused_before_any_change(tmp_path):
    model, ids = tiny_model("llama"), _ids(rows=2)
    before = _learned_weights(model)
    with pytest.raises(CalibrationError, match="calibration data"):
        quantize(model, _recipe())
    with pytest.raises(RecipeError, match="rotation = 'learned'.*has none after it"):
        quantize(model, {"passes": [{"pass": "fold_norms"}, {"pass": "learn_rotations"},
                                    {"pass": "rotate_residual"}, *QUANTIZERS]}, calibration=ids)
    with pytest.raises(RecipeError, match="needs a learn_rotations step earlier"):
        quantize(model, {"passes": [{"pass": "fold_norms"}, {"pass": "rotate_residual", "rotation": "learned"}]})
    with pytest.raises(RecipeError, match="every rotation gives the same loss"):
        quantize(model, _recipe(tail=[]), calibration=ids)
    with pytest.raises(RecipeError, match="block_size applies"):
        quantize(model, {"passes": [{"pass": "rotate_residual", "rotation": "learned", "block_size": 8}]})
    with pytest.raises(RecipeError, match="LearnRotationsConfig.weights"):
        quantize(model, _recipe(weights="bf16"), calibration=ids)
    damaged = tmp_path / "bad.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="bad.safetensors.*cannot be read"):
        quantize(model, _recipe(checkpoint=str(damaged)), calibration=ids)
    other = tmp_path / "other.safetensors"
    quantize(tiny_model("llama"), _recipe(steps=1, checkpoint=str(other)), calibration=ids)
    with pytest.raises(ModelLoadError, match="other.safetensors.*seed"):
        quantize(model, _recipe(seed=3, checkpoint=str(other)), calibration=ids)
    with pytest.raises(ModelLoadError, match="another model"):
        quantize(tiny_model("llama", hidden_size=128), _recipe(checkpoint=str(other)), calibration=ids)
    after = _learned_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_the_cli_saves_the_learned_rotations_with_the_model_and_never_retrains_them(tmp_path):
    from fxquant.cli import main

    args = ["quantize", "--model", "tiny-llama", "--recipe", "spinquant-w4a16", "--set", "steps=2", "--set",
            "group_size=32", "--calibration", "2", "--out", str(tmp_path / "m")]
    assert main(args) == 0
    rotations = tmp_path / "m" / "rotations.safetensors"
    first, written = load(tmp_path / "m"), rotations.stat().st_mtime_ns
    assert main(args) == 0  # the finished checkpoint is found: no step runs, nothing is rewritten
    assert rotations.stat().st_mtime_ns == written
    again = load(tmp_path / "m")
    ids = _ids(rows=1)
    with torch.no_grad():
        assert torch.equal(first(ids, use_cache=False).logits, again(ids, use_cache=False).logits)


def test_a_calibrated_quantizer_after_it_is_calibrated_in_the_training_copy_too():
    tail = [{"pass": "quantize_activations", "bits": 4, "act_clip_search": True}]
    result = apply_recipe(tiny_model("llama"), _recipe(tail=tail, steps=1, batch_size=1), calibration=_ids(rows=2))
    assert "1 steps" in result.results["learn_rotations"].changes[0].detail
