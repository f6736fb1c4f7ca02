"""Lowering: a quantized model's packed linears, online Hadamards and quantizers onto kernels.

Entry points: `lower(model, device=None, *, tune=True) -> model` (in place) and
`lowering_report(model) -> LoweringReport` (what runs on which kernel, what was left and why).
The one idea: decide, then do. For each packed layer the kernels that take it on the device are
listed (fxquant.runtime.kernels.linear; the others give their reason), the fastest for decode
(M = 1) and for prefill (M = PREFILL_M) is measured on the layer's own shape, with the crossover M
between them, and the layer becomes a `LoweredLinear` with that plan: its weight converted once
into each chosen kernel's layout. Hooks and attention transforms become their fast twins. Every
lowered object keeps its portable state, so `save` writes the packed model unchanged.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch

from fxquant.quant.pack import carry_state, pack_model
from fxquant.runtime.attention import ATTR, AttentionTransform
from fxquant.runtime.hooks import ActivationFakeQuant, OnlineHadamard
from fxquant.runtime.kernels import hadamard as hadamard_kernels
from fxquant.runtime.kernels.linear import KERNELS, REFERENCE, candidates
from fxquant.runtime.linear import QuantizedLinear
from fxquant.runtime.lowered import (
    FastActivationQuant, FastAttentionTransform, FastHadamardQuant, FastOnlineHadamard, LinearPlan, LoweredLinear,
)
from fxquant.weights import replace_module

log = logging.getLogger("fxquant")

PREFILL_M = 256  # the token count the prefill kernel is chosen at
RULE_DECODE_M = 16  # without measuring: the decode kernel up to this many tokens, the reference above
_TIMINGS: dict[tuple, float] = {}  # (kernel, shape, format, dtype, M, threads) -> seconds, per process


@dataclass(frozen=True)
class Lowered:
    """One lowered place: its module path, what it is, the kernel it runs on, and why / what was left."""

    path: str
    what: str  # "linear", "online Hadamard", "activation quantizer", "attention", "float linear"
    kernel: str
    note: str = ""


@dataclass(frozen=True)
class LoweringReport:
    entries: tuple[Lowered, ...]

    def summary(self) -> str:
        """One line per (what, kernel, note) with how many places share it."""
        counts = Counter((e.what, e.kernel, e.note) for e in self.entries)
        lines = [f"{n:4d} x {what}: {kernel}" + (f" ({note})" if note else "") for (what, kernel, note), n in counts.items()]
        return "\n".join(lines) if lines else "nothing to lower (no packed layer, hook or attention transform)"

    def __str__(self) -> str:
        return self.summary()


def _model_device(module: torch.nn.Module) -> torch.device:
    """Where the module's first parameter (or buffer) lives; CPU for a module with neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def lower(model: torch.nn.Module, device=None, *, tune: bool = True) -> torch.nn.Module:
    """Put `model` (quantized by fxquant) on the fastest correct kernels for `device` (default: where
    it is; it is moved there first), in place; returns the same object. `tune=False` skips the
    timing and uses the rule (the first kernel that takes a layer for M <= RULE_DECODE_M tokens, the
    exact reference above). Layers a recipe quantized but did not pack are packed first."""
    if device is not None and torch.device(device) != _model_device(model):
        model.to(device)
    device = _model_device(model)
    pack_model(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            if isinstance(module, LoweredLinear):
                module = _unlowered(module)
            plan = _plan(module, device, tune)
            replace_module(model, path, carry_state(module, LoweredLinear.lower(module, plan)))
        _lower_hooks(module if not isinstance(module, QuantizedLinear) else model.get_submodule(path))
        transform = getattr(module, ATTR, None)
        if isinstance(transform, AttentionTransform):
            setattr(module, ATTR, FastAttentionTransform(**dataclasses.asdict(transform)))
    log.info("fxquant.lower (%s):\n%s", device, lowering_report(model).summary())
    return model


def _unlowered(layer: LoweredLinear) -> QuantizedLinear:
    """A lowered layer as the portable one again (lowering twice re-plans, e.g. on a new device)."""
    plain = QuantizedLinear(layer.in_features, layer.out_features, layer.fmt, bias=layer.bias is not None,
                            dtype=layer.scale.dtype, transposed=layer.transposed).to(layer.codes.device)
    for name in ("codes", "scale", "zero"):
        plain.register_buffer(name, getattr(layer, name))
    plain.bias = layer.bias
    return carry_state(layer, plain)


def _lower_hooks(module: torch.nn.Module) -> None:
    """Swap the module's online Hadamard and activation quantizer hooks for their fast twins, fusing
    a Hadamard with the quantizer right after it; the order of hooks is kept."""
    hooks = module._forward_pre_hooks
    keys = list(hooks)
    for i, key in enumerate(keys):
        hook = hooks.get(key)
        if type(hook) is OnlineHadamard:
            nxt = keys[i + 1] if i + 1 < len(keys) else None
            if nxt is not None and type(hooks[nxt]) is ActivationFakeQuant:
                quant = hooks.pop(nxt)
                hooks[key] = FastHadamardQuant(quant.bits, quant.symmetric, quant.clip_ratio)
            else:
                hooks[key] = FastOnlineHadamard()
        elif type(hook) is ActivationFakeQuant:
            hooks[key] = FastActivationQuant(hook.bits, hook.symmetric, hook.clip_ratio)


def _plan(layer: QuantizedLinear, device: torch.device, tune: bool) -> LinearPlan:
    """Decide which kernels run `layer`: measured on its shape, or by the rule."""
    usable, refused = candidates(layer, device)
    fast = [k for k in usable if k is not REFERENCE]
    why_not = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
    if not fast:
        return LinearPlan(REFERENCE.name, REFERENCE.name, 0, f"no kernel takes it ({why_not})")
    if not tune:
        return LinearPlan(fast[0].name, REFERENCE.name, RULE_DECODE_M, "rule")
    decode = min(usable, key=lambda k: _time(k, layer, 1))
    prefill = min(usable, key=lambda k: _time(k, layer, PREFILL_M))
    if decode is prefill:
        return LinearPlan(decode.name, prefill.name, PREFILL_M, "measured")
    lo, hi = 1, PREFILL_M  # decode wins at lo, prefill at hi: bisect the crossover over powers of two
    while hi > 2 * lo:
        mid = int((lo * hi) ** 0.5)
        lo, hi = (mid, hi) if _time(decode, layer, mid) <= _time(prefill, layer, mid) else (lo, mid)
    return LinearPlan(decode.name, prefill.name, lo, "measured")


def _time(kernel, layer: QuantizedLinear, m: int) -> float:
    """Seconds of one call of `kernel` on `layer`'s shape with M = m tokens (cached): the fastest of
    a few runs, which another process's load can only slow down."""
    key = (kernel.name, layer.in_features, layer.out_features, layer.fmt, layer.scale.dtype, layer.transposed,
           layer.bias is not None, layer.codes.device.type, m, torch.get_num_threads())
    if key not in _TIMINGS:
        trial = LoweredLinear.lower(layer, LinearPlan(kernel.name, kernel.name, m))
        x = torch.randn(m, layer.in_features, dtype=layer.scale.dtype, device=layer.codes.device)
        runs = []
        with torch.inference_mode():
            for _ in range(7):
                start = time.perf_counter()
                trial(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - start)
        _TIMINGS[key] = min(runs[1:])
    return _TIMINGS[key]


def lowering_report(model: torch.nn.Module) -> LoweringReport:
    """What runs where in `model`: lowered layers with their plans, fast hooks and attention, and the
    float linears and portable hooks that were left (with the reason)."""
    entries = []
    for path, module in model.named_modules():
        if isinstance(module, LoweredLinear):
            plan = module.plan
            kernel = KERNELS[plan.decode].what
            if plan.prefill != plan.decode:
                kernel += f" for M <= {plan.max_decode_m}, {KERNELS[plan.prefill].what} above"
            entries.append(Lowered(path, f"{module.describe()} linear", kernel, plan.why))
        elif isinstance(module, QuantizedLinear):
            entries.append(Lowered(path, f"{module.describe()} linear", REFERENCE.what, "not lowered: call fxquant.lower"))
        elif isinstance(module, torch.nn.Linear):
            entries.append(Lowered(path, "float linear", "F.linear", "not quantized by the recipe"))
        entries += _hook_entries(path, module)
        transform = getattr(module, ATTR, None)
        if isinstance(transform, AttentionTransform) and (transform.rotate_qk or transform.kv_bits is not None):
            parts = (["R3 Hadamard"] if transform.rotate_qk else []) + (
                [f"int{transform.kv_bits} KV quantizer"] if transform.kv_bits is not None else [])
            fast = isinstance(transform, FastAttentionTransform)
            kernel = hadamard_kernels.kernel_name(_model_device(module)) if fast else "reference ops"
            entries.append(Lowered(path, "attention " + " + ".join(parts), kernel, "" if fast else "not lowered"))
    return LoweringReport(tuple(entries))


def _hook_entries(path: str, module: torch.nn.Module) -> list[Lowered]:
    out = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, FastHadamardQuant):
            out.append(Lowered(path, f"online Hadamard + int{hook.bits} quantizer", "fused fxquant::fast_hadamard_fake_quant"))
        elif isinstance(hook, FastOnlineHadamard):
            out.append(Lowered(path, "online Hadamard", "fxquant::fast_hadamard"))
        elif isinstance(hook, FastActivationQuant):
            out.append(Lowered(path, f"int{hook.bits} activation quantizer", "fxquant::fast_fake_quant"))
        elif isinstance(hook, (OnlineHadamard, ActivationFakeQuant)):
            out.append(Lowered(path, type(hook).__name__, "reference op", "not lowered"))
    return out
