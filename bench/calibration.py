"""Does a calibrated recipe's cost depend on how the calibration data is batched? (issue 19)

Usage: python -P bench/calibration.py [--preset awq-w4a16] [--group-size 64] [--windows 32]

Runs `fxquant.quantize(SmolLM2, preset, calibration=...)` through the Python API twice, each in its
own process (so each peak resident memory is its own): the first `--windows` windows of 512 tokens
of the default text as one LongTensor [n, 512], then as a list of n tensors [1, 512]. Prints the
time of `quantize`, the perplexity on the default split and the peak RSS of each, and their ratio.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(form: str, preset: str, group_size: int, windows: int) -> dict:
    """Quantize with the windows in `form` ("tensor" or "list"); time, perplexity, peak RSS."""
    import fxquant
    from fxquant.eval import calibration_windows, default_tokens, eval_windows, perplexity
    from fxquant.models import load_model

    model, tokenizer = load_model("smollm2")
    tokens = default_tokens(tokenizer)
    ids = calibration_windows(tokens, windows)
    data = ids if form == "tensor" else [w[None] for w in ids]
    start = time.perf_counter()
    fxquant.quantize(model, {"preset": preset, "group_size": group_size}, calibration=data, verify=False)
    seconds = time.perf_counter() - start
    ppl = perplexity(fxquant.lower(model), eval_windows(tokens), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10
    return {"form": form, "seconds": seconds, "perplexity": ppl, "peak_rss_mib": peak}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="awq-w4a16")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--form", choices=("tensor", "list"), default=None, help="run one form here (internal)")
    args = p.parse_args(argv)
    if args.form:
        print(json.dumps(one(args.form, args.preset, args.group_size, args.windows)))
        return
    rows = []
    for form in ("tensor", "list"):
        cmd = [sys.executable, "-P", __file__, "--form", form, "--preset", args.preset,
               "--group-size", str(args.group_size), "--windows", str(args.windows)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        r = rows[-1]
        print(f"{args.windows} windows as {form:6s}: quantize {r['seconds']:7.1f} s, perplexity {r['perplexity']:.4f}, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    print(f"time tensor / list: {rows[0]['seconds'] / rows[1]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
