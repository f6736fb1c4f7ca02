"""Learned against fixed rotations on SmolLM2: perplexity, and the time to learn them on this machine.

Usage: python bench/spinquant.py [--model smollm2] [--calibration 32] [--threads N]
                                 [--recipes quarot-gptq-w4a4kv4,spinquant-w4a4kv4+steps=150,...]
Each recipe (`preset+field=value+...` as bench/rotations.py takes, or `+pass.field=value` for one
pass) runs on a freshly loaded model
with the same calibration windows (the first `--calibration` x 512 tokens of the default text,
disjoint from the eval windows) and seed; perplexity is on the default eval split. For recipes with
learn_rotations the row gives its steps, seconds per step and the training loss of its first and
last step. The figures go to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from fxquant.api import apply_recipe
from fxquant.eval import EvalSplit, calibration_windows, default_tokens, eval_windows, perplexity
from fxquant.models import load_model
from fxquant.recipes import load_recipe, parse_value

FP32 = 9.807  # SmolLM2 on the default split (docs/BENCHMARKS.md)


def _recipe(name: str) -> dict:
    """`preset+field=value+pass.field=value...`: a plain field overrides it in every pass that has it,
    `pass.field` only in that pass (`quantize_activations.symmetric=false` leaves GPTQ's alone)."""
    preset, *pairs = name.split("+")
    recipe = load_recipe(preset).to_dict()
    for key, _, value in (p.partition("=") for p in pairs):
        step, _, field = key.rpartition(".")
        if not step:
            recipe[field] = parse_value(value)
            continue
        for entry in recipe["passes"]:
            if entry["pass"] == step:
                entry[field] = parse_value(value)
    return recipe


def _learning(result) -> str:
    """'steps | s/step | loss first -> last' of the run's learn_rotations step, or blanks."""
    found = result.results.get("learn_rotations")
    if found is None:
        return " | |"
    trained = found.changes[0].detail  # "N steps in S s; loss a (step 1) -> b (step N); ..."
    steps, seconds = int(trained.split()[0]), result.seconds["learn_rotations"]
    loss = trained.split("; ")[1].replace("loss ", "")
    return f" {steps} | {seconds / max(1, steps):.2f} | {loss}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calibration", type=int, default=32, help="calibration windows of 512 tokens")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--recipes", default="quarot-gptq-w4a4kv4,spinquant-w4a4kv4")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, Python "
          f"{platform.python_version()}, {args.calibration} calibration windows of 512 tokens")
    print("| recipe | perplexity | x FP32 | apply (s) | learn (s) | steps | s/step | training loss |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in args.recipes.split(","):
        model, tokenizer = load_model(args.model)
        tokens = default_tokens(tokenizer)
        calibration = [w[None] for w in calibration_windows(tokens, args.calibration)]
        start = time.perf_counter()
        result = apply_recipe(model, _recipe(name), calibration=calibration, progress=True)
        apply_s = time.perf_counter() - start
        ppl = perplexity(model, eval_windows(tokens, EvalSplit()))
        learn_s = result.seconds.get("learn_rotations", 0.0)
        print(f"| {name} | {ppl:.3f} | {ppl / FP32:.3f} | {apply_s:.1f} | {learn_s:.1f} |{_learning(result)} |",
              flush=True)


if __name__ == "__main__":
    main()
