"""The `fxquant` command line: quantize a model, inspect its structure, or measure its perplexity.

    fxquant quantize --model smollm2 [--recipe rotate-r1r2-w8a8] [--eval-windows N]
    fxquant inspect  --model smollm2|PATH|tiny-ARCH   # capture + analyse, print tables, dump graph
    fxquant eval     --model smollm2|PATH|DIR [--recipe NAME]   # perplexity (before -> after a recipe)
    fxquant generate --model DIR|smollm2 --prompt TEXT [--recipe NAME]   # stream text, print speed
    fxquant dump     --model smollm2 --recipe quarot-w4a4kv4 --out run.html   # the graph before/after every pass
    fxquant recipes  [NAME]   # list the presets, or print one preset's TOML file to copy and edit

Errors from fxquant exit with status 2 and their message, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fxquant.errors import FxquantError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except FxquantError as exc:
        print(f"fxquant: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxquant", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    q = sub.add_parser("quantize", help="apply a recipe to a model and print what changed")
    q.add_argument("--model", default="smollm2", help="smollm2 (default), a local HF dir or .gguf file, or tiny-ARCH")
    q.add_argument("--recipe", default=None, help="a preset name, or a .toml/.yaml recipe file "
                                                  "(default: rotate-r1r2-w8a8)")
    q.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field in every pass that has it, e.g. --set group_size=64 --set seed=3")
    q.add_argument("--eval-windows", type=int, default=0,
                   help="also measure perplexity before and after on this many eval windows (0: skip)")
    _calibration_flags(q)
    q.add_argument("--out", default=None, help="save the result here (fxquant.save: safetensors + JSON, "
                                               "plus the tokenizer); `fxquant eval --model DIR` loads it")
    q.set_defaults(run=_quantize)
    inspect = sub.add_parser("inspect", help="capture and analyse a model, print the structure found")
    inspect.add_argument("--model", required=True, help="smollm2, a local HF dir or .gguf file, or tiny-ARCH")
    inspect.add_argument("--dump-dir", default="dumps", help="where the graph text dump goes (default: dumps/)")
    inspect.add_argument("--full", action="store_true", help="one row per layer instead of folded rows")
    inspect.set_defaults(run=_inspect)
    ev = sub.add_parser("eval", help="perplexity on the default eval split (last 24 windows of 512 tokens)")
    ev.add_argument("--model", required=True, help="smollm2, or a local HF dir or .gguf file")
    ev.add_argument("--windows", type=int, default=24, help="number of eval windows (default 24)")
    ev.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    ev.add_argument("--recipe", default=None, help="quantize in memory with this preset or recipe file first, "
                                                   "and print perplexity before -> after")
    _calibration_flags(ev)
    ev.add_argument("--no-lower", action="store_true", help="evaluate the packed model on its reference ops "
                                                            "instead of lowering it to kernels first")
    ev.set_defaults(run=_eval)
    gen = sub.add_parser("generate", help="stream a greedy completion and print prefill and decode speed")
    gen.add_argument("--model", required=True, help="a directory fxquant quantize --out wrote, smollm2, a HF dir or .gguf")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (for timing)")
    gen.add_argument("--recipe", default=None, help="quantize in memory with this preset or recipe file first")
    gen.add_argument("--no-lower", action="store_true", help="run the reference ops instead of the kernels")
    _calibration_flags(gen)
    gen.set_defaults(run=_generate)
    dmp = sub.add_parser("dump", help="write one self-contained HTML page: the graph before and after every pass")
    dmp.add_argument("--model", required=True, help="smollm2, a local HF dir or .gguf file, or tiny-ARCH")
    dmp.add_argument("--recipe", default=None, help="a preset name, or a .toml/.yaml recipe file (default: none, "
                                                    "the captured graph and its analysis alone)")
    dmp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a field in every pass that has it, as for quantize")
    _calibration_flags(dmp)
    dmp.add_argument("--out", required=True, metavar="FILE.html", help="the page to write; open it from file://")
    dmp.set_defaults(run=_dump)
    rec = sub.add_parser("recipes", help="list the presets, or print one preset's TOML recipe file")
    rec.add_argument("name", nargs="?", metavar="NAME",
                     help="print this preset's file, to copy and edit: fxquant recipes w4a16 > mine.toml")
    rec.set_defaults(run=_recipes)
    return parser


def _recipes(args) -> int:
    """Every preset with what it does and its pass chain, or one preset's TOML file as packaged."""
    from fxquant.recipes import DEFAULT_RECIPE, PRESETS, preset_description, preset_text

    if args.name:
        print(preset_text(args.name), end="")
        return 0
    width = max(map(len, PRESETS))
    for name, steps in PRESETS.items():
        default = " (the default recipe)" if name == DEFAULT_RECIPE else ""
        print(f"{name:<{width}}  {preset_description(name)}{default}")
        print(f"{'':<{width}}  {' -> '.join(key for key, _ in steps)}")
    print("\nfxquant recipes NAME > mine.toml  prints a preset's file; edit it, then "
          "fxquant quantize --recipe mine.toml")
    return 0


