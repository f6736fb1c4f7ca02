"""Perplexity of every preset before and after `fxquant.lower`: the kernels' numerics, measured.

Usage: python bench/lowering.py [--n-eval 24] [--calibration 4] [--presets a,b,...] [--fast] [--noise]
                              [--json out.json]

For each preset on SmolLM2 (group_size 64 where the preset groups: 576 = 9 * 64): the packed model
(reference ops), the model lowered with plan="measure" (the kernels a 512-token window runs on
this machine) and with plan="decode" (the decode kernels, bfloat16 activations, at every M: what
`generate` computes token by token). The acceptance bound is 0.2% of the packed perplexity.
Calibrated presets get `--calibration` windows (their codes, not their quality, are under test).
`--noise` adds the noise floor: the packed model with its embedding output multiplied by
(1 + 1e-7 n), n ~ N(0, 1): float32 rounding-sized differences, which a model whose 4-bit activation
quantizers flip codes on them (W4A4) turns into a perplexity change of its own size.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

from fxquant.api import apply_recipe
from fxquant.eval import EvalSplit, calibration_windows, default_tokens, eval_windows, perplexity
from fxquant.lowering import lower
from fxquant.models import load_model
from fxquant.recipes import PRESETS, load_recipe


def _decoding(model):
    """`model` (lowered) with every layer on its decode kernel at every M: what generate computes."""
    from fxquant.runtime.lowered import DecodeLinear, LoweredLinear

    for module in model.modules():
        if isinstance(module, LoweredLinear):
            module.plan = dataclasses.replace(module.plan, max_decode_m=2 ** 62)
        elif isinstance(module, DecodeLinear):
            module.max_decode_m = 2 ** 62
    return model


def _with_noise(model, windows) -> float:
    """Perplexity of `model` with (1 + 1e-7 n) on its embedding output (a seeded draw)."""
    gen = torch.Generator().manual_seed(0)
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, i, out: out * (1 + 1e-7 * torch.randn(out.shape, generator=gen)))
    try:
        return perplexity(model, windows, progress=False)
    finally:
        handle.remove()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-eval", type=int, default=24)
    p.add_argument("--calibration", type=int, default=4)
    p.add_argument("--presets", default=",".join(sorted(PRESETS)))
    p.add_argument("--noise", action="store_true", help="add the float32-rounding noise floor column")
    p.add_argument("--fast", action="store_true",
                   help="add plan='fast' with every layer on its decode kernel at every M (what generate computes)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    base, tokenizer = load_model(args.model)
    tokens = default_tokens(tokenizer)
    windows = eval_windows(tokens, EvalSplit(n_eval=args.n_eval))
    calibration = [w[None] for w in calibration_windows(tokens, args.calibration)]
    rows, worst = [], 0.0
    print(f"{'preset':24s} {'packed':>9s} {'measure':>9s} {'change':>8s} {'decode':>9s} {'change':>8s}"
          + (f" {'fast':>9s} {'change':>8s}" if args.fast else "")
          + (f" {'noise':>9s} {'change':>8s}" if args.noise else ""))
    for name in args.presets.split(","):
        grouped = any(getattr(c, "group_size", None) for _, c in load_recipe(name).steps)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        apply_recipe(model, {"preset": name, **({"group_size": 64} if grouped else {})}, calibration=calibration)
        row = {"preset": name, "packed": perplexity(model, windows, progress=False)}
        for plan in ("measure", "decode"):
            lowered = lower(copy.deepcopy(model), plan=plan)
            row[plan] = perplexity(lowered, windows, progress=False)
            del lowered
        keys = ("measure", "decode")
        if args.fast:
            row["fast"] = perplexity(_decoding(lower(copy.deepcopy(model), plan="fast")), windows, progress=False)
            keys += ("fast",)
        if args.noise:
            row["noise"] = _with_noise(model, windows)
            keys += ("noise",)
        changes = [100 * (row[k] / row["packed"] - 1) for k in keys]
        worst = max(worst, *map(abs, changes[:2]))
        cells = " ".join(f"{row[k]:9.4f} {c:+7.3f}%" for k, c in zip(keys, changes))
        print(f"{name:24s} {row['packed']:9.4f} {cells}  ({time.perf_counter() - start:.0f} s)", flush=True)
        rows.append(row)
    print(f"\nlargest change: {worst:.3f}% (bound 0.2%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
