"""Perplexity of SmolLM2 under each rotation / round-to-nearest recipe, and the time to apply it.

Usage: python bench/rotations.py [--model smollm2] [--n-eval 24] [--group-size 64] [--recipes a,b+field=v,...]
Each recipe runs on a freshly loaded model; one markdown row per recipe goes to stdout. The figures
go to docs/BENCHMARKS.md, "Rotations and round-to-nearest quantization".
"""
from __future__ import annotations

import argparse
import platform
import time
import tomllib

import torch

from fxquant.api import apply_recipe
from fxquant.config import WeightQuantConfig
from fxquant.eval import EvalSplit, default_tokens, eval_windows, perplexity
from fxquant.models import load_model
from fxquant.recipes import load_recipe

RECIPES = ["float", "rotate-r1r2", "w8a8", "rotate-r1r2-w8a8", "w4a8", "rotate-r1r2-w4a8",
           "w4a16", "rotate-r1r2-w4a16", "w16a4", "rotate-r1r2-w16a4"]


def _value(text: str):
    """A TOML value (`true`, `64`, `"x"`), or the bare word itself as a string (`float32`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _recipe(name: str, group_size: int) -> dict | None:
    """`preset` or `preset+field=value+...` (e.g. `rotate-r1r2-w16a4+symmetric=false`) -> a recipe dict."""
    if name == "float":
        return None
    preset, *pairs = name.split("+")
    fields = {k: _value(v) for k, _, v in (p.partition("=") for p in pairs)}
    grouped = any(isinstance(c, WeightQuantConfig) and c.group_size for _, c in load_recipe(preset).steps)
    return {"preset": preset, **({"group_size": group_size} if grouped else {}), **fields}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-eval", type=int, default=EvalSplit.n_eval)
    p.add_argument("--group-size", type=int, default=64,
                   help="replaces the group of grouped int4 presets (SmolLM2's 576 = 9 * 64; per-channel ones are kept)")
    p.add_argument("--recipes", default=",".join(RECIPES))
    args = p.parse_args(argv)
    print(f"# {args.model}, last {args.n_eval} windows of {EvalSplit.seq_len} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, Python {platform.python_version()}")
    print("| recipe | perplexity | apply (s) | passes (s) |\n|---|---|---|---|")
    for name in args.recipes.split(","):
        model, tokenizer = load_model(args.model)
        windows = eval_windows(default_tokens(tokenizer), EvalSplit(n_eval=args.n_eval))
        recipe, apply_s, passes_s = _recipe(name, args.group_size), 0.0, 0.0
        if recipe is not None:
            start = time.perf_counter()
            result = apply_recipe(model, recipe)
            apply_s, passes_s = time.perf_counter() - start, sum(result.seconds.values())
        label = name + (f" (g{args.group_size})" if recipe and "group_size" in recipe else "")
        print(f"| {label} | {perplexity(model, windows):.3f} | {apply_s:.1f} | {passes_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
