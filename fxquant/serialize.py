"""Save and load a transformed model: safetensors weights + one JSON file, no pickle.

Entry points: `save(model, directory, recipe=None)` and `load(directory) -> model`. The one idea:
what fxquant changed beyond weight values is small and describable as data, so it is written down
next to the transformers config and replayed on a fresh model from that config:

- module swaps (a LayerNorm that became a weightless RMSNorm, a linear packed as a QuantizedLinear
  holding integer codes), from an allow-list of types;
- parameters the architecture does not have (a folded LayerNorm bias in lm_head);
- forward pre-hooks on layers (online Hadamard, activation fake-quant, explicit input scales), in order;
- attention transforms (R3, KV-cache fake-quant).

The weights are then loaded strictly (every key must match), so a loaded model computes exactly
what the saved one did, with no calibration data. The JSON also records each tensor's shape, dtype
and CRC-32 as written, so a truncated, corrupted or mismatched file is refused with an error that
names the file and the tensor, before any weight is used. The other files (config.json,
generation_config.json, the tokenizer's JSON files) are parsed and checked first too, so every
damaged file is refused by name. Nothing is ever unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from fxquant.errors import ModelLoadError, RecipeError
from fxquant.lowering import lower as lower_model
from fxquant.quant.pack import pack_model
from fxquant.runtime.attention import ATTR, install
from fxquant.runtime.hooks import HOOK_TYPES
from fxquant.runtime.linear import QuantizedLinear, absorb_input_quantizers
from fxquant.runtime.lowered import DecodeLinear, portable_hooks
from fxquant.weights import canonical, replace_module

FORMAT = "fxquant-1"
WEIGHTS, META = "model.safetensors", "fxquant.json"
CONFIG, GENERATION = "config.json", "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SAVE_AGAIN = "the directory is damaged: save the model again with fxquant.save"
_FXQUANT_DIR = "fxquant.load takes the directory fxquant.save (or `fxquant quantize --out`) wrote"
_HOOKS = HOOK_TYPES  # the hook types a saved directory may name (an allow-list)


def save(model: torch.nn.Module, directory, recipe=None) -> Path:
    """Write `model` (a transformers model fxquant transformed) to `directory`; returns the path.

    Quantized layers are stored as packed integer codes: a layer a recipe quantized but did not pack
    is packed first, in place (it computes exactly what it did).
    """
    pack_model(model)
    out = Path(directory)
    fresh = _fresh(model.config, device="meta")
    meta = {
        "format": FORMAT,
        "architecture": type(model).__name__,
        "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
        "modules": _swapped_modules(model, fresh),
        "extra_parameters": _extra_parameters(model, fresh),
        "hooks": _hooks(model),
        "attention": {name: dataclasses.asdict(getattr(m, ATTR)) for name, m in model.named_modules()
                      if getattr(m, ATTR, None) is not None},
    }
    _save_generation_config(model, out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    save_model(model, str(out / WEIGHTS), metadata={"format": FORMAT})  # ties stored once
    meta["fxquant_version"] = _version()
    meta["tensors"] = _tensor_records(out / WEIGHTS)
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load(directory, dtype: torch.dtype | None = None, *, lower: bool = False, device=None) -> torch.nn.Module:
    """Rebuild a model saved by `save`: config -> fresh model -> replayed edits -> strict weights.

    Every file is checked before any weight is used; a damaged one raises ModelLoadError naming it.
    `lower=True` then puts it on the kernels of `device` (default CPU): `fxquant.lower`.
    """
    src = Path(directory)
    meta = _read_meta(src)
    config = _read_config(src)
    generation = _read_generation_config(src)
    _check_tokenizer_files(src)
    _check_tensors(src / WEIGHTS, meta.get("tensors"))
    dtype = dtype or _saved_dtype(src / WEIGHTS)
    model = _fresh(config, dtype=dtype)
    if generation is not None:
        model.generation_config = generation
    if type(model).__name__ != meta.get("architecture"):
        raise ModelLoadError(f"'{src / CONFIG}' builds a {type(model).__name__}, but the weights in "
                             f"'{src / WEIGHTS}' were saved from a {meta.get('architecture')}: the config does not "
                             "belong to these weights")
    for path, spec in meta["modules"].items():
        new = _build_module(path, spec, dtype)
        _check_replaced(model, path, new, src)
        replace_module(model, path, new)
    for path, shape in meta["extra_parameters"].items():
        owner, _, name = path.rpartition(".")
        model.get_submodule(owner).register_parameter(name, torch.nn.Parameter(torch.zeros(shape)))
    _check_shapes(model, src / WEIGHTS, meta["tensors"])
    load_model(model, str(src / WEIGHTS), strict=True)
    for path, hooks in meta["hooks"].items():
        for hook in hooks:
            model.get_submodule(path).register_forward_pre_hook(_HOOKS[hook.pop("type")](**hook))
    for path, fields in meta["attention"].items():
        install(model, model.get_submodule(path), **fields)
    absorb_input_quantizers(model)  # as pack left them: the integer product's layers quantize their input
    if lower:
        lower_model(model, device)
    elif device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(directory):
    """The tokenizer saved in `directory` (by `tokenizer.save_pretrained`), or None when it has none.

    Example::

        model, tokenizer = fxquant.load("out"), fxquant.serialize.load_tokenizer("out")
    """
    from transformers import AutoTokenizer

    src = Path(directory)
    if not src.is_dir():
        raise ModelLoadError(f"'{src}' is not a directory, so it holds no tokenizer: pass the directory the "
                             "tokenizer was saved to")
    present = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not {"tokenizer.json", "tokenizer_config.json"} & set(present):
        return None
    _check_tokenizer_files(src)
    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as exc:  # tokenizers raises a plain Exception for a malformed tokenizer.json, and transformers
        # OSError, ValueError, KeyError or TypeError for the rest: all mean the saved tokenizer is damaged
        raise ModelLoadError(f"the tokenizer in '{src}' ({', '.join(present)}) is rejected by transformers' "
                             f"AutoTokenizer ({type(exc).__name__}: {exc}): save the tokenizer again with "
                             "tokenizer.save_pretrained") from None


def _read_meta(src: Path) -> dict:
    """fxquant.json of a directory fxquant.save wrote; anything else is refused saying what it is."""
    if not src.exists():
        raise ModelLoadError(f"'{src}' does not exist: {_FXQUANT_DIR}; check the path")
    if not src.is_dir():
        raise ModelLoadError(f"'{src}' is a file, not a directory: {_FXQUANT_DIR}; load a single model file "
                             "(.gguf) with fxquant.models.load_model")
    if not (src / META).is_file():
        hint = (f"it has a {CONFIG}, so it looks like a plain transformers directory: load it with "
                "fxquant.models.load_model or transformers' AutoModelForCausalLM.from_pretrained"
                if (src / CONFIG).is_file() else _FXQUANT_DIR)
        raise ModelLoadError(f"'{src}' has no {META}: it was not written by fxquant.save; {hint}")
    meta = _json_object(src / META, _SAVE_AGAIN)
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"'{src / META}' has format {meta.get('format')!r}; this fxquant reads {FORMAT!r}")
    return meta


def _read_config(src: Path):
    """The transformers config in config.json, refused by name when missing, damaged or rejected."""
    from transformers import AutoConfig

    path = src / CONFIG
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is missing: without it the architecture cannot be rebuilt; {_SAVE_AGAIN}")
    if "model_type" not in _json_object(path, _SAVE_AGAIN):
        raise ModelLoadError(f"'{path}' has no 'model_type', so transformers cannot tell which architecture to "
                             f"build; {_SAVE_AGAIN}")
    try:
        return AutoConfig.from_pretrained(src)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError or TypeError for a config it rejects
        raise ModelLoadError(f"'{path}' is rejected by transformers' AutoConfig ({type(exc).__name__}: {exc}); "
                             f"{_SAVE_AGAIN} (or use the transformers version that saved it)") from None


def _read_generation_config(src: Path):
    """The GenerationConfig in generation_config.json, or None when the model was saved without one."""
    from transformers import GenerationConfig

    path = src / GENERATION
    if not path.exists():
        return None
    fix = f"save the model again, or delete the file to generate with the defaults from {CONFIG}"
    _json_object(path, fix)
    try:
        return GenerationConfig.from_pretrained(src)
    except Exception as exc:  # transformers raises ValueError, TypeError or AttributeError for a value it rejects
        raise ModelLoadError(f"'{path}' is rejected by transformers' GenerationConfig "
                             f"({type(exc).__name__}: {exc}); {fix}") from None


def _save_generation_config(model, out: Path) -> None:
    """Write the model's generation config (validated before anything is written), or drop a stale one."""
    generation = getattr(model, "generation_config", None)
    if generation is None:
        (out / GENERATION).unlink(missing_ok=True)  # from an earlier save into the same directory
        return
    try:
        generation.save_pretrained(out)  # validates first; creates `out`
    except ValueError as exc:
        raise ModelLoadError(f"cannot save model.generation_config: transformers rejects it ({exc}); fix it, or set "
                             "it to None to save without one") from None


