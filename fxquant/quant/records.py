"""The quantized-weight records: which codes a quantize step chose for which module's weight.

Entry points: `record(module, name, qw, transposed)`, `recorded(module)`, `forget(module)`, and
`snapshot(modules)` / `restore(saved)` for a rollback. The one idea: RTN, GPTQ and QAT's convert
write a weight's dequantized values into the parameter (fxquant.weights) and record its
`QuantizedWeight` here, so `pack` stores exactly those codes instead of re-deriving them from the
values. The registry is owned and explicit: a `WeakKeyDictionary` keyed by module (a module that
goes away takes its records with it), never attributes hidden on the module.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from weakref import WeakKeyDictionary

import torch

from fxquant.quant.numerics import QuantizedWeight

Record = tuple[QuantizedWeight, bool]  # (canonical-layout codes and scales, weight stored transposed)
_RECORDS: WeakKeyDictionary[torch.nn.Module, dict[str, Record]] = WeakKeyDictionary()
_NONE: Mapping[str, Record] = MappingProxyType({})


def record(module: torch.nn.Module, name: str, qw: QuantizedWeight, transposed: bool) -> None:
    """Record that `module.name` holds the values of `qw` (canonical [out, in]; `transposed`: the
    parameter is stored [in, out])."""
    _RECORDS.setdefault(module, {})[name] = (qw, transposed)


def recorded(module: torch.nn.Module) -> Mapping[str, Record]:
    """{weight name: (QuantizedWeight, transposed)} recorded for `module` (read-only; empty if none)."""
    entries = _RECORDS.get(module)
    return _NONE if entries is None else MappingProxyType(entries)


def recorded_tensor(tensor: torch.Tensor, name: str = "weight") -> Record | None:
    """The record of whichever module holds `tensor` as its recorded `name` (the compile backend
    rebuilds modules around a model's tensors and finds their codes by the tensor), or None."""
    for module, entries in list(_RECORDS.items()):
        if name in entries and getattr(module, name, None) is tensor:
            return entries[name]
    return None


def forget(module: torch.nn.Module) -> None:
    """Drop `module`'s records (its weights were packed, or are float again)."""
    _RECORDS.pop(module, None)


def snapshot(modules: Iterable[torch.nn.Module]) -> dict[torch.nn.Module, dict[str, Record]]:
    """A copy of the records of `modules`, for `restore` (a failed recipe's rollback)."""
    return {m: dict(_RECORDS.get(m, {})) for m in modules}


def restore(saved: dict[torch.nn.Module, dict[str, Record]]) -> None:
    """Put back exactly the records `snapshot` saw for its modules (none where there were none)."""
    for module, entries in saved.items():
        if entries:
            _RECORDS[module] = dict(entries)
        else:
            forget(module)
