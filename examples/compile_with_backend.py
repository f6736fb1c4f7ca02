"""Compile with fxquant's torch.compile backend, two ways, and read what it did.

    python examples/compile_with_backend.py --model tiny-llama
    python examples/compile_with_backend.py --model smollm2 --recipe rotate-r1r2-w4a16

1. A model quantized by `fxquant.quantize`: `torch.compile(model, backend="fxquant")` puts its packed
   linears, online Hadamards and quantizers on kernels inside each graph, then hands it to inductor.
2. A float model and `options={"recipe": ...}`: the recipe's passes run at compile time on the
   backend's own copy of the weights; the model you hold is not changed. One graph cannot prove a
   rotation of attention that reads a KV cache, so this way scores text (`use_cache=False`);
   to generate, quantize first (way 1).
Both print the backend's report per graph (`fxquant.explain` returns the same reports).
"""
from __future__ import annotations

import argparse
import copy

import torch

import fxquant
from fxquant.models import load_model


def main(argv=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--recipe", default="rotate-r1r2-w4a16")
    parser.add_argument("--group-size", type=int, default=32, help="weight group size (tiny models: 32)")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    recipe = {"preset": args.recipe, "group_size": args.group_size}
    prompt = tokenizer("The Python for statement", return_tensors="pt").input_ids if tokenizer else torch.tensor([[1, 5, 9, 14]])

    quantized = fxquant.quantize(copy.deepcopy(model), recipe)  # 1: quantize, then compile
    quantized.forward = torch.compile(quantized.forward, backend="fxquant", options={"plan": "rule"})
    with fxquant.backend.collect() as reports:
        first = quantized.generate(prompt, max_new_tokens=8, do_sample=False)
    print(reports[0])

    float_model = copy.deepcopy(model)  # 2: the recipe at compile time; float_model stays float
    scored = torch.compile(float_model, backend="fxquant", options={"recipe": recipe, "plan": "rule"})
    with fxquant.backend.collect() as reports, torch.no_grad():
        second = scored(first, use_cache=False).logits
        reference = quantized(first, use_cache=False).logits  # way 1's model on the same tokens
    print(reports[0])
    print(f"generated: {tokenizer.decode(first[0]) if tokenizer else first[0].tolist()}")
    print(f"logits of the two ways differ by at most {(second - reference).abs().max().item():.2e}")
    return first, second, reference


if __name__ == "__main__":
    main()
