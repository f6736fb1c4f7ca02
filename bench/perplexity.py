"""Float perplexity of a model on the default eval split (fxquant.eval), with the time it took.

Usage: python bench/perplexity.py --model smollm2 [--dtype float32] [--seq-len 512] [--n-eval 24]
The figure goes to docs/BENCHMARKS.md, "Float perplexity (default eval split)".
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from fxquant.eval import EvalSplit, default_tokens, eval_windows, perplexity
from fxquant.models import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> None:
    """Load the model, score the default eval windows, print perplexity and timings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a load_model spec: smollm2, a local path (tiny-* has no tokenizer)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--seq-len", type=int, default=EvalSplit.seq_len)
    p.add_argument("--n-eval", type=int, default=EvalSplit.n_eval)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args(argv)

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    if tokenizer is None:
        p.error(f"model {args.model!r} has no tokenizer, so the default text cannot be tokenized")
    loaded = time.perf_counter()
    tokens = default_tokens(tokenizer)
    split = EvalSplit(seq_len=args.seq_len, n_eval=args.n_eval)
    ppl = perplexity(model, eval_windows(tokens, split), batch_size=args.batch_size)
    done = time.perf_counter()

    print(f"model       {args.model} ({args.dtype})")
    print(f"split       last {split.n_eval} windows of {split.seq_len} tokens of {len(tokens)} "
          f"(pydoc_data.topics, Python {platform.python_version()})")
    print(f"perplexity  {ppl:.3f}")
    print(f"time        load {loaded - start:.1f} s, eval {done - loaded:.1f} s "
          f"({torch.get_num_threads()} threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
