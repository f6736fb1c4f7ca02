"""Recipes: an ordered list of passes with their configs, stored as data.

Entry point: `load_recipe(spec) -> Recipe`, where `spec` is a preset name, a dict, a path to a
TOML/YAML file or a Recipe. Each preset is a packaged file, `presets/<name>.toml`, in the format of
a user's recipe file (`fxquant recipes NAME` prints it, to copy and edit). A dict lists `passes`
(each `{"pass": key, **fields}`) or starts from a `preset`; its other top-level keys override that
field in every pass that has it:

    {"preset": "rotate-r1r2", "rotation": "random-orthogonal", "seed": 3}

TOML has no null, so a file writes None as the string "none" (`group_size = "none"`). Everything is
validated here, before a model is touched: an unknown preset, pass or field is a RecipeError that
lists the allowed ones.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from fxquant.config import config_fields, config_from_dict, config_to_dict, register_config
from fxquant.errors import RecipeError
from fxquant.passes import PASSES
from fxquant.pipeline import Step

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser from PyPI (a dependency for python_version < "3.11")
    import tomli as tomllib

NONE = "none"  # how a recipe file or a `--set` value writes None
_NULLS = (NONE, "None", "null")
_SUFFIXES = (".toml", ".yaml", ".yml")
_TOP_LEVEL = ("preset", "passes", "name")


def parse_value(text: str):
    """A field value typed on a command line (`--set group_size=64`, bench's `preset+field=value`):
    a TOML value (`true`, `64`, `0.5`, `"x"`), `none` for None, or else the bare word as a string."""
    if text in _NULLS:
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: `float32`, `random-hadamard`


def _none(value):
    return None if isinstance(value, str) and value in _NULLS else value


def _loads(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{where} is not valid TOML: {exc}") from None


def _preset_steps(name: str, text: str) -> list[tuple[str, dict]]:
    """The (pass key, fields) list of a packaged preset file, which holds only [[passes]] tables."""
    data = _loads(text, f"preset file {name}.toml")
    tables = data.get("passes")
    if set(data) != {"passes"} or not isinstance(tables, list) \
            or not all(isinstance(t, dict) and "pass" in t for t in tables):
        raise RecipeError(f"preset file {name}.toml must hold only [[passes]] tables, each with a 'pass' key "
                          "(the preset's name is the file's)")
    return [(t["pass"], {k: _none(v) for k, v in t.items() if k != "pass"}) for t in tables]


# name -> the text of fxquant/recipes/presets/<name>.toml (importlib.resources: a wheel install has them too)
_PRESET_TEXTS = dict(sorted((f.name.removesuffix(".toml"), f.read_text())
                            for f in files(__name__).joinpath("presets").iterdir() if f.name.endswith(".toml")))
PRESETS: dict[str, list[tuple[str, dict]]] = {name: _preset_steps(name, text) for name, text in _PRESET_TEXTS.items()}
DEFAULT_RECIPE = "rotate-r1r2-w8a8"


def _check_preset(name: str) -> None:
    if name not in PRESETS:
        raise RecipeError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")


def preset_text(name: str) -> str:
    """The preset's TOML file as packaged: `fxquant recipes NAME > mine.toml` copies it."""
    _check_preset(name)
    return _PRESET_TEXTS[name]


def preset_description(name: str) -> str:
    """The first line of the preset file's opening comment: what the preset does."""
    return preset_text(name).splitlines()[0].removeprefix("#").strip()


@dataclass(frozen=True)
class Recipe:
    """A named, validated list of (pass key, config) pairs."""

    name: str
    steps: tuple[tuple[str, object], ...]

    def pipeline_steps(self) -> list[Step]:
        """One Step per pass; a pass used twice gets its position in its name."""
        counts = Counter(key for key, _ in self.steps)
        return [Step(PASSES[key][0], cfg, name=key if counts[key] == 1 else f"{key}_{i}")
                for i, (key, cfg) in enumerate(self.steps)]

    def to_dict(self) -> dict:
        """The recipe as plain data (TOML-ready): `{"name": ..., "passes": [{"pass": key, ...}]}`."""
        return {"name": self.name, "passes": [{"pass": key, **_toml_fields(cfg)} for key, cfg in self.steps]}

    def __str__(self) -> str:
        return f"{self.name}: " + " -> ".join(key for key, _ in self.steps)


def _toml_fields(cfg) -> dict:
    """A config's fields without `_type`. None is left out where it is the default and written "none"
    where it is not (GPTQ's per-channel group_size), so that the dict loads back to the same config."""
    if cfg is None:
        return {}
    data = config_to_dict(cfg)
    return {f.name: data.get(f.name, NONE) for f in dataclasses.fields(cfg)
            if f.name in data or f.default is not None}


def load_recipe(spec) -> Recipe:
    """A Recipe from a preset name, a dict, a TOML/YAML path or a Recipe; raises RecipeError."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and Path(spec).suffix in _SUFFIXES):
        return _from_dict(_read_file(Path(spec)), name=Path(spec).stem)
    if isinstance(spec, str):
        return _from_dict({"preset": spec})
    if isinstance(spec, dict):
        return _from_dict(spec)
    raise RecipeError(f"a recipe is a preset name {sorted(PRESETS)}, a dict or a .toml/.yaml path, "
                      f"not {type(spec).__name__}")


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    if path.suffix == ".toml":
        return _loads(path.read_text(), f"recipe file '{path}'")
    import yaml  # pyyaml, a dependency for YAML recipe files

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file '{path}' must hold a mapping, not {type(data).__name__}")
    return data


def register_pass(key: str, fn, config=None) -> None:
    """Make your own @fxpass function a recipe step named `key` (with a frozen dataclass `config`, or
    None when it takes none): `fxquant.quantize` and the compile backend then run it like any other.

    Example::

        fxquant.register_pass("fold_rms_weights", fold_rms_weights)
        fxquant.quantize(model, {"passes": [{"pass": "fold_rms_weights"}]})
    """
    if not isinstance(key, str) or not key.isidentifier():
        raise RecipeError(f"register_pass: the key must be an identifier, got {key!r}")
    if not hasattr(fn, "fxpass"):
        raise RecipeError(f"register_pass({key!r}): {getattr(fn, '__name__', fn)!r} is not an @fxpass function; "
                          "decorate it with @fxpass(requires=..., provides=..., invalidates=...)")
    if config is not None and not (dataclasses.is_dataclass(config) and isinstance(config, type)
                                   and config.__dataclass_params__.frozen):
        raise RecipeError(f"register_pass({key!r}): config must be a frozen dataclass class or None")
    if key in PASSES and PASSES[key] != (fn, config):
        raise RecipeError(f"register_pass: {key!r} is already the pass {PASSES[key][0].__name__!r}; choose another key")
    if config is not None:
        register_config(config)  # so the recipe saves with the model and loads back
    PASSES[key] = (fn, config)


def _from_dict(data: dict, name: str | None = None) -> Recipe:
    if "preset" in data and "passes" in data:
        raise RecipeError("a recipe gives either 'preset' or 'passes', not both")
    if "preset" in data:
        preset = data["preset"]
        _check_preset(preset)
        raw, name = [{"pass": k, **f} for k, f in PRESETS[preset]], data.get("name", name or preset)
    elif "passes" in data:
        raw, name = data["passes"], data.get("name", name or "custom")
    else:
        raise RecipeError(f"a recipe dict needs 'preset' (one of {sorted(PRESETS)}) or 'passes'")
    if not isinstance(raw, list) or not raw:
        raise RecipeError("'passes' must be a non-empty list of {'pass': key, ...fields} tables")
    overrides = {k: _none(v) for k, v in data.items() if k not in _TOP_LEVEL}
    steps = [_step(i, entry) for i, entry in enumerate(raw)]
    packs = [i for i, (key, _) in enumerate(steps) if key == "pack"]
    if packs and packs[0] != len(steps) - 1:
        raise RecipeError(f"passes[{packs[0]}]: 'pack' must be the last pass (the passes after it would find no "
                          "float weights to edit); move it to the end")
    return Recipe(str(name), tuple(_override(steps, overrides)))


def _step(index: int, entry) -> tuple[str, dict]:
    if not isinstance(entry, dict) or "pass" not in entry:
        raise RecipeError(f"passes[{index}] must be a table with a 'pass' key, got {entry!r}")
    key = entry["pass"]
    if key not in PASSES:
        raise RecipeError(f"passes[{index}]: unknown pass {key!r}; passes are {sorted(PASSES)}")
    return key, {k: _none(v) for k, v in entry.items() if k != "pass"}


def _override(steps, overrides):
    """Apply top-level fields to every pass that has them, then build and validate each config."""
    known = {f for key, _ in steps if PASSES[key][1] for f in config_fields(PASSES[key][1])}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise RecipeError(f"unknown field {unknown[0]!r} for this recipe; its passes take {sorted(known)} "
                          f"(top-level keys: {list(_TOP_LEVEL)})")
    out = []
    for index, (key, fields) in enumerate(steps):
        cls = PASSES[key][1]
        if cls is None:
            if fields:
                raise RecipeError(f"passes[{index}]: pass {key!r} takes no fields, got {sorted(fields)}")
            out.append((key, None))
            continue
        mine = {**fields, **{k: v for k, v in overrides.items() if k in config_fields(cls)}}
        out.append((key, config_from_dict(cls, mine, where=f"passes[{index}] ({key})")))
    return out


def recipe_with(spec, fields: dict) -> Recipe:
    """`spec` (preset, path or dict) with top-level field overrides, validated like a recipe dict."""
    if not fields:
        return load_recipe(spec)
    if isinstance(spec, str) and Path(spec).suffix not in _SUFFIXES:
        return _from_dict({"preset": spec, **fields})
    base = load_recipe(spec).to_dict()
    return _from_dict({**base, **fields})
