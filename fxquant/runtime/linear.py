"""The packed quantized linear: integer codes stored as a kernel reads them.

Entry point: `QuantizedLinear`, the module that holds `codes` (uint8: int4 two per byte, int8 one per
byte), `scale` and `zero` ([out, groups], in the model dtype) in the `QuantFormat` `fmt`, and calls
`fxquant::quantized_linear` (fxquant.runtime.library). The one idea: the op's reference
implementation dequantizes with `fxquant.quant.numerics` and multiplies exactly as the layer it
replaced did (`F.linear`, or `addmm` for a transformers Conv1D), so a packed model computes bit for
bit what its fake-quant model did; `torch.export` and `torch.compile` see one named node, which a
kernel can replace. `spec()` / `from_spec()` are the layer as plain data, in the keys saved
directories have always used (the format as bits, symmetric, group_size, float_zero).

One exception to "as the layer it replaced": a layer with symmetric per-channel weights whose input
passes a per-token activation quantizer takes that quantizer over (`absorb_input_quantizer`, at
pack and load: `act`), and computes the exact integer product of the two codes, scaled once
(numerics.integer_linear). That is what every integer kernel computes bit for bit, where the float
product of the dequantized values rounds at every step: the fake-quant model and the packed one
differ by float32 rounding there, the packed one and its kernels not at all.
"""
from __future__ import annotations

import torch

from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import QuantizedWeight
from fxquant.quant.packed import pack_int4
from fxquant.runtime.hooks import AbsorbedActivationQuant, ActivationFakeQuant
from fxquant.runtime.library import dequantized_weight, packs_two_per_byte, stored_codes

