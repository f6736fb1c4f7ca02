"""Recipes: an ordered list of passes with their configs, stored as data.

Entry point: `load_recipe(spec) -> Recipe`, where `spec` is a preset name, a dict, a path to a
TOML/YAML file or a Recipe. A dict lists `passes` (each `{"pass": key, **fields}`) or starts from a
`preset`; its other top-level keys override that field in every pass that has it:

    {"preset": "rotate-r1r2", "rotation": "random-orthogonal", "seed": 3}

Everything is validated here, before a model is touched: an unknown preset, pass or field is a
RecipeError that lists the allowed ones.
"""
from __future__ import annotations

import os
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fxquant.config import config_fields, config_from_dict, config_to_dict
from fxquant.errors import RecipeError
from fxquant.passes import PASSES
from fxquant.pipeline import Step

_ROTATE = [("fold_norms", {}), ("layernorms_to_rms", {}),
           ("rotate_residual", {"rotation": "random-hadamard", "seed": 0}),
           ("rotate_vo", {"rotation": "random-hadamard", "seed": 0})]
_INT8_W = ("quantize_weights", {"bits": 8, "symmetric": True})
_INT4_W = ("quantize_weights", {"bits": 4, "symmetric": False, "group_size": 128})
_INT8_A = ("quantize_activations", {"bits": 8})
_INT4_A = ("quantize_activations", {"bits": 4})
_INT4_W_SYM = ("quantize_weights", {"bits": 4, "symmetric": True})  # per output channel
_PACK = [("pack", {})]  # the last step of every preset that quantizes weights: packed integer codes
_QUANT = {"w8a8": [_INT8_W, _INT8_A] + _PACK, "w4a8": [_INT4_W, _INT8_A] + _PACK, "w4a16": [_INT4_W] + _PACK,
          "w16a4": [_INT4_A], "w4a4": [_INT4_W_SYM, _INT4_A] + _PACK}
_R4 = [("insert_online_hadamard", {})]
_QUAROT = _ROTATE + [("rotate_qk", {})] + _R4
_INT4_W_CHANNEL = ("quantize_weights", {"bits": 4, "symmetric": True, "clip_search": True})  # per channel
# AWQ and GPTQ checkpoints run on kernels with integer zero points (AutoAWQ's GEMM, ExLlama, Marlin),
# and on SmolLM2 they are the better grid (docs/BENCHMARKS.md); plain RTN presets use tinygemm's float zero
_INT_ZERO = {"zero_point": "int"}
_AWQ = [("awq_scale", _INT_ZERO), ("awq_clip", _INT_ZERO)]  # int4 asymmetric, groups of 128
_INT4_W_INT_ZERO = ("quantize_weights", {**_INT4_W[1], **_INT_ZERO})
PRESETS: dict[str, list[tuple[str, dict]]] = {
    "rotate-r1r2": _ROTATE,  # norm fusion + R1 + R2, float: outputs unchanged
    "rotate-r1r2r4": _ROTATE + _R4,  # + an online Hadamard on each down_proj input, float
    "quarot-float": _QUAROT,  # R1..R4, no quantizer: for checking exactness
    "quarot-w4a4kv4": _QUAROT + [_INT4_W_CHANNEL, _INT4_A, ("quantize_kv_cache", {"bits": 4})] + _PACK,
    "quarot-w4a8": _QUAROT + [_INT4_W_CHANNEL, _INT8_A] + _PACK,
    "awq-w4a16": _AWQ + [_INT4_W_INT_ZERO] + _PACK,  # AWQ scales + clip, then int4 asymmetric groups of 128
    "quarot-awq-w4a16": _ROTATE + _AWQ + [_INT4_W_INT_ZERO] + _PACK,  # R1 + R2, then AWQ on the rotated model
    "gptq-w4a16": [("gptq", {"bits": 4, "symmetric": False, "group_size": 128, "act_order": True, **_INT_ZERO})]
    + _PACK,
    "quarot-gptq-w4a4kv4": _QUAROT + [("gptq", {"bits": 4, "symmetric": True, "group_size": None, "clip_search": True,
                                                "act_order": True}),
                                      _INT4_A, ("quantize_kv_cache", {"bits": 4})] + _PACK,
    "smoothquant-w8a8": [("smooth_quant", {}), _INT8_W, _INT8_A] + _PACK,  # alpha 0.5, then int8 weights, tokens
    **_QUANT,  # round-to-nearest, no rotation (packed when weights are quantized)
    **{f"rotate-r1r2-{name}": _ROTATE + steps for name, steps in _QUANT.items()},
    **{f"rotate-r1r2r4-{name}": _ROTATE + _R4 + steps for name, steps in _QUANT.items()},
}
DEFAULT_RECIPE = "rotate-r1r2-w8a8"
_TOP_LEVEL = ("preset", "passes", "name")


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
        passes = [{"pass": key, **({k: v for k, v in config_to_dict(cfg).items() if k != "_type"}
                                   if cfg is not None else {})} for key, cfg in self.steps]
        return {"name": self.name, "passes": passes}

    def __str__(self) -> str:
        return f"{self.name}: " + " -> ".join(key for key, _ in self.steps)


def load_recipe(spec) -> Recipe:
    """A Recipe from a preset name, a dict, a TOML/YAML path or a Recipe; raises RecipeError."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and Path(spec).suffix in (".toml", ".yaml", ".yml")):
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
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"recipe file '{path}' is not valid TOML: {exc}") from None
    import yaml  # a transformers dependency

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file '{path}' must hold a mapping, not {type(data).__name__}")
    return data


def _from_dict(data: dict, name: str | None = None) -> Recipe:
    if "preset" in data and "passes" in data:
        raise RecipeError("a recipe gives either 'preset' or 'passes', not both")
    if "preset" in data:
        preset = data["preset"]
        if preset not in PRESETS:
            raise RecipeError(f"unknown preset {preset!r}; presets are {sorted(PRESETS)}")
        raw, name = [{"pass": k, **f} for k, f in PRESETS[preset]], data.get("name", name or preset)
    elif "passes" in data:
        raw, name = data["passes"], data.get("name", name or "custom")
    else:
        raise RecipeError(f"a recipe dict needs 'preset' (one of {sorted(PRESETS)}) or 'passes'")
    if not isinstance(raw, list) or not raw:
        raise RecipeError("'passes' must be a non-empty list of {'pass': key, ...fields} tables")
    overrides = {k: v for k, v in data.items() if k not in _TOP_LEVEL}
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
    return key, {k: v for k, v in entry.items() if k != "pass"}


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
    if isinstance(spec, str) and Path(spec).suffix not in (".toml", ".yaml", ".yml"):
        return _from_dict({"preset": spec, **fields})
    base = load_recipe(spec).to_dict()
    return _from_dict({**base, **fields})
