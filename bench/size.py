"""Size on disk of a model saved by `fxquant.save`, float against packed recipes, and the reload check.

Usage: python bench/size.py [--model smollm2] [--recipes float,w8a8,w4a16,quarot-w4a4kv4] [--group-size 64]

For each recipe: quantize a freshly loaded model, save it, and report the bytes of its weights file
against the float model's; then load the directory in a new Python process and check that its
logits on one window of the default text are bit-identical to the saved model's. Recipes that need
calibration data are not offered here (the size does not depend on how the codes were chosen).
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fxquant.api import quantize
from fxquant.eval import default_tokens
from fxquant.models import load_model
from fxquant.runtime.linear import QuantizedLinear
from fxquant.serialize import WEIGHTS, save

_RELOAD = """
import sys, torch
from safetensors.torch import save_file
from fxquant.serialize import load
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    save_file({"logits": load(sys.argv[1])(ids, use_cache=False).logits.contiguous()}, sys.argv[3])
"""


def _row(name: str, model_name: str, group_size: int, ids: torch.Tensor, work: Path, float_bytes: int | None):
    model, _ = load_model(model_name)
    if name != "float":
        quantize(model, {"preset": name, "group_size": group_size} if "w4a16" in name else name)
    directory = work / name
    save(model, directory, recipe=name)
    size = (directory / WEIGHTS).stat().st_size
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    torch.save(ids, work / "ids.pt")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _RELOAD, str(directory), str(work / "ids.pt"), str(work / "out.st")],
                   check=True)
    seconds = time.perf_counter() - start
    same = torch.equal(load_file(str(work / "out.st"))["logits"], logits)
    ratio = "1.00x" if float_bytes is None else f"{float_bytes / size:.2f}x smaller"
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    packed = sum(t.numel() * t.element_size() for m in layers for t in (m.codes, m.scale, m.zero) if t is not None)
    dense = sum(m.in_features * m.out_features * 4 for m in layers)
    linears = f"{packed / 2 ** 20:.1f} / {dense / 2 ** 20:.1f}" if layers else "-"
    print(f"| {name} | {size / 2 ** 20:.1f} | {ratio} | {linears} | {'yes' if same else 'NO'} | {seconds:.1f} |",
          flush=True)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--recipes", default="float,w8a8,w4a16,quarot-w4a4kv4")
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| recipe | model.safetensors MiB | vs float | packed linear weights MiB / as float32 | "
          "reload bit-identical (new process) | reload + forward s |")
    print("|---|---|---|---|---|---|")
    ids = default_tokens(load_model(args.model)[1])[None, -128:]
    float_bytes = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            size = _row(name, args.model, args.group_size, ids, Path(tmp), float_bytes)
            float_bytes = size if name == "float" else float_bytes


if __name__ == "__main__":
    main()
