"""Calibration data as users bring it, made one canonical list of batches.

Entry points: `calibration_batches(data) -> list[dict]` and `Calibration(data, batch_size=1,
tokenizer=None, seq_len=512, windows=None)` (data with how to batch or tokenize it). Accepted: a
LongTensor [seq] or [n, seq]; a dict of model inputs (`input_ids` [n, seq], with `attention_mask`
and other per-sequence tensors); a string of text or a path to a text file (with a tokenizer: cut
into windows of `seq_len` tokens); and any iterable of these (a list, a generator, a
`torch.utils.data.DataLoader`). The one idea: a calibrated pass's result and cost must not depend
on how the data was batched, so every form is first split into single sequences, then consecutive
sequences of one length are regrouped into batches of `batch_size`: [32, 512], 32 x [1, 512] and
8 x [4, 512] become the same batches.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fxquant.errors import CalibrationError

DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class Calibration:
    """Calibration `data` with how to batch it (`batch_size` sequences per forward) and, for text, how
    to tokenize it (`tokenizer`, windows of `seq_len` tokens, the first `windows` of them or all)."""

    data: object
    batch_size: int = 1
    tokenizer: object = None
    seq_len: int = DEFAULT_SEQ_LEN
    windows: int | None = None

    def __post_init__(self):
        for name in ("batch_size", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CalibrationError(f"Calibration({name}={getattr(self, name)!r}) must be a positive integer")
        if self.windows is not None and (not isinstance(self.windows, int) or self.windows < 1):
            raise CalibrationError(f"Calibration(windows={self.windows!r}) must be a positive integer or None")


def calibration_batches(data) -> list[dict]:
    """Normalise calibration data (any accepted form, or a `Calibration`) to model-input dicts of
    `batch_size` sequences each; raise CalibrationError naming the item that is malformed."""
    spec = data if isinstance(data, Calibration) else Calibration(data)
    if spec.data is None:
        return []
    items = spec.data if _is_collection(spec.data) else [spec.data]
    rows = [row for i, item in enumerate(items) for row in _rows(item, spec, f"calibration[{i}]")]
    if spec.windows is not None:
        rows = rows[:spec.windows]
    return _regroup(rows, spec.batch_size)


def token_count(batches: list[dict]) -> int:
    """Tokens the batches hold (attended positions only, where a batch carries an attention mask)."""
    total = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        total += int(mask.sum()) if isinstance(mask, torch.Tensor) else batch["input_ids"].numel()
    return total


def _is_collection(data) -> bool:
    """An iterable of items (a list, a generator, a DataLoader), not one item (a tensor, a dict, text)."""
    return isinstance(data, Iterable) and not isinstance(data, (str, dict, torch.Tensor, os.PathLike))


def _rows(item, spec: Calibration, where: str):
    """Single sequences ({key: tensor [1, seq]} dicts) of one item, in order."""
    if isinstance(item, (str, os.PathLike)):
        yield from _text_rows(item, spec, where)
    elif isinstance(item, torch.Tensor):
        yield from split_rows({"input_ids": _ids(where, item)}, where)
    elif isinstance(item, dict):
        ids = item.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise CalibrationError(f"{where} is a dict without an 'input_ids' tensor")
        yield from split_rows({**item, "input_ids": _ids(where, ids)}, where)
    elif _is_collection(item):
        raise CalibrationError(f"{where} is a nested {type(item).__name__}: give tensors, input dicts or text "
                               "inside the list")
    else:
        raise CalibrationError(f"{where} is a {type(item).__name__}: calibration takes a LongTensor [n, seq], an "
                               "input dict, text or a text file, or an iterable (list, DataLoader) of these")


def _ids(where: str, ids: torch.Tensor) -> torch.Tensor:
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() not in (1, 2) or ids.numel() == 0:
        raise CalibrationError(f"{where}: token ids must be a non-empty integer tensor [seq] or [batch, seq], got "
                               f"{ids.dtype} of shape {tuple(ids.shape)}")
    return ids.long().reshape(1, -1) if ids.dim() == 1 else ids.long()


def split_rows(batch: dict, where: str = "calibration batch"):
    """One dict per sequence: every tensor with the batch's leading size is cut along it."""
    n = batch["input_ids"].shape[0]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] != n:
            raise CalibrationError(f"{where}: '{key}' has {value.shape[0]} rows, input_ids has {n}")
    for r in range(n):
        yield {k: v[r:r + 1] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}


def _text_rows(item, spec: Calibration, where: str):
    """Windows of `seq_len` tokens of a text (or of a text file's contents)."""
    if spec.tokenizer is None:
        raise CalibrationError(f"{where} is text: give fxquant.Calibration(text, tokenizer=...) so it can be tokenized")
    text = item
    if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and _is_file(item)):
        try:
            text = Path(item).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"calibration file '{item}' cannot be read as text: {exc}") from None
    ids = torch.as_tensor(spec.tokenizer(text, return_tensors="pt")["input_ids"]).reshape(-1).long()
    n = ids.numel() // spec.seq_len
    if n == 0:
        raise CalibrationError(f"{where}: {ids.numel()} tokens is less than one window of seq_len={spec.seq_len}")
    for w in range(n):
        yield {"input_ids": ids[w * spec.seq_len:(w + 1) * spec.seq_len][None]}


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).is_file()
    except OSError:
        return False


def _regroup(rows: list[dict], batch_size: int) -> list[dict]:
    """Consecutive sequences of one length and one set of keys, `batch_size` to a batch."""
    batches, group = [], []

    def flush():
        if group:
            keys = group[0].keys()
            batches.append({k: torch.cat([g[k] for g in group]) if isinstance(group[0][k], torch.Tensor)
                            and group[0][k].dim() else group[0][k] for k in keys})
            group.clear()

    for row in rows:
        if group and (len(group) == batch_size or _shape(row) != _shape(group[0])):
            flush()
        group.append(row)
    flush()
    return batches


def _shape(row: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v)) for k, v in row.items()))