def _check_tokenizer_files(src: Path) -> None:
    """The tokenizer's JSON files present must parse as JSON objects (cheap; the tokenizer is not built)."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            _json_object(src / name, "save the tokenizer again with tokenizer.save_pretrained")


def _json_object(path: Path, fix: str) -> dict:
    """The JSON object in `path`; an unreadable, truncated or non-object file is refused by name."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"'{path}' is not valid JSON (truncated or damaged: {exc}); {fix}") from None
    except OSError as exc:
        raise ModelLoadError(f"'{path}' cannot be read ({exc}); {fix}") from None
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
        raise ModelLoadError(f"'{path}' holds a JSON {kind}, not an object; {fix}")
    return data


def _version() -> str:
    try:
        return version("fxquant")
    except PackageNotFoundError:
        return "unknown"


def _tensor_records(path: Path) -> dict:
    """{name: {shape, dtype, crc32}} of every tensor as written in the safetensors file."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            out[key] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "crc32": _crc(t)}
    return out


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes()) if t.numel() else 0


def _check_tensors(path: Path, records: dict | None) -> None:
    """Refuse a weights file that is missing, unreadable, truncated, or differs from what was saved."""
    if not path.is_file():
        raise ModelLoadError(f"'{path}' is missing: the directory has {META} but no weights")
    if records is None:
        raise ModelLoadError(f"'{path.parent / META}' lists no tensors: it was written by an older fxquant; save again")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for name, rec in records.items():
                if name not in keys:
                    raise ModelLoadError(f"'{path}' has no tensor '{name}', which was saved")
                t = f.get_tensor(name)
                if list(t.shape) != rec["shape"] or str(t.dtype).removeprefix("torch.") != rec["dtype"]:
                    raise ModelLoadError(f"tensor '{name}' in '{path}' is {str(t.dtype)} {list(t.shape)}, but "
                                         f"{rec['dtype']} {rec['shape']} was saved")
                if _crc(t) != rec["crc32"]:
                    raise ModelLoadError(f"tensor '{name}' in '{path}' is corrupted: its bytes do not match the "
                                         "checksum recorded when it was saved")
            extra = sorted(keys - set(records))
            if extra:
                raise ModelLoadError(f"'{path}' holds tensor '{extra[0]}', which was not saved with this model")
    except SafetensorError as exc:
        raise ModelLoadError(f"'{path}' cannot be read as safetensors (truncated or damaged?): {exc}") from None


def _check_shapes(model, path: Path, records: dict) -> None:
    """Name the first saved tensor the rebuilt model has no place for, or a place of another shape."""
    state = model.state_dict()
    for name, rec in records.items():
        if name not in state:
            raise ModelLoadError(f"tensor '{name}' in '{path}' has no parameter in the rebuilt "
                                 f"{type(model).__name__}: the config does not match these weights")
        if list(state[name].shape) != rec["shape"]:
            raise ModelLoadError(f"tensor '{name}' in '{path}' has shape {rec['shape']}, but the rebuilt "
                                 f"{type(model).__name__} expects {list(state[name].shape)}: the config does not "
                                 "match these weights")


def _fresh(config, device=None, dtype=None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device(device or "cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def _saved_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating tensor in a safetensors file (the model is rebuilt in it)."""
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}.get(
                t.get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def _swapped_modules(model, fresh) -> dict:
    """Modules whose type differs from the architecture's: only types fxquant itself installs."""
    out = {}
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        if name in fresh_modules and type(module) is not type(fresh_modules[name]):
            if isinstance(module, QuantizedLinear):
                out[name] = {"type": "QuantizedLinear", **module.spec()}
                continue
            if isinstance(module, DecodeLinear) and type(fresh_modules[name]) is torch.nn.Linear:
                continue  # a lowered float linear saves as the float linear it is (its parameters)
            if not isinstance(module, torch.nn.RMSNorm) or module.weight is not None:
                raise ModelLoadError(f"cannot save module '{name}' of type {type(module).__name__}: fxquant only "
                                     "records the weightless RMSNorm its layernorms_to_rms pass installs and the "
                                     "QuantizedLinear its pack pass installs")
            out[name] = {"type": "RMSNorm", "width": list(module.normalized_shape), "eps": module.eps}
    return out


def _build_module(path: str, spec: dict, dtype: torch.dtype) -> torch.nn.Module:
    kind = spec.get("type")
    if kind == "QuantizedLinear":
        fields = {k: v for k, v in spec.items() if k != "type"}
        try:
            return QuantizedLinear.from_spec(fields, dtype)
        except (TypeError, RecipeError) as exc:
            raise ModelLoadError(f"module '{path}': the saved QuantizedLinear fields {sorted(fields)} do not match "
                                 f"this fxquant's ({exc})") from None
    if kind != "RMSNorm":
        raise ModelLoadError(f"module '{path}': unknown saved type {kind!r}; known: ['QuantizedLinear', 'RMSNorm']")
    return torch.nn.RMSNorm(spec["width"], eps=spec["eps"], elementwise_affine=False)


def _check_replaced(model, path: str, new: torch.nn.Module, src: Path) -> None:
    """A packed layer must have the shape the config gives the layer it replaces."""
    if not isinstance(new, QuantizedLinear):
        return
    try:
        old = model.get_submodule(path)
    except AttributeError:
        raise ModelLoadError(f"'{src / META}' records a packed layer '{path}', which the model built from "
                             f"'{src / 'config.json'}' does not have: the config does not match these weights") from None
    shape = tuple(canonical(old.weight, new.transposed).shape)
    if shape != (new.out_features, new.in_features):
        raise ModelLoadError(f"packed layer '{path}' in '{src / WEIGHTS}' is {new.out_features}x{new.in_features} "
                             f"(out x in), but '{src / 'config.json'}' builds it {shape[0]}x{shape[1]}: the config "
                             "does not match these weights")


def _extra_parameters(model, fresh) -> dict:
    known = {name for name, _ in fresh.named_parameters()}
    return {name: list(p.shape) for name, p in model.named_parameters() if name not in known}


def _hooks(model) -> dict:
    out = {}
    for name, module in model.named_modules():
        ours = [{"type": type(p).__name__, **dataclasses.asdict(p)} for h in module._forward_pre_hooks.values()
                if isinstance(h, tuple(_HOOKS.values())) for p in portable_hooks(h)]
        if ours:
            out[name] = ours
    return out
