"""GPTQ: the solver against round-to-nearest, and the pass on tiny models with and without rotations."""
from __future__ import annotations

import pytest
import torch

from conftest import planted_outliers
from fxquant import apply_recipe, quantize
from fxquant.errors import CalibrationError, RecipeError
from fxquant.models import tiny_model
from fxquant.quant.format import QuantFormat
from fxquant.quant.gptq import GPTQOptions, gptq_quantize, hessian_update
from fxquant.quant.numerics import fake_quantize, fake_quantize_clip_search, qparams_clip_search

SCHEMES = [(4, True, None), (4, False, None), (4, True, 32), (4, False, 32), (3, False, 64)]
FLOAT_ZERO = [(4, False, 32), (4, False, None)]  # tinygemm's format, asymmetric only


def _fmt(bits, symmetric, group=None, float_zero=False) -> QuantFormat:
    return QuantFormat.from_float_zero(bits, symmetric, group, float_zero)


def _correlated(n=2048, width=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, width, generator=g) + 0.1 * torch.randn(n, width, generator=g)
    x[:, :4] *= 8  # outlier channels
    return x


def test_hessian_update_is_the_running_mean_of_2_x_xt():
    x = _correlated(300, 32)
    h, n = hessian_update(None, 0, x[:100])
    h, n = hessian_update(h, n, x[100:].reshape(2, 100, 32))
    assert n == 300
    torch.testing.assert_close(h, 2 * x.double().T @ x.double() / 300, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,symmetric,group", SCHEMES)
def test_with_uncorrelated_unit_inputs_gptq_is_round_to_nearest(bits, symmetric, group):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    q = gptq_quantize(w, torch.eye(128), _fmt(bits, symmetric, group), GPTQOptions(damp=1e-6)).values()
    assert torch.equal(q, fake_quantize(w, _fmt(bits, symmetric, group)))  # no error to spread


@pytest.mark.parametrize("bits,symmetric,group", FLOAT_ZERO)
def test_float_zero_gptq_with_unit_inputs_is_float_zero_round_to_nearest(bits, symmetric, group):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    fmt = _fmt(bits, symmetric, group, float_zero=True)
    qw = gptq_quantize(w, torch.eye(128), fmt, GPTQOptions(damp=1e-6))
    assert torch.equal(qw.values(), fake_quantize(w, fmt))
    assert qw.fmt.float_zero and qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 15


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,symmetric,group,float_zero",
                         [(*s, False) for s in SCHEMES] + [(*s, True) for s in FLOAT_ZERO])
def test_gptq_lowers_the_output_error_of_round_to_nearest(bits, symmetric, group, float_zero, act_order):
    x = _correlated()
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    h, _ = hessian_update(None, 0, x)
    fmt = _fmt(bits, symmetric, group, float_zero)
    qw = gptq_quantize(w, h, fmt, GPTQOptions(act_order=act_order))
    q = qw.values()

    def err(v):
        return float(((x @ (v - w).T) ** 2).mean())

    assert err(q) < 0.8 * err(fake_quantize(w, fmt))
    # the stored codes, scales and zeros are the grid every value lies on
    assert torch.equal(qw.values(), q) and qw.scale.shape == (48, 1 if group is None else 128 // group)


def test_per_channel_results_lie_on_the_grid_of_the_static_scales():
    x, w = _correlated(), torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    h, _ = hessian_update(None, 0, x)
    q = gptq_quantize(w, h, _fmt(4, True), GPTQOptions(clip_search=True)).values()
    scale, _ = qparams_clip_search(w, _fmt(4, True))  # fixed before the first column is rounded
    codes = q / scale[..., 0]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.round().min() >= -8 and codes.round().max() <= 7
    err_clip = float(((x @ (q - w).T) ** 2).mean())
    assert err_clip < float(((x @ (fake_quantize_clip_search(w, _fmt(4, True)) - w).T) ** 2).mean())


def test_dead_input_channels_are_zeroed():
    x = _correlated(512, 64)
    x[:, 5] = 0
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    q = gptq_quantize(w, hessian_update(None, 0, x)[0], _fmt(4, False, 32)).values()
    assert torch.all(q[:, 5] == 0)


@pytest.mark.parametrize("zero_point", ["float", "int"])
@pytest.mark.parametrize("rotations", [[], ["fold_norms", "rotate_residual", "rotate_vo", "insert_online_hadamard"]])
def test_the_gptq_pass_beats_round_to_nearest_with_and_without_rotations(rotations, zero_point):
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(99))
    calibration = [torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        reference = planted_outliers(tiny_model("llama"))(ids).logits
    w4 = {"bits": 4, "symmetric": False, "group_size": 16, "zero_point": zero_point}
    first = [{"pass": p} for p in rotations]
    rtn = quantize(planted_outliers(tiny_model("llama")), {"passes": first + [{"pass": "quantize_weights", **w4}]})
    model = planted_outliers(tiny_model("llama"))
    result = apply_recipe(model, {"passes": first + [{"pass": "gptq", **w4, "act_order": True}]},
                          calibration=calibration)
    how = "asym float-zero" if zero_point == "float" else "asym"
    assert [c.detail for c in result.results["gptq"].changes] == [f"int4 {how} group 16 GPTQ"] * 14
    with torch.no_grad():
        assert float(((model(ids).logits - reference) ** 2).mean()) < 0.8 * float(((rtn(ids).logits - reference) ** 2).mean())


def test_gptq_refuses_without_calibration_or_with_a_group_that_does_not_fit():
    model = tiny_model("llama")
    with pytest.raises(CalibrationError):
        quantize(model, "gptq-w4a16")
    with pytest.raises(RecipeError, match="group_size=48 does not divide"):
        quantize(model, {"preset": "gptq-w4a16", "group_size": 48}, calibration=torch.randint(3, 100, (2, 8)))
    with pytest.raises(RecipeError, match="GPTQConfig.bits"):
        quantize(model, {"preset": "gptq-w4a16", "bits": 5})
