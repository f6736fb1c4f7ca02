"""Quantize a model with a recipe through the public API, then check it still generates.

    python examples/quantize_model.py --model tiny-llama --recipe rotate-r1r2
    python examples/quantize_model.py --model smollm2 --recipe rotate-r1r2-w8a8

`fxquant.quantize` returns the same Hugging Face model object, edited in place: the float recipe
`rotate-r1r2` keeps its outputs (verified as it runs), so greedy generation gives the same tokens.
"""
from __future__ import annotations

import argparse

import torch

import fxquant
from fxquant.models import load_model


def main(argv=None) -> tuple[torch.Tensor, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--recipe", default="rotate-r1r2")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    prompt = tokenizer("The Python for statement", return_tensors="pt").input_ids if tokenizer else torch.tensor([[1, 5, 9, 14]])
    before = model.generate(prompt, max_new_tokens=12, do_sample=False)
    fxquant.quantize(model, args.recipe)  # same object, transformed in place
    after = model.generate(prompt, max_new_tokens=12, do_sample=False)
    for name, ids in (("before", before), ("after", after)):
        print(f"{name}: {tokenizer.decode(ids[0]) if tokenizer else ids[0].tolist()}")
    return before, after


if __name__ == "__main__":
    main()
