"""Every preset's perplexity on SmolLM2 to 4 decimals: a fingerprint that a refactor must leave unchanged.

Usage: python bench/fingerprint.py [--n-eval 2] [--calibration 4] [--presets a,b,...] [--hash] > before.txt
Run it on two commits and diff the outputs: a refactor that changes no behaviour prints the same
lines. Small defaults (2 eval windows, 4 calibration windows of 512 tokens) keep a whole sweep of the
presets affordable on 2 cores; the figures are for comparison, not the ones in docs/BENCHMARKS.md.
`--hash` prints a sha256 of the transformed model instead (every state-dict tensor, every input hook,
every attention transform, the attention implementation): equal hashes are bit-identical models, so
every perplexity is equal too, with no evaluation (use the presets' own grouping and calibration).
"""
from __future__ import annotations

import argparse
import hashlib
import time

import torch

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
    p.add_argument("--hash", action="store_true", help="a hash of the transformed model, not its perplexity")
    args = p.parse_args(argv)
    for name in args.presets.split(","):
        model, tokenizer = load_model(args.model)
        tokens = default_tokens(tokenizer)
        windows = eval_windows(tokens, EvalSplit(n_eval=args.n_eval))
        grouped = any(getattr(c, "group_size", None) for _, c in load_recipe(name).steps)
        recipe = {"preset": name, **({"group_size": 64} if grouped else {})}  # SmolLM2's 576 = 9 * 64
        start = time.perf_counter()
        apply_recipe(model, recipe, calibration=[w[None] for w in calibration_windows(tokens, args.calibration)])
        figure = model_hash(model) if args.hash else f"{perplexity(model, windows, progress=False):.4f}"
        print(f"{name}: {figure}  ({time.perf_counter() - start:.0f} s)", flush=True)


def model_hash(model) -> str:
    """sha256 (16 hex digits) of what a transformed model computes with: its tensors, hooks, transforms."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            h.update(f"{name}:{hook!r}".encode())
        if getattr(module, "fxquant_attention", None) is not None:
            h.update(f"{name}:{module.fxquant_attention!r}".encode())
    h.update(str(getattr(model.config, "_attn_implementation", "")).encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    main()
