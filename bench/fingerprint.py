"""Every preset's perplexity on SmolLM2 to 4 decimals: a fingerprint that a refactor must leave unchanged.

Usage: python bench/fingerprint.py [--n-eval 2] [--calibration 4] [--presets a,b,...] > before.txt
Run it on two commits and diff the outputs: a refactor that changes no behaviour prints the same
lines. Small defaults (2 eval windows, 4 calibration windows of 512 tokens) keep a whole sweep of the
presets affordable on 2 cores; the figures are for comparison, not the ones in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import time

from fxquant.api import apply_recipe
from fxquant.eval import EvalSplit, calibration_windows, default_tokens, eval_windows, perplexity
from fxquant.models import load_model
from fxquant.recipes import PRESETS, load_recipe


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-eval", type=int, default=2)
    p.add_argument("--calibration", type=int, default=4)
    p.add_argument("--presets", default=",".join(sorted(PRESETS)))
    args = p.parse_args(argv)
    for name in args.presets.split(","):
        model, tokenizer = load_model(args.model)
        tokens = default_tokens(tokenizer)
        windows = eval_windows(tokens, EvalSplit(n_eval=args.n_eval))
        grouped = any(getattr(c, "group_size", None) for _, c in load_recipe(name).steps)
        recipe = {"preset": name, **({"group_size": 64} if grouped else {})}  # SmolLM2's 576 = 9 * 64
        start = time.perf_counter()
        apply_recipe(model, recipe, calibration=[w[None] for w in calibration_windows(tokens, args.calibration)])
        print(f"{name}: {perplexity(model, windows, progress=False):.4f}  ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
