"""Quantize a model with a recipe and write the HTML dump of every step, then say where it is.

    python examples/read_a_dump.py --model tiny-llama --recipe quarot-w4a4kv4
    python examples/read_a_dump.py --model smollm2 --recipe rotate-r1r2r4 --out smollm2.html

`dump_dir=` ending in `.html` writes one self-contained page (open it from file://, offline): the
graph before and after each pass, identical decoder blocks folded into one box (`layers.0-29 x 30`),
the chains the analysis found coloured and what each pass inserted, erased or edited. docs/DUMPS.md
explains how to read it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import fxquant
from fxquant.models import load_model


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--recipe", default="quarot-w4a4kv4", help="a calibration-free preset or recipe file")
    parser.add_argument("--out", default="dump.html")
    args = parser.parse_args(argv)
    model, _ = load_model(args.model)
    fxquant.quantize(model, args.recipe, dump_dir=args.out)  # one page, rewritten after every step
    out = Path(args.out).resolve()
    print(f"dump of {args.model} under {args.recipe}: {out.as_uri()} ({out.stat().st_size / 2 ** 10:.0f} KiB)")
    print("open it in a browser; click a box to lay out its group, search by module path or op")
    return out


if __name__ == "__main__":
    main()
