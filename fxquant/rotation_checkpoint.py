"""A resumable checkpoint of rotations being learned: one safetensors file, no pickle.

Entry points: `save_checkpoint(cfg, opt, step, losses)` and `load_checkpoint(cfg, opt) -> (steps
done, losses)`, for a `fxquant.cayley.CayleySGD`. The file holds each matrix and its momentum (float64) and, as metadata,
the steps done, the loss of each, and the start it was trained from (init, seed); a file that does
not match this model and config, or cannot be read, is refused by name before any training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fxquant.errors import ModelLoadError

FORMAT = "fxquant-rotations-1"


def save_checkpoint(cfg, opt, step: int, losses: list[float]) -> Path:
    """Write the matrices, momenta and progress to `cfg.checkpoint` atomically (a stopped run leaves
    the previous checkpoint whole)."""
    path = Path(cfg.checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in opt.state().items()}
    meta = {"format": FORMAT, "step": str(step), "init": cfg.init, "seed": str(cfg.seed), "loss": cfg.loss,
            "losses": json.dumps(losses)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _refuse(path, why: str):
    return ModelLoadError(f"learn_rotations checkpoint {str(path)!r} {why}; delete it to train from the start, "
                          "or give another checkpoint path")


def load_checkpoint(cfg, opt) -> tuple[int, list[float]]:
    """Resume `opt` from `cfg.checkpoint` when the file exists: (steps already done, their losses)."""
    path = Path(cfg.checkpoint)
    if not path.exists():
        return 0, []
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _refuse(path, f"cannot be read ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise _refuse(path, f"is not a rotations checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    if (meta.get("init"), meta.get("seed")) != (cfg.init, str(cfg.seed)):
        raise _refuse(path, f"was trained from init {meta.get('init')!r} seed {meta.get('seed')}, "
                            f"not {cfg.init!r} seed {cfg.seed}")
    if meta.get("loss", "cross_entropy") != cfg.loss:  # files before the field trained on cross-entropy
        raise _refuse(path, f"was trained on the {meta.get('loss', 'cross_entropy')} loss, not {cfg.loss}")
    expected = {k: tuple(v.shape) for k, v in opt.matrices.items()}
    found = {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith("momentum:")}
    if found != expected or any(f"momentum:{k}" not in tensors for k in expected):
        missing = sorted(set(expected) - set(found)) or sorted(set(found) - set(expected)) or sorted(expected)
        raise _refuse(path, f"holds rotations for another model (first mismatch: {missing[0]!r})")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise _refuse(path, f"holds non-finite values in {bad[0]!r}")
    opt.load(tensors)
    try:
        return int(meta["step"]), [float(x) for x in json.loads(meta["losses"])]
    except (KeyError, ValueError, TypeError) as exc:
        raise _refuse(path, f"has damaged progress metadata ({exc})") from exc
