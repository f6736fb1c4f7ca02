"""Lowering: a quantized model's packed linears, online Hadamards and quantizers onto kernels.

Entry points: `lower(model, device=None, *, plan="measure") -> model` (in place) and
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
import functools
import glob
import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle

from fxquant.errors import RecipeError
from fxquant.quant.pack import carry_state, pack_model
from fxquant.runtime.attention import ATTR, AttentionTransform
from fxquant.runtime.hooks import AbsorbedActivationQuant, ActivationFakeQuant, OnlineHadamard
from fxquant.runtime.kernels import hadamard as hadamard_kernels
from fxquant.runtime.kernels.float_gemv import gemv_refusal
from fxquant.runtime.kernels.linear import KERNELS, REFERENCE, candidates
from fxquant.runtime.linear import QuantizedLinear, absorb_input_quantizer
from fxquant.runtime.lowered import (
    Bf16Linear, DecodeLinear, FastActivationQuant, FastAttentionTransform, FastHadamardQuant,
    FastOnlineHadamard, GemvLinear, LinearPlan, LoweredLinear, portable_hooks,
)
from fxquant.weights import replace_module

log = logging.getLogger("fxquant")
LOWERED_HOOKS = (FastOnlineHadamard, FastActivationQuant, FastHadamardQuant)

PREFILL_M = 256  # the token count the prefill kernel is chosen at
RULE_DECODE_M = 16  # plan="rule": the decode kernel up to this many tokens, the reference above
PLANS = ("measure", "rule", "decode", "fast")
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


def lower(model: torch.nn.Module, device=None, *, plan: str = "measure", output_layer: str | None = None) -> torch.nn.Module:
    """Put `model` (quantized by fxquant) on the fastest correct kernels for `device` (default: where
    it is; it is moved there first), in place; returns the same object. Layers a recipe quantized
    but did not pack are packed first. `plan`: "measure" times the kernels on each layer's shape;
    "rule" takes the first kernel that accepts a layer for M <= RULE_DECODE_M tokens and the exact
    reference above, without timing; "decode" runs that kernel at every M (what `generate`'s decode
    steps compute, e.g. to measure its perplexity on long windows); "fast" measures like "measure" but
    also lets the bfloat16 kernels run layers with quantized activations (faster decode, a measured
    perplexity cost at 4 bits). `output_layer`: the module path of the output layer, which decodes
    on the C float32 GEMV when the recipe left it in float (default: the model's output embeddings)."""
    if plan not in PLANS:
        raise RecipeError(f"lower: plan={plan!r} is not one of {list(PLANS)}")
    if device is not None and torch.device(device) != _model_device(model):
        model.to(device)
    device = _model_device(model)
    pack_model(model)
    output = output_layer or _output_layer(model)
    for path, module in list(model.named_modules()):
        _portable_hooks(module)  # lowering again starts from the portable model
        if isinstance(module, DecodeLinear):
            module = _unlowered_float(module)
            replace_module(model, path, module)
        decode = _float_decode(module, plan, path == output) if path else None
        if decode is not None:
            module = carry_state(module, decode.lower(module))
            replace_module(model, path, module)
        if isinstance(module, QuantizedLinear):
            if isinstance(module, LoweredLinear):
                module = _unlowered(module)
            absorb_input_quantizer(module)  # a quantizer installed after pack (pack and load absorb their own)
            module = carry_state(module, LoweredLinear.lower(module, _plan(module, device, plan)))
            replace_module(model, path, module)
        _lower_hooks(module)
        transform = getattr(module, ATTR, None)
        if isinstance(transform, AttentionTransform):
            setattr(module, ATTR, FastAttentionTransform(**dataclasses.asdict(transform)))
    log.info("fxquant.lower (%s):\n%s", device, lowering_report(model).summary())
    return model


def _unlowered(layer: LoweredLinear) -> QuantizedLinear:
    """A lowered layer as the portable one again, its kernel layouts dropped (lowering twice
    re-plans, e.g. on a new device)."""
    plain = carry_state(layer, QuantizedLinear(layer.in_features, layer.out_features, layer.fmt,
                                               bias=layer.bias is not None, dtype=layer.scale.dtype,
                                               transposed=layer.transposed).to(layer.codes.device))
    plain.bias, plain.act = layer.bias, layer.act
    for kernel, keys in layer.kernel_buffers.items():
        for key in keys:
            delattr(plain, f"{kernel}_{key}")
    return plain


def _output_layer(model: torch.nn.Module) -> str | None:
    """The path of the model's output layer (a Hugging Face model's output embeddings), or None."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        layer = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return next((path for path, module in model.named_modules() if module is layer), None) if layer is not None else None


def _float_decode(module: torch.nn.Module, plan: str, is_output: bool) -> type[DecodeLinear] | None:
    """The decode kernel of a float32 linear the recipe left, or None (it stays F.linear): with
    plan="fast" bfloat16 for every such layer; otherwise the C float32 GEMV for the output layer
    only, whose float32 rounding reaches no quantizer (a layer inside a W4A4 model feeds one, and
    a last-bit change there flips codes)."""
    if type(module) is not torch.nn.Linear or module.weight.dtype != torch.float32:
        return None
    if plan == "fast":
        return Bf16Linear
    return GemvLinear if is_output and gemv_refusal(module) is None else None


def _unlowered_float(layer: DecodeLinear) -> torch.nn.Linear:
    """A float linear lowered onto a decode kernel as the plain one again, on the same parameters,
    its kernel buffers dropped."""
    plain = torch.nn.Linear.__new__(torch.nn.Linear)
    torch.nn.Module.__init__(plain)
    plain.in_features, plain.out_features, plain.weight, plain.bias = (
        layer.in_features, layer.out_features, layer.weight, layer.bias)
    plain = carry_state(layer, plain)
    for name in type(layer).BUFFERS:
        if name in plain._buffers:
            delattr(plain, name)
    return plain


def _portable_hooks(module: torch.nn.Module) -> None:
    """Replace the module's lowered hooks by the portable ones they stand for, in order."""
    hooks = module._forward_pre_hooks
    if not any(isinstance(h, LOWERED_HOOKS) for h in hooks.values()):
        return
    items = [(key, hook) for key, hook in hooks.items()]
    hooks.clear()
    for key, hook in items:
        for i, plain in enumerate(portable_hooks(hook) if isinstance(hook, LOWERED_HOOKS) else (hook,)):
            hooks[key if i == 0 else RemovableHandle(hooks).id] = plain


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


def _plan(layer: QuantizedLinear, device: torch.device, how: str) -> LinearPlan:
    """Decide which kernels run `layer` (measured on its shape, or by the rule). A layer that
    quantizes its input (`layer.act`) keeps to the exact kernels (the integer product) where one
    takes it: bf16 rounding before a later 4-bit quantizer flips codes, which moves perplexity
    (docs/BENCHMARKS.md); plan="fast" allows them. Kernels are timed as they will run, the
    quantizer included."""
    probe = LoweredLinear.lower(layer, LinearPlan(REFERENCE.name, REFERENCE.name, 0))
    usable, refused = candidates(probe, device)
    exact_fast = [k for k in usable if k.exact and k is not REFERENCE]
    if probe.act is not None and exact_fast and how != "fast":
        usable = [REFERENCE, *exact_fast]
    fast = [k for k in usable if k is not REFERENCE]
    why_not = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
    if not fast:
        return LinearPlan(REFERENCE.name, REFERENCE.name, 0, f"no kernel takes it ({why_not})")
    if how == "rule":
        return LinearPlan(fast[0].name, REFERENCE.name, RULE_DECODE_M, "rule")
    if how == "decode":
        return LinearPlan(fast[0].name, fast[0].name, 2 ** 62, "decode kernel at every M")
    decode = min(usable, key=lambda k: _time(k, probe, 1))
    prefill = min(usable, key=lambda k: _time(k, probe, PREFILL_M))
    if decode is prefill:
        return LinearPlan(decode.name, prefill.name, PREFILL_M, "measured")
    lo, hi = 1, PREFILL_M  # decode wins at lo, prefill at hi: bisect the crossover over powers of two
    while hi > 2 * lo:
        mid = int((lo * hi) ** 0.5)
        lo, hi = (mid, hi) if _time(decode, probe, mid) <= _time(prefill, probe, mid) else (lo, mid)
    return LinearPlan(decode.name, prefill.name, lo, "measured")


@functools.cache
def _cache_bytes() -> int:
    """The largest CPU cache in bytes (sysfs; 32 MiB where it does not say)."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            sizes.append(int(text.rstrip("KM")) * (1024 if text.endswith("K") else 1024 ** 2 if text.endswith("M") else 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 * 1024 ** 2)


def _copies(kernel, layer: QuantizedLinear, m: int) -> list[torch.nn.Module]:
    """`layer` lowered onto `kernel` as many times as it takes for the kernel's buffers together to
    overflow the last-level cache twice (at most 64): called in turn, each reads its weights from
    memory, as in a model. Each is a fresh `lower` (new kernel layouts), not a deepcopy: inside the
    compile backend a layer's tensors carry dynamo's bookkeeping, which does not copy."""
    device = layer.codes.device
    cache = (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 1024 ** 2)
             if device.type == "cuda" else _cache_bytes())
    plan = LinearPlan(kernel.name, kernel.name, m)
    first = LoweredLinear.lower(layer, plan, layer.act)
    size = max(sum(getattr(first, f"{kernel.name}_{key}").nbytes for key in first.kernel_buffers[kernel.name]), 1)
    count = min(-(-2 * cache // size), 64) if first.kernel_buffers[kernel.name] else 1
    return [first] + [LoweredLinear.lower(layer, plan, layer.act) for _ in range(count - 1)]


def _time(kernel, layer: QuantizedLinear, m: int) -> float:
    """Seconds of one call of `kernel` on `layer`'s shape with M = m tokens (cached), streaming over
    copies whose weights do not fit in cache: a decode step reads each weight once from memory, and
    a layer timed hot in cache favours the kernels that read the most bytes (float32 codes read
    four per weight, int8 one). The fastest of three rounds: other load only slows a round down."""
    key = (kernel.name, layer.in_features, layer.out_features, layer.fmt, layer.scale.dtype, layer.transposed,
           layer.bias is not None, layer.act, layer.codes.device.type, m, torch.get_num_threads())
    if key not in _TIMINGS:
        trials = _copies(kernel, layer, m)
        x = torch.randn(m, layer.in_features, dtype=layer.scale.dtype, device=layer.codes.device)
        runs = []
        with torch.inference_mode():
            trials[0](x)
            for _ in range(3):
                start = time.perf_counter()
                for trial in trials:
                    trial(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                runs.append((time.perf_counter() - start) / len(trials))
        _TIMINGS[key] = min(runs)
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
            what = f"{module.describe()} linear" + (f", int{module.act.bits} activations inside" if module.act else "")
            entries.append(Lowered(path, what, kernel, plan.why))
        elif isinstance(module, QuantizedLinear):
            entries.append(Lowered(path, f"{module.describe()} linear", REFERENCE.what, "not lowered: call fxquant.lower"))
        elif isinstance(module, Bf16Linear):
            entries.append(Lowered(path, "float linear", f"F.linear in bfloat16 for M <= {module.max_decode_m}, "
                                   "float32 above", "not quantized by the recipe; plan='fast'"))
        elif isinstance(module, GemvLinear):
            entries.append(Lowered(path, "float linear", f"fxquant's C float32 GEMV for M <= {module.max_decode_m}, "
                                   "F.linear above", "not quantized by the recipe"))
        elif isinstance(module, torch.nn.Linear):
            entries.append(Lowered(path, "float linear", "F.linear", "not quantized by the recipe"))
        entries += _hook_entries(path, module)
        transform = getattr(module, ATTR, None)
        if isinstance(transform, AttentionTransform) and (transform.rotate_qk or transform.kv_bits is not None):
            parts = (["R3 Hadamard"] if transform.rotate_qk else []) + (
                [_kv_what(transform)] if transform.kv_bits is not None else [])
            fast = isinstance(transform, FastAttentionTransform)
            kernel = hadamard_kernels.kernel_name(_model_device(module)) if fast else "reference ops"
            entries.append(Lowered(path, "attention " + " + ".join(parts), kernel, "" if fast else "not lowered"))
    return LoweringReport(tuple(entries))


def _kv_what(t: AttentionTransform) -> str:
    """`int4 KV quantizer`, with its groups, clip ratio and float sink positions when it has them."""
    extra = ([f"groups of {t.kv_group_size}"] if t.kv_group_size is not None else []) + (
        [f"clip {t.kv_clip_ratio:g}"] if t.kv_clip_ratio != 1.0 else []) + (
        [f"first {t.kv_sink_tokens} positions float"] if t.kv_sink_tokens else [])
    return f"int{t.kv_bits} KV quantizer" + (f" ({', '.join(extra)})" if extra else "")


def _hook_entries(path: str, module: torch.nn.Module) -> list[Lowered]:
    out = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, AbsorbedActivationQuant):
            continue  # the layer's own entry says its kernel quantizes its input
        if isinstance(hook, FastHadamardQuant):
            out.append(Lowered(path, f"online Hadamard + int{hook.bits} quantizer", "fused fxquant::fast_hadamard_fake_quant"))
        elif isinstance(hook, FastOnlineHadamard):
            out.append(Lowered(path, "online Hadamard", "fxquant::fast_hadamard"))
        elif isinstance(hook, FastActivationQuant):
            out.append(Lowered(path, f"int{hook.bits} activation quantizer", "fxquant::fast_fake_quant"))
        elif isinstance(hook, (OnlineHadamard, ActivationFakeQuant)):
            out.append(Lowered(path, type(hook).__name__, "reference op", "not lowered"))
    return out