SPEC_KEYS = ("in_features", "out_features", "bits", "symmetric", "group_size", "float_zero", "bias", "transposed")


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose weight is stored as packed integer codes with scales (and zeros).
    Buffers are made on the default device (`with torch.device(...)` to choose another)."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat, *, bias: bool,
                 dtype: torch.dtype = torch.float32, transposed: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.transposed = in_features, out_features, fmt, transposed
        groups = 1 if fmt.group_size is None else in_features // fmt.group_size
        width = (in_features + 1) // 2 if packs_two_per_byte(fmt.bits) else in_features
        self.register_buffer("codes", torch.zeros(out_features, width, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=dtype))
        self.register_buffer("zero", None if fmt.symmetric else torch.zeros(out_features, groups, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.act: ActivationFakeQuant | None = None  # the input quantizer it runs itself (absorb_input_quantizer)

    @classmethod
    def from_weight(cls, qw: QuantizedWeight, bias: torch.Tensor | None, transposed: bool = False) -> QuantizedLinear:
        """The packed form of a quantized weight [out, in] (codes, scales, zeros) and its layer's bias."""
        out_f, in_f = qw.codes.shape
        with torch.device(qw.scale.device):
            layer = cls(in_f, out_f, qw.fmt, bias=bias is not None, dtype=qw.scale.dtype, transposed=transposed)
        codes = qw.codes
        if packs_two_per_byte(qw.fmt.bits):
            codes = pack_int4(torch.nn.functional.pad(codes, (0, in_f % 2)))
        layer.codes.copy_(codes)
        layer.scale.copy_(qw.scale)
        if qw.zero is not None:
            layer.zero.copy_(qw.zero)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    def spec(self) -> dict:
        """The layer as plain data (what serialize records to rebuild it): the keys of SPEC_KEYS."""
        fmt = self.fmt
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": fmt.bits,
                "symmetric": fmt.symmetric, "group_size": fmt.group_size, "float_zero": fmt.float_zero,
                "bias": self.bias is not None, "transposed": self.transposed}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype) -> QuantizedLinear:
        """The (zero-filled) layer a `spec()` describes, in `dtype`; `transposed` may be absent (False).
        A spec with other keys raises TypeError, a bad format value RecipeError."""
        missing = [k for k in SPEC_KEYS if k not in spec and k != "transposed"]
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if missing or unknown:
            raise TypeError(f"missing fields {missing}, unknown fields {unknown}; expected {list(SPEC_KEYS)}")
        fmt = QuantFormat.from_float_zero(spec["bits"], spec["symmetric"], spec["group_size"], spec["float_zero"])
        return cls(spec["in_features"], spec["out_features"], fmt, bias=spec["bias"], dtype=dtype,
                   transposed=spec.get("transposed", False))

    def _op_format(self) -> tuple:
        """(bits, symmetric, group_size, float_zero, in_features): the format as the op's schema spells it."""
        fmt = self.fmt
        return fmt.bits, fmt.symmetric, fmt.group_size or 0, fmt.float_zero, self.in_features

    def stored_codes(self) -> torch.Tensor:
        """The codes [out, in] unpacked, as stored (unsigned: code - qmin), uint8."""
        return stored_codes(self.codes, self.fmt.bits, self.in_features)

    def signed_codes(self) -> torch.Tensor:
        """The codes [out, in] as the signed integers the format means (code + qmin), int8 for the
        symmetric formats and every 4-bit one."""
        return (self.stored_codes().to(torch.int16) + self.fmt.qrange[0]).to(torch.int8)

    def weight_values(self) -> torch.Tensor:
        """The dequantized weight [out, in] in the model dtype (what the op multiplies by)."""
        return dequantized_weight(self.codes, self.scale, self.zero, *self._op_format())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the replaced layer's storage layout ([in, out] for a Conv1D): a
        read-only copy, for code that inspects `layer.weight`; the codes are what the layer stores."""
        w = self.weight_values()
        return w.t().contiguous() if self.transposed else w

    def _act_format(self) -> tuple:
        """The absorbed input quantizer as the op's trailing arguments (none when there is none)."""
        act = getattr(self, "act", None)
        return () if act is None else (act.bits, act.symmetric, act.clip_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxquant.quantized_linear(x, self.codes, self.scale, self.zero, self.bias,
                                                  *self._op_format(), self.transposed, *self._act_format())

    def describe(self) -> str:
        """`int4 asym float-zero group 64`: the storage format in words."""
        return self.fmt.describe()

    def extra_repr(self) -> str:
        act = getattr(self, "act", None)
        inside = "" if act is None else f", int{act.bits} input quantized inside (integer product)"
        return f"in={self.in_features}, out={self.out_features}, {self.describe()}, bias={self.bias is not None}{inside}"


def integer_product_refusal(layer: QuantizedLinear) -> str | None:
    """Why `layer`'s product cannot be the integer product of its input's codes and its weight's
    (one scale per output channel, symmetric, a plain linear), or None when it can."""
    fmt = layer.fmt
    if not fmt.symmetric or fmt.group_size is not None:
        return f"{fmt.describe()} weights (the integer product takes symmetric per-channel weights)"
    if layer.transposed:
        return "a Conv1D layer (transposed product)"
    return None


def absorb_input_quantizer(layer: QuantizedLinear) -> bool:
    """Let `layer` run the per-token quantizer that runs last on its input (an ActivationFakeQuant
    hook) itself, where its product can be the integer one: `layer.act` is set and the hook becomes
    an `AbsorbedActivationQuant`, which stands aside and saves as the quantizer it was. Whether it
    runs one now (it may have already)."""
    if getattr(layer, "act", None) is not None:
        return True
    hooks = layer._forward_pre_hooks
    key = next(reversed(hooks), None) if hooks else None
    hook = hooks[key] if key is not None else None
    if type(hook) is not ActivationFakeQuant or integer_product_refusal(layer) is not None:
        return False
    layer.act = hook
    hooks[key] = AbsorbedActivationQuant(hook.bits, hook.symmetric, hook.clip_ratio)
    return True


def absorb_input_quantizers(model: torch.nn.Module) -> list[str]:
    """`absorb_input_quantizer` on every packed layer of `model`; the paths that run one."""
    return [path for path, m in model.named_modules() if isinstance(m, QuantizedLinear) and absorb_input_quantizer(m)]
