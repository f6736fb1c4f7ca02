"""Quickstart: quantize a model with a recipe through the public API, lower it, measure it, generate.

    python examples/quantize_model.py --model tiny-llama --recipe rotate-r1r2
    python examples/quantize_model.py --model smollm2 --recipe quarot-w4a4kv4 --eval-windows 4

`fxquant.quantize` returns the same Hugging Face model object, edited in place: the float recipe
`rotate-r1r2` keeps its outputs (verified as it runs), so greedy generation gives the same tokens.
`fxquant.lower` then puts a quantized model on kernels; `--eval-windows N` prints its perplexity on
the last N windows of the default eval text before and after (a model with a tokenizer).
"""
from __future__ import annotations

import argparse

import torch

import fxquant
from fxquant.eval import EvalSplit, default_tokens, eval_windows, perplexity
from fxquant.models import load_model


def main(argv=None) -> tuple[torch.Tensor, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--recipe", default="rotate-r1r2")
    parser.add_argument("--eval-windows", type=int, default=0, help="perplexity on this many eval windows (0: skip)")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    prompt = tokenizer("The Python for statement", return_tensors="pt").input_ids if tokenizer else torch.tensor([[1, 5, 9, 14]])
    before = model.generate(prompt, max_new_tokens=12, do_sample=False)
    windows = _eval_windows(tokenizer, args.eval_windows)
    if windows is not None:
        print(f"perplexity before: {perplexity(model, windows, progress=False):.3f}")
    fxquant.quantize(model, args.recipe)  # same object, transformed in place
    fxquant.lower(model)  # packed layers, online Hadamards and quantizers onto kernels
    if windows is not None:
        print(f"perplexity after:  {perplexity(model, windows, progress=False):.3f}")
    after = model.generate(prompt, max_new_tokens=12, do_sample=False)
    for name, ids in (("before", before), ("after", after)):
        print(f"{name}: {tokenizer.decode(ids[0]) if tokenizer else ids[0].tolist()}")
    return before, after


def _eval_windows(tokenizer, n: int):
    """The last `n` windows of 512 tokens of the default eval text, or None (n = 0, or no tokenizer)."""
    if not n or tokenizer is None:
        return None
    return eval_windows(default_tokens(tokenizer), EvalSplit(n_eval=n))


if __name__ == "__main__":
    main()
