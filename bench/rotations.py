"""Perplexity of SmolLM2 under each recipe, the time to apply it and the memory it took.

Usage: python bench/rotations.py [--model smollm2] [--n-eval 24] [--group-size 64] [--calibration 32]
                                 [--recipes a,b+field=v,...]
Each recipe runs on a freshly loaded model; one markdown row per recipe goes to stdout. Calibrated
recipes (AWQ, SmoothQuant) get the first `--calibration` windows of 512 tokens of the default text,
which never overlap the eval windows. "peak MiB" is the largest resident memory of the process while
the recipe was applied, above what it was just before (the calibration's activations, the searches).
The figures go to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import platform
import threading
import time
from contextlib import contextmanager

import torch

from fxquant.api import apply_recipe
from fxquant.eval import EvalSplit, calibration_windows, default_tokens, eval_windows, perplexity
from fxquant.models import load_model
from fxquant.recipes import load_recipe, parse_value

RECIPES = ["float", "rotate-r1r2", "w8a8", "rotate-r1r2-w8a8", "w4a8", "rotate-r1r2-w4a8",
           "w4a16", "rotate-r1r2-w4a16", "w16a4", "rotate-r1r2-w16a4"]


def _recipe(name: str, group_size: int) -> dict | None:
    """`preset` or `preset+field=value+...` (e.g. `rotate-r1r2-w16a4+symmetric=false`) -> a recipe dict."""
    if name == "float":
        return None
    preset, *pairs = name.split("+")
    fields = {k: parse_value(v) for k, _, v in (p.partition("=") for p in pairs)}
    grouped = any(getattr(c, "group_size", None) for _, c in load_recipe(preset).steps)
    return {"preset": preset, **({"group_size": group_size} if grouped else {}), **fields}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


@contextmanager
def peak_rss(out: list):
    """Sample resident memory every 50 ms; append (peak - start) in MiB to `out` on exit."""
    start, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], _rss_mib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        out.append(max(peak[0], _rss_mib()) - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-eval", type=int, default=EvalSplit.n_eval)
    p.add_argument("--group-size", type=int, default=64,
                   help="replaces the group of grouped int4 presets (SmolLM2's 576 = 9 * 64; per-channel ones are kept)")
    p.add_argument("--calibration", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    p.add_argument("--recipes", default=",".join(RECIPES))
    args = p.parse_args(argv)
    print(f"# {args.model}, last {args.n_eval} windows of {EvalSplit.seq_len} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, Python {platform.python_version()}")
    print("| recipe | perplexity | apply (s) | passes (s) | peak MiB |\n|---|---|---|---|---|")
    for name in args.recipes.split(","):
        model, tokenizer = load_model(args.model)
        tokens = default_tokens(tokenizer)
        windows = eval_windows(tokens, EvalSplit(n_eval=args.n_eval))
        calibration = [w[None] for w in calibration_windows(tokens, args.calibration)]
        recipe, apply_s, passes_s, peak = _recipe(name, args.group_size), 0.0, 0.0, [0.0]
        if recipe is not None:
            start = time.perf_counter()
            with peak_rss(peak):
                result = apply_recipe(model, recipe, calibration=calibration)
            apply_s, passes_s = time.perf_counter() - start, sum(result.seconds.values())
        label = name + (f" (g{args.group_size})" if recipe and "group_size" in recipe else "")
        print(f"| {label} | {perplexity(model, windows):.3f} | {apply_s:.1f} | {passes_s:.1f} | {peak[-1]:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
