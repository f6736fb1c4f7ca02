"""Packing: every layer whose weight a quantize step left on an integer grid becomes a
`QuantizedLinear` holding that grid's codes (int4 two per byte, int8 one per byte) and its scales
and zeros in the model dtype.

Entry point: `pack_model(model) -> (changes, blocked)`, which the `pack` pass, `fxquant.save` and
QAT's `convert` call. The one idea: the codes are the ones the quantize step chose (recorded in
`fxquant.quant.records`), never re-derived from the values; a weight that no longer equals them (a
pass edited it after quantization) is an error. The layer then computes exactly what it did (the op
dequantizes to the same weight and multiplies the same way), except where its input passes a
per-token quantizer and its weight is symmetric per channel: it takes the quantizer over and
computes the exact integer product, a float32 rounding apart from the float one (what the integer
kernels compute bit for bit; fxquant.runtime.linear). Forward hooks and extra parameters of the
layer (online Hadamard, activation quantizers, input scales) move to the new module.
"""
from __future__ import annotations

import dataclasses

import torch

from fxquant.analysis.structure import Blocked
from fxquant.errors import PassError
from fxquant.pipeline import Change
from fxquant.quant import records
from fxquant.runtime.linear import QuantizedLinear, absorb_input_quantizer
from fxquant.weights import canonical, replace_module

_HOOK_SLOTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _packable(module: torch.nn.Module) -> str | None:
    """Why `module` cannot become a QuantizedLinear, or None when it can."""
    from transformers.pytorch_utils import Conv1D

    if type(module) not in (torch.nn.Linear, Conv1D):
        return f"a {type(module).__name__} is not a linear layer pack can replace; its weight stays fake-quant float"
    if set(records.recorded(module)) != {"weight"}:
        return "only some of its weights are quantized"
    return None


def carry_state(old: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """Give `new` the hooks and the parameters/buffers `old` has beyond weight and bias (a buffer
    kept out of the state dict stays out of it)."""
    for slot in _HOOK_SLOTS:
        if hasattr(old, slot):
            getattr(new, slot).update(getattr(old, slot))
    for name, p in old.named_parameters(recurse=False):
        if name not in ("weight", "bias"):
            new.register_parameter(name, p)
    for name, b in old.named_buffers(recurse=False):
        new.register_buffer(name, b, persistent=name not in old._non_persistent_buffers_set)
    return new


def pack_module(path: str, module: torch.nn.Module) -> QuantizedLinear:
    """The QuantizedLinear that computes what the fake-quant `module` at `path` computes (exactly, or
    as the exact integer product where it absorbs its input's quantizer), checked on a probe input."""
    qw, transposed = records.recorded(module)["weight"]
    weight = module.weight.detach()
    qw = dataclasses.replace(qw, codes=qw.codes.to(weight.device), scale=qw.scale.to(weight.device),
                             zero=None if qw.zero is None else qw.zero.to(weight.device))
    if not torch.equal(canonical(qw.values(weight.dtype), transposed), weight):
        raise PassError(f"pack: the weight of '{path}' is not the quantized weight recorded for it: a pass changed it "
                        "after quantization. Put weight quantization (quantize_weights / gptq) after every pass "
                        "that edits weights")
    layer = carry_state(module, QuantizedLinear.from_weight(qw, module.bias, transposed))
    absorb_input_quantizer(layer)
    _check_packed(path, module, layer)
    return layer


def _check_packed(path: str, module: torch.nn.Module, layer: QuantizedLinear) -> None:
    """On a seeded probe input, the packed layer computes what the fake-quant one did: bit for bit,
    or, where it absorbed its input's quantizer (the same codes, the exact integer product), to the
    float rounding of the fake-quant product. Anything else is a packing bug: PassError, before the
    model is touched."""
    weight = module.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, layer.in_features, generator=gen).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        want, got = module(x), layer(x)
    if layer.act is None:
        ok, err = torch.equal(want, got), None
    else:
        err = (got.float() - want.float()).abs().max().item()
        ok = err <= (4 * torch.finfo(weight.dtype).eps + 1e-4) * want.float().abs().max().item()
    if not ok:
        detail = "not bit-identical" if err is None else f"max abs error {err:.3g}"
        raise PassError(f"pack: the packed '{path}' does not compute what its fake-quant layer did on a probe "
                        f"input ({detail}); this is a bug in fxquant's packing, please report it")


def pack_model(model: torch.nn.Module) -> tuple[list[Change], list[Blocked]]:
    """Replace every packable quantized layer of `model` in place; the changes and what stayed float."""
    changes, blocked = [], []
    for path, module in list(model.named_modules()):
        if not records.recorded(module):
            continue
        reason = _packable(module)
        if reason is not None:
            blocked.append(Blocked("", path, reason))
            continue
        layer = pack_module(path, module)
        replace_module(model, path, layer)
        records.forget(module)  # its codes live in the QuantizedLinear now
        before = module.weight.numel() * module.weight.element_size()
        after = sum(t.numel() * t.element_size() for t in (layer.codes, layer.scale, layer.zero) if t is not None)
        changes.append(Change("packed", path, f"{layer.describe()}: {before / after:.1f}x fewer weight bytes"))
    return changes, blocked
