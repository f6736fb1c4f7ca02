"""Where a quantized recipe loses perplexity: its weight, activation and KV quantizers alone and together,
then each activation / KV lever alone and in combination, all on one model with the same rotations.

Usage: python bench/errors.py [--model smollm2] [--recipe quarot-gptq-w4a4kv4] [--n-eval 24]
                              [--calibration 32] [--threads 1] [--levers "NAME:field=v+field=v;..."]
The recipe (a preset or `preset+field=value+...`, as bench/rotations.py reads it) is split into its
transforms (rotations, folds), its weight quantizers (quantize_weights, gptq, awq_clip,
quantize_lm_head), `quantize_activations` and `quantize_kv_cache`; `pack` is dropped (it is
bit-identical). The transforms run once; the activation-only and KV-only rows hook the float
rotated model; the weight quantizers (GPTQ: calibrated on the float-activation model, as the recipe
orders it) then run once and every later row only swaps activation / KV quantizers on those
weights, so a lever costs one evaluation, not one GPTQ.

A lever is `NAME:field=value+field=value`, fields of ActQuantConfig or KVQuantConfig (a field
both have, `bits` or `symmetric`, sets both; `act.bits=8` / `kv.bits=8` name one) on top of the
recipe's own, plus `lm_head_bits=N` (the output layer's weight RTN N-bit symmetric per channel with
clip search, irreversible: such levers go last). A value `a|b|c` is searched: each is scored on
the first `--search-windows` calibration windows and the best is evaluated on the eval split.
`--act-aware FIELDS` runs GPTQ GPTAQ-style (act_aware) for the recipe's activation quantizer with
those lever fields, installed during the pass; the weights-only row then holds those weights.
One markdown row per measurement goes to stdout; the figures go to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rotations import _recipe  # noqa: E402  (bench/ is not a package)

from fxquant.api import apply_recipe  # noqa: E402
from fxquant.config import ActQuantConfig, KVQuantConfig, WeightQuantConfig  # noqa: E402
from fxquant.eval import EvalSplit, calibration_windows, default_tokens, eval_windows, perplexity  # noqa: E402
from fxquant.models import load_model  # noqa: E402
from fxquant.recipes import Recipe, load_recipe, parse_value  # noqa: E402
from fxquant.runtime.attention import ATTR  # noqa: E402
from fxquant.runtime.hooks import remove_activation_hooks  # noqa: E402

WEIGHT_PASSES = {"quantize_weights", "gptq", "awq_clip", "quantize_lm_head"}
LEVERS = ";".join([
    "asymmetric activations:act.symmetric=false",
    "activation clip 0.9:clip_ratio=0.9",
    "KV clip 0.95:kv_clip_ratio=0.95",
    "KV clip searched:kv_clip_ratio=1.0|0.95|0.9|0.85|0.8",
    "KV groups of 32:kv_group_size=32",
    "KV groups of 16:kv_group_size=16",
    "KV sinks 1:sink_tokens=1",
    "KV sinks 4:sink_tokens=4",
    "R4 inputs 8-bit:rotated_input_bits=8",
    "output layer W8A8:output_layer_bits=8+lm_head_bits=8",
])


def _split(recipe: Recipe) -> dict[str, list]:
    parts = {"transforms": [], "weights": [], "acts": [], "kv": []}
    for key, cfg in recipe.steps:
        if key == "pack":
            continue
        part = ("weights" if key in WEIGHT_PASSES else "acts" if key == "quantize_activations"
                else "kv" if key == "quantize_kv_cache" else "transforms")
        parts[part].append((key, cfg))
    return parts


def _apply(model, steps, calibration=None) -> None:
    if steps:
        apply_recipe(model, Recipe("errors", tuple(steps)), calibration=calibration, verify=False, rollback=False)


def strip_quantizers(model) -> None:
    """Remove every activation quantizer hook and turn every KV quantizer off (R3 stays)."""
    for module in model.modules():
        remove_activation_hooks(module)
        transform = getattr(module, ATTR, None)
        if transform is not None and transform.kv_bits is not None:
            setattr(module, ATTR, dataclasses.replace(transform, kv_bits=None))


def _lever(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    return name.strip(), {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in spec.split("+") if p)}


def _configs(act: ActQuantConfig, kv: KVQuantConfig, fields: dict) -> tuple:
    """The lever's (act, kv, lm_head_bits) from the recipe's configs and `fields` (already parsed)."""
    act_f, kv_f, head = {}, {}, fields.pop("lm_head_bits", None)
    for key, value in fields.items():
        scope, _, field = key.rpartition(".")
        hits = [d for d, cls, name in ((act_f, ActQuantConfig, "act"), (kv_f, KVQuantConfig, "kv"))
                if scope in ("", name) and field in {f.name for f in dataclasses.fields(cls)}]
        if not hits:
            raise SystemExit(f"lever field {key!r} is not a field of ActQuantConfig or KVQuantConfig")
        for target in hits:
            target[field] = value
    return dataclasses.replace(act, **act_f), dataclasses.replace(kv, **kv_f), head


class Bench:
    def __init__(self, args):
        self.model, tokenizer = load_model(args.model)
        tokens = default_tokens(tokenizer)
        self.windows = eval_windows(tokens, EvalSplit(n_eval=args.n_eval))
        self.calibration = calibration_windows(tokens, args.calibration)
        self.search = self.calibration[:args.search_windows]
        self.reference = None

    def row(self, label: str, what: str, windows=None) -> float:
        start = time.perf_counter()
        ppl = perplexity(self.model, self.windows if windows is None else windows, progress=False)
        if windows is not None:
            return ppl
        self.reference = self.reference or ppl
        print(f"| {label} | {what} | {ppl:.3f} | {ppl / self.reference:.3f} | {time.perf_counter() - start:.0f} |",
              flush=True)
        return ppl

    def quantizers(self, act, kv) -> None:
        strip_quantizers(self.model)
        steps = [s for s in (("quantize_activations", act), ("quantize_kv_cache", kv)) if s[1]]
        _apply(self.model, steps, [w[None] for w in self.calibration])  # for act_clip_search


def _searched(bench: Bench, act, kv, raw: dict) -> dict:
    """Parse the lever's values; a value `a|b|...` is chosen by perplexity on the search windows."""
    fields = {k: parse_value(v) for k, v in raw.items() if "|" not in v}
    for key, value in ((k, v) for k, v in raw.items() if "|" in v):
        scores = {}
        for option in (parse_value(o) for o in value.split("|")):
            a, k, _ = _configs(act, kv, {**fields, key: option})
            bench.quantizers(a, k)
            scores[option] = bench.row("", "", bench.search)
        fields[key] = min(scores, key=scores.get)
        print(f"<!-- {key} searched on {len(bench.search)} calibration windows: "
              + ", ".join(f"{o}: {s:.3f}" for o, s in scores.items()) + f" -> {fields[key]} -->", flush=True)
    return fields


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--recipe", default="quarot-gptq-w4a4kv4")
    p.add_argument("--n-eval", type=int, default=EvalSplit.n_eval)
    p.add_argument("--calibration", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    p.add_argument("--search-windows", type=int, default=4, help="calibration windows a searched value is scored on")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--levers", default=LEVERS, help="';'-separated NAME:field=value+... ('' for none)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the weights-only / A-only / KV-only rows")
    p.add_argument("--act-aware", default=None, metavar="FIELDS",
                   help="GPTAQ: run gptq with act_aware=true for the recipe's activation quantizer with these "
                        "lever fields (field=value+...; '' for the recipe's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(_recipe(args.recipe, 64) or "quarot-float")
    parts = _split(recipe)
    (_, act), = parts["acts"] or [(None, None)]
    (_, kv), = parts["kv"] or [(None, None)]
    bench = Bench(args)
    print(f"# {args.model}, {recipe}, last {args.n_eval} windows of {EvalSplit.seq_len} tokens, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}")
    print("| row | quantized | perplexity | x float | eval s |\n|---|---|---|---|---|")
    _apply(bench.model, parts["transforms"])
    bench.row("float, same rotations", "nothing")  # the x float column's reference
    if not args.no_breakdown:
        for label, a, k in (("activations only", act, None), ("KV only", None, kv)):
            if a or k:
                bench.quantizers(a, k)
                bench.row(label, "A" if a else "KV")
        strip_quantizers(bench.model)
    weights = parts["weights"]
    if args.act_aware is not None:  # GPTAQ: GPTQ solves for these activation quantizers (on during the pass)
        aware_act, _, _ = _configs(act, kv, {k: parse_value(v) for k, v in _lever(":" + args.act_aware)[1].items()})
        bench.quantizers(aware_act, None)
        weights = [(key, dataclasses.replace(cfg, act_aware=True) if key == "gptq" else cfg) for key, cfg in weights]
        print(f"<!-- GPTQ act_aware for {aware_act} -->", flush=True)
    _apply(bench.model, weights, [w[None] for w in bench.calibration])
    if not args.no_breakdown:
        bench.row("weights only", "W")
    bench.quantizers(act, kv)
    bench.row(args.recipe, "W + A + KV (the recipe)")
    for name, raw in (_lever(t) for t in args.levers.split(";") if t.strip()):
        fields = _searched(bench, act, kv, raw)
        a, k, head = _configs(act, kv, dict(fields))
        if head is not None:
            _apply(bench.model, [("quantize_lm_head", WeightQuantConfig(bits=head, clip_search=True))])
        bench.quantizers(a, k)
        bench.row(name, "+".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
