"""The packaged presets: one TOML file each, in a user's recipe format, that loads, round-trips and
prints through `fxquant recipes` as a file a user can copy and run."""
from __future__ import annotations

from importlib.resources import files

import pytest

from fxquant.cli import main
from fxquant.recipes import NONE, PRESETS, load_recipe, parse_value, preset_description, preset_text

NAMES = [
    "awq-w4a16", "gptq-w4a16", "quarot-awq-w4a16", "quarot-float", "quarot-gptq-w4a4kv4", "quarot-gptq-w4a4kv4-mixed",
    "quarot-w4a4kv4",
    "quarot-w4a8", "rotate-r1r2", "rotate-r1r2-w16a4", "rotate-r1r2-w4a16", "rotate-r1r2-w4a4", "rotate-r1r2-w4a8",
    "rotate-r1r2-w8a8", "rotate-r1r2r4", "rotate-r1r2r4-w16a4", "rotate-r1r2r4-w4a16", "rotate-r1r2r4-w4a4",
    "rotate-r1r2r4-w4a8", "rotate-r1r2r4-w8a8", "smoothquant-w8a8", "spinquant-w4a16", "spinquant-w4a4kv4", "w16a4", "w4a16", "w4a16-lm-head", "w4a4", "w4a8", "w8a8",
]


def test_the_presets_are_exactly_the_packaged_files():
    packaged = {f.name.removesuffix(".toml") for f in files("fxquant.recipes").joinpath("presets").iterdir()
                if f.name.endswith(".toml")}
    assert list(PRESETS) == NAMES and packaged == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_loads_and_round_trips(name):
    recipe = load_recipe(name)
    assert recipe.name == name and [key for key, _ in recipe.steps] == [key for key, _ in PRESETS[name]]
    assert load_recipe(recipe.to_dict()) == recipe


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_file_says_what_it_does_then_lists_passes(name):
    lines = preset_text(name).splitlines()
    comment = lines[:lines.index("")]
    assert 1 <= len(comment) <= 3 and all(line.startswith("# ") for line in comment)
    assert preset_description(name) == comment[0][2:]
    assert lines[len(comment) + 1] == "[[passes]]"


def test_a_none_field_is_written_none_and_survives_the_round_trip():
    recipe = load_recipe("quarot-gptq-w4a4kv4")
    assert dict(recipe.steps)["gptq"].group_size is None  # one scale per output channel, not GPTQ's default 128
    assert next(p for p in recipe.to_dict()["passes"] if p["pass"] == "gptq")["group_size"] == NONE


@pytest.mark.parametrize("text,value", [("64", 64), ("0.5", 0.5), ("true", True), ('"x y"', "x y"),
                                        ("float32", "float32"), ("random-hadamard", "random-hadamard"),
                                        ("none", None), ("None", None), ("null", None)])
def test_parse_value_reads_toml_values_bare_words_and_none(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_cli_lists_every_preset_with_its_description_and_pass_chain(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in NAMES:
        row = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
        assert preset_description(name) in lines[row]
        assert lines[row + 1].strip() == " -> ".join(key for key, _ in PRESETS[name])
    assert "(the default recipe)" in next(line for line in lines if line.startswith("rotate-r1r2-w8a8 "))


@pytest.mark.parametrize("name", NAMES)
def test_cli_prints_a_preset_file_that_loads_back_to_the_same_recipe(name, capsys, tmp_path):
    assert main(["recipes", name]) == 0
    (tmp_path / "mine.toml").write_text(capsys.readouterr().out)
    mine = load_recipe(tmp_path / "mine.toml")
    assert mine.name == "mine" and mine.steps == load_recipe(name).steps


def test_cli_refuses_an_unknown_preset_listing_the_known_ones(capsys):
    assert main(["recipes", "w3a3"]) == 2
    assert "unknown preset 'w3a3'; presets are ['awq-w4a16'" in capsys.readouterr().err
