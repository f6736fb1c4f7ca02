"""Every preset through torch.compile(backend="fxquant") on a tiny Llama: quantize, compile, generate.

Slow tier (about 10 s of inductor per preset): `python -m pytest -m slow tests/test_backend_presets.py`.
"""
import copy

import pytest
import torch

import fxquant
from fxquant.errors import RecipeError
from fxquant.models import tiny_model
from fxquant.recipes import PRESETS, load_recipe

IDS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _recipe(name: str):
    """The preset, with group size 32 where it has one (the tiny model's widths are 64 and 128)."""
    try:
        return load_recipe({"preset": name, "group_size": 32})
    except RecipeError:
        return load_recipe(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_compiles_with_the_backend_and_generates_the_eager_lowered_tokens(name):
    torch._dynamo.reset()
    model = fxquant.quantize(tiny_model("llama"), _recipe(name), calibration=CALIBRATION)
    eager = fxquant.lower(copy.deepcopy(model), plan="rule")
    expected = eager.generate(IDS, max_new_tokens=3, do_sample=False)
    model.forward = torch.compile(model.forward, backend="fxquant", options={"plan": "rule"})
    assert torch.equal(model.generate(IDS, max_new_tokens=3, do_sample=False), expected)
