"""QuantFormat: checked once when built, normalised so equal formats hash equal, and the one place
the weight quantizers' configs check and expose their format."""
from __future__ import annotations

import dataclasses

import pytest

from fxquant.config import ActQuantConfig, AWQConfig, GPTQConfig, WeightQuantConfig, config_to_dict
from fxquant.errors import RecipeError
from fxquant.quant.format import QuantFormat
from fxquant.quant.gptq import GPTQOptions


@pytest.mark.parametrize("fields,match", [
    ({"bits": 5}, r"QuantFormat\.bits = 5 is not one of \[2, 3, 4, 8\]"),
    ({"bits": 8.0}, r"QuantFormat\.bits = 8\.0 is not one of"),
    ({"symmetric": 1}, r"QuantFormat\.symmetric = 1 is not one of \[True, False\]"),
    ({"group_size": 0}, r"QuantFormat\.group_size = 0 must be an integer in \[1, 1048576\]"),
    ({"zero_point": "half"}, r"QuantFormat\.zero_point = 'half' is not one of \['float', 'int'\]"),
])
def test_a_bad_field_is_refused_listing_the_allowed_values(fields, match):
    with pytest.raises(RecipeError, match=match):
        QuantFormat(**{"bits": 4, "symmetric": False, **fields})


def test_symmetric_formats_have_one_spelling_and_formats_are_hashable_keys():
    assert QuantFormat(8, True, None, "float") == QuantFormat(8, True, None, "int")
    assert QuantFormat(8, True).zero_point == "int" and not QuantFormat(8, True).float_zero
    assert QuantFormat(4, False, 32, "float") != QuantFormat(4, False, 32, "int")
    table = {QuantFormat(4, True, 32, "float"): "sym", QuantFormat(4, False, 32): "tinygemm"}
    assert table[QuantFormat(4, True, 32, "int")] == "sym" and table[QuantFormat(4, False, 32, "float")] == "tinygemm"
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantFormat(4, True).bits = 8


def test_ranges_names_and_the_primitive_spelling():
    assert QuantFormat(4, False, 64).qrange == (-8, 7)  # float zero: signed codes
    assert QuantFormat(4, False, 64, "int").qrange == (0, 15)
    assert QuantFormat(8, True).qrange == (-128, 127)
    assert QuantFormat(4, False, 64).describe() == "int4 asym float-zero group 64"
    assert QuantFormat(4, False, None, "int").describe() == "int4 asym per channel"
    assert QuantFormat(8, True).describe() == "int8 sym per channel"
    for fmt in (QuantFormat(4, False, 64), QuantFormat(3, False, None, "int"), QuantFormat(8, True)):
        assert QuantFormat.from_float_zero(fmt.bits, fmt.symmetric, fmt.group_size or 0, fmt.float_zero) == fmt


@pytest.mark.parametrize("cls", [WeightQuantConfig, GPTQConfig, AWQConfig])
@pytest.mark.parametrize("fields,field", [({"bits": 5}, "bits"), ({"symmetric": "yes"}, "symmetric"),
                                          ({"group_size": -1}, "group_size"), ({"zero_point": "x"}, "zero_point")])
def test_config_format_errors_name_the_config(cls, fields, field):
    with pytest.raises(RecipeError, match=rf"^{cls.__name__}\.{field} = "):
        cls(**fields)


def test_configs_expose_their_format_and_keep_their_flat_fields():
    assert WeightQuantConfig(4, False, 64).format == QuantFormat(4, False, 64, "float")
    assert GPTQConfig(zero_point="int").format == QuantFormat(4, False, 128, "int")
    assert AWQConfig(symmetric=True).format == QuantFormat(4, True, 128)
    assert GPTQConfig(damp=0.1, act_order=True, clip_search=True).options == GPTQOptions(0.1, 128, True, 1.0, True)
    assert config_to_dict(WeightQuantConfig(4, False, 64)) == {
        "_type": "WeightQuantConfig", "bits": 4, "symmetric": False, "group_size": 64, "clip_ratio": 1.0,
        "clip_search": False, "zero_point": "float"}
    with pytest.raises(RecipeError, match=r"^GPTQConfig: give clip_ratio or clip_search=true, not both"):
        GPTQConfig(clip_ratio=0.9, clip_search=True)


def test_the_activation_config_names_itself_in_its_clip_ratio_error():
    with pytest.raises(RecipeError, match=r"^ActQuantConfig\.clip_ratio = 0 must be in \(0, 1\]"):
        ActQuantConfig(clip_ratio=0)