def _dump(args) -> int:
    """Apply the recipe in memory, dumping every step into one HTML page (no recipe: the graph alone); prints
    the pass table as `quantize` does. The page goes where FXQUANT_DUMP points, set for this run only."""
    import os

    from fxquant.api import apply_recipe
    from fxquant.errors import RecipeError
    from fxquant.models import load_model
    from fxquant.recipes import recipe_with
    from fxquant.viz.html import dump

    if not args.out.endswith(".html"):
        raise RecipeError(f"--out {args.out!r} must name an .html file")
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    if not args.recipe:
        dump(model, args.out)
    else:
        recipe, before = recipe_with(args.recipe, _fields(args.set)), os.environ.get("FXQUANT_DUMP")
        os.environ["FXQUANT_DUMP"] = args.out
        try:
            result = apply_recipe(model, recipe, _calibration(tokenizer, args, model), progress=True)
        finally:
            if before is None:
                del os.environ["FXQUANT_DUMP"]
            else:
                os.environ["FXQUANT_DUMP"] = before
        _print_result(result)
    size = Path(args.out).stat().st_size / 2 ** 10
    print(f"dump: {Path(args.out).resolve().as_uri()} ({size:.0f} KiB, {time.perf_counter() - start:.1f} s); "
          "open it in a browser, offline")
    return 0


def _inspect(args) -> int:
    from fxquant.analysis import analyse
    from fxquant.capture import capture
    from fxquant.models import load_model
    from fxquant.viz import format_structure, graph_text

    t0 = time.perf_counter()
    model, _ = load_model(args.model)
    t1 = time.perf_counter()
    cg = capture(model)
    t2 = time.perf_counter()
    structure = analyse(cg)
    t3 = time.perf_counter()
    print(format_structure(structure, full=args.full))
    dump = Path(args.dump_dir) / f"{_slug(args.model)}.graph.txt"
    dump.parent.mkdir(parents=True, exist_ok=True)
    dump.write_text(graph_text(cg))
    print(f"\nmodel: {type(model).__name__}, {len(cg.graph.nodes)} graph nodes; graph dump: {dump}")
    print(f"time: load {t1 - t0:.1f}s, capture {t2 - t1:.2f}s, analyse {t3 - t2:.2f}s, "
          f"capture+analyse {t3 - t1:.2f}s")
    return 0


def _eval(args) -> int:
    from fxquant.errors import ModelLoadError
    from fxquant.eval import EvalSplit, default_tokens, eval_windows, perplexity

    model, tokenizer = _load_for_eval(args.model)
    if tokenizer is None:
        raise ModelLoadError(
            f"model {args.model!r} has no tokenizer, so the default text cannot be tokenized; "
            "eval needs smollm2, a .gguf file, or a HF directory with tokenizer files.")
    start = time.perf_counter()
    windows = eval_windows(default_tokens(tokenizer), EvalSplit(seq_len=args.seq_len, n_eval=args.windows))
    _lower(model, args.no_lower)
    ppl = perplexity(model, windows)
    print(f"eval split: last {args.windows} windows of {args.seq_len} tokens of pydoc_data.topics "
          f"({time.perf_counter() - start:.1f}s)")
    if args.recipe:
        from fxquant.api import apply_recipe

        calibration = _calibration(tokenizer, args, model)
        _print_result(apply_recipe(model, args.recipe, calibration, progress=True))
        _lower(model, args.no_lower)
        print(f"perplexity: {ppl:.4f} -> {perplexity(model, windows):.4f} ({args.recipe})")
        return 0
    print(f"perplexity: {ppl:.4f}")
    return 0


