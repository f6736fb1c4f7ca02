"""Prefill time and decode speed of float and quantized models, before and after `fxquant.lower`.

Usage: python bench/speed.py [--model smollm2] [--presets w4a16:64,w8a8,quarot-w4a4kv4]
                             [--prompt 512] [--new 32] [--repeats 3] [--plans measure,fast]
                             [--compile] [--backend] [--json out.json]

In one process, one model at a time: float32, bfloat16, and for each preset (NAME, NAME:GROUP,
NAME+lm_head: the output layer quantized too)
the packed model and the same model lowered. Prefill = one forward of `--prompt` tokens (fastest of
`--repeats`); decode = greedy `generate` at batch 1, (t(new + 1 tokens) - t(1 token)) / new, the
same prompt (fastest runs). `--compile` adds each model under `torch.compile` (inductor); `--backend` adds each packed preset
under `torch.compile(backend="fxquant")` (which lowers it per plan, then inductor). Ratios are
against float32 eager and bfloat16 eager of the same run, since the machines are noisy; bfloat16 is
measured first and again last, and the faster of the two is the baseline (the machine's speed
drifts within a run: a slow baseline would flatter every ratio).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from fxquant.api import quantize
from fxquant.lowering import lower, lowering_report
from fxquant.models import load_model
from fxquant.recipes import load_recipe


def _time(fn, repeats: int) -> float:
    """The fastest of `repeats` runs: other load on the machine only ever slows a run down."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return min(runs)


def measure(model, ids: torch.Tensor, new: int, repeats: int) -> dict:
    """{'prefill_ms', 'decode_tok_s'} for `model` on prompt `ids` [1, T]."""
    def gen(n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        gen(2)  # warm up: kernels, caches, lazily built tables
        prefill = _time(lambda: model(ids), repeats)
        one, full = _time(lambda: gen(1), repeats), _time(lambda: gen(new + 1), repeats)
    return {"prefill_ms": prefill * 1e3, "decode_tok_s": new / max(full - one, 1e-9)}


def _preset(spec: str) -> tuple[str, dict]:
    """NAME[:GROUP][+lm_head] -> (label, recipe): `+lm_head` adds quantize_lm_head right after the
    weight quantizer, with its fields (the output layer in the same format)."""
    base, plus, extra = spec.partition("+")
    name, _, group = base.partition(":")
    recipe = load_recipe(name).to_dict()
    if plus:
        if extra != "lm_head":
            raise SystemExit(f"unknown suffix +{extra} in {spec!r} (known: +lm_head)")
        at = next(i for i, step in enumerate(recipe["passes"]) if step["pass"] in ("quantize_weights", "gptq"))
        fields = {k: v for k, v in recipe["passes"][at].items() if k in ("bits", "symmetric", "group_size",
                                                                           "clip_ratio", "clip_search", "zero_point")}
        recipe["passes"].insert(at + 1, {"pass": "quantize_lm_head", **fields})
    if group:
        recipe["group_size"] = int(group)
    return spec, recipe


def _record_backend(rows, name, model, plan, run) -> None:
    """One row for `model` (packed, not lowered) under torch.compile(backend="fxquant"); the compile
    time (prefill and decode graphs, in the warm-up) is printed, not counted."""
    ids, args = run
    target = copy.copy(model)
    target.forward = torch.compile(model.forward, backend="fxquant", dynamic=True, options={"plan": plan})
    start = time.perf_counter()
    with torch.inference_mode():  # every graph the measurement meets: forward alone, prefill, decode steps
        target(ids)
        target.generate(ids, max_new_tokens=args.new + 1, min_new_tokens=args.new + 1, do_sample=False)
    print(f"  compiled with the fxquant backend in {time.perf_counter() - start:.1f} s", flush=True)
    row = {"model": name, **measure(target, ids, args.new, args.repeats)}
    rows.append(row)
    print(f"{row['model']:32s} prefill {row['prefill_ms']:8.1f} ms   decode {row['decode_tok_s']:6.1f} tok/s", flush=True)
    torch._dynamo.reset()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--presets", default="w4a16:64,w8a8,quarot-w4a4kv4")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plans", default="measure", help="lowering plans to measure, e.g. measure,fast")
    p.add_argument("--compile", action="store_true", help="also measure each model under torch.compile")
    p.add_argument("--backend", action="store_true", help="also measure each preset under the fxquant backend")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base, _ = load_model(args.model)
    ids = torch.randint(0, base.config.vocab_size, (1, args.prompt))
    rows = []

    def record(name, model):
        for compiled in ([False, True] if args.compile else [False]):
            target = model
            if compiled:
                target = copy.copy(model)
                target.forward = torch.compile(model.forward, dynamic=True)
            row = {"model": name + (" +compile" if compiled else ""), **measure(target, ids, args.new, args.repeats)}
            rows.append(row)
            print(f"{row['model']:32s} prefill {row['prefill_ms']:8.1f} ms   decode {row['decode_tok_s']:6.1f} tok/s",
                  flush=True)

    record("float32", base)
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    record("bfloat16", bf16)
    for spec in args.presets.split(","):
        label, recipe = _preset(spec)
        model = copy.deepcopy(base)
        quantize(model, recipe, verify=False)
        record(f"{label} packed", model)
        if args.backend:
            for plan in args.plans.split(","):
                _record_backend(rows, f"{label} +fxquant backend ({plan})", model, plan, (ids, args))
        for plan in args.plans.split(","):
            start = time.perf_counter()
            lower(model, plan=plan)
            print(f"  lowered ({plan}) in {time.perf_counter() - start:.1f} s:\n" + lowering_report(model).summary(),
                  flush=True)
            record(f"{label} lowered" + ("" if plan == "measure" else f" ({plan})"), model)
        del model
    record("bfloat16 (again, last)", bf16)  # the machine's speed drifts: the faster bfloat16 run is the baseline
    f32 = rows[0]
    b16 = max((r for r in rows if r["model"] in ("bfloat16", "bfloat16 (again, last)")), key=lambda r: r["decode_tok_s"])
    print(f"\n{'model':32s} {'prefill ms':>10s} {'x fp32':>7s} {'decode tok/s':>12s} {'x fp32':>7s} {'x bf16':>7s}")
    for r in rows:
        print(f"{r['model']:32s} {r['prefill_ms']:10.1f} {r['prefill_ms'] / f32['prefill_ms']:7.2f} "
              f"{r['decode_tok_s']:12.1f} {r['decode_tok_s'] / f32['decode_tok_s']:7.2f} "
              f"{r['decode_tok_s'] / b16['decode_tok_s']:7.2f}")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