def _lower(model, skip: bool) -> None:
    """Lower a quantized model to kernels (unless `skip`) and print the report's summary."""
    from fxquant.lowering import lower, lowering_report
    from fxquant.runtime.linear import QuantizedLinear

    if skip or not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return
    start = time.perf_counter()
    lower(model)
    print(f"lowered in {time.perf_counter() - start:.1f}s (--no-lower to compare):\n{lowering_report(model).summary()}")


def _generate(args) -> int:
    import torch

    from fxquant.errors import ModelLoadError

    model, tokenizer = _load_for_eval(args.model)
    if tokenizer is None:
        raise ModelLoadError(f"model {args.model!r} has no tokenizer, so the prompt cannot be tokenized")
    if args.recipe:
        from fxquant.api import apply_recipe

        apply_recipe(model, args.recipe, _calibration(tokenizer, args, model))
    _lower(model, args.no_lower)
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    streamer = _TimedStreamer(tokenizer)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer,
                       min_new_tokens=args.max_new_tokens if args.ignore_eos else None)
    print()
    print(streamer.speed(ids.shape[1]))
    return 0


class _TimedStreamer:
    """Prints each new token as it comes and records when: prefill = time to the first new token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.times, self.tokens, self.printed = tokenizer, [], [], 0
        self.start = time.perf_counter()

    def put(self, value) -> None:
        if not self.times:  # the first call is the prompt itself
            self.times.append(time.perf_counter())
            self.start = self.times[0]
            return
        self.times.append(time.perf_counter())
        self.tokens += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        print(text[self.printed:], end="", flush=True)
        self.printed = len(text)

    def end(self) -> None:
        pass

    def speed(self, prompt_tokens: int) -> str:
        if len(self.times) < 2:
            return "no tokens generated"
        prefill = self.times[1] - self.times[0]
        decoded = len(self.times) - 2
        rate = decoded / (self.times[-1] - self.times[1]) if decoded else float("nan")
        return (f"prefill: {prompt_tokens} tokens in {prefill * 1e3:.0f} ms; decode: {decoded} tokens at "
                f"{rate:.1f} tok/s")


def _quantize(args) -> int:
    from fxquant.api import apply_recipe
    from fxquant.models import load_model
    from fxquant.recipes import DEFAULT_RECIPE, recipe_with

    recipe = recipe_with(args.recipe or DEFAULT_RECIPE, _fields(args.set))
    if args.out:
        recipe = _rotations_beside(recipe, args.out)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"model: {args.model} ({type(model).__name__}), loaded in {time.perf_counter() - start:.1f} s")
    before = _quick_ppl(model, tokenizer, args.eval_windows)
    _print_result(apply_recipe(model, recipe, _calibration(tokenizer, args, model), progress=True))
    if before is not None:
        after = _quick_ppl(model, tokenizer, args.eval_windows)
        print(f"perplexity on the last {args.eval_windows} eval windows: {before:.3f} -> {after:.3f}")
    if args.out:
        from fxquant.serialize import WEIGHTS, save

        out = save(model, args.out, recipe=recipe)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out)
        size = (out / WEIGHTS).stat().st_size / 2 ** 20
        print(f"saved to {args.out}: {WEIGHTS} {size:.1f} MiB (fxquant eval --model {args.out})")
    return 0


def _rotations_beside(recipe, out: str):
    """A learn_rotations step with no checkpoint file saves its rotations next to the model it makes
    (`OUT/rotations.safetensors`), so an interrupted run resumes and a finished one never retrains."""
    import dataclasses

    from fxquant.config import LearnRotationsConfig
    from fxquant.recipes import Recipe

    path = str(Path(out) / "rotations.safetensors")
    steps = tuple((key, dataclasses.replace(cfg or LearnRotationsConfig(), checkpoint=path))
                  if key == "learn_rotations" and (cfg is None or cfg.checkpoint is None) else (key, cfg)
                  for key, cfg in recipe.steps)
    return Recipe(recipe.name, steps)


def _print_result(result, limit: int = 5) -> None:
    """The recipe line, the table of passes, the timing line, then the first few things a pass
    declined to do with its reason (the table only counts them)."""
    from fxquant.viz import result_table

    print(f"{result.log[0]}\n\n{result_table(result)}\n\n{result.log[-1]}")
    blocked = [(name, b) for name, res in result.results.items() for b in res.blocked]
    for name, b in blocked[:limit]:
        print(f"  {name} blocked: {b}")
    if len(blocked) > limit:
        print(f"  ... and {len(blocked) - limit} more blocked (fxquant.apply_recipe(...).results has them all)")


def _fields(pairs: list[str]) -> dict:
    """`["group_size=64", "rotation=hadamard"]` -> {"group_size": 64, "rotation": "hadamard"} (TOML values;
    `group_size=none`: None, one scale per output channel)."""
    from fxquant.errors import RecipeError
    from fxquant.recipes import parse_value

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set expects FIELD=VALUE, got {pair!r}")
        out[key] = parse_value(value)
    return out


def _calibration_flags(parser) -> None:
    """The calibration flags every command that may run a calibrated recipe shares."""
    parser.add_argument("--calibration-windows", "--calibration", dest="calibration", type=int, default=32,
                        metavar="N", help="calibrated passes (AWQ, SmoothQuant, GPTQ) see N windows: the first N of "
                                          "the default text (never the eval windows), or of --calibration-file (default 32)")
    parser.add_argument("--calibration-seq", type=int, default=512, metavar="LEN",
                        help="tokens per calibration window (default 512)")
    parser.add_argument("--calibration-file", default=None, metavar="PATH",
                        help="calibrate on this text file instead of the default text, cut into windows")


def _calibration(tokenizer, args, model):
    """The calibration windows the flags ask for, one per batch, with a line saying what they are.
    A tiny random model has no tokenizer: it gets seeded random windows of 64 ids (a demo)."""
    import torch

    n, seq, path = args.calibration, args.calibration_seq, args.calibration_file
    if n <= 0:
        return None
    if tokenizer is None:
        if not args.model.startswith("tiny-"):
            return None
        print(f"calibration: {n} random windows of 64 ids (a tiny random model has no tokenizer)")
        ids = torch.randint(0, model.config.vocab_size, (n, 64), generator=torch.Generator().manual_seed(0))
        return [w[None] for w in ids]
    if path is not None:
        from fxquant.calibration import Calibration, calibration_batches

        batches = calibration_batches(Calibration(path, tokenizer=tokenizer, seq_len=seq, windows=n))
        print(f"calibration data (for calibrated passes): {len(batches)} windows of {seq} tokens from {path}")
        return batches
    from fxquant.eval import calibration_windows, default_tokens

    print(f"calibration data (for calibrated passes): the first {n} windows of {seq} tokens of the default text")
    return [w[None] for w in calibration_windows(default_tokens(tokenizer), n, seq_len=seq)]


def _quick_ppl(model, tokenizer, n: int):
    if n <= 0 or tokenizer is None:
        return None
    from fxquant.eval import EvalSplit, default_tokens, eval_windows, perplexity

    return perplexity(model, eval_windows(default_tokens(tokenizer), EvalSplit(n_eval=n)))


def _load_for_eval(spec: str):
    """A directory fxquant.save wrote (online ops and quantizers included), or any load_model spec."""
    from fxquant.models import load_model

    if (Path(spec) / "fxquant.json").is_file():
        from fxquant.serialize import load, load_tokenizer

        tokenizer = load_tokenizer(spec)  # None without tokenizer files; a damaged one is refused by name
        return load(spec), tokenizer
    return load_model(spec)


def _slug(spec: str) -> str:
    return Path(spec).name.replace(".gguf", "") or "model"


if __name__ == "__main__":
    sys.exit(main())
