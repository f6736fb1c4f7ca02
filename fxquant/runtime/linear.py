"""The packed quantized linear: integer codes stored as a kernel reads them.

Entry point: `QuantizedLinear`, the module that holds `codes` (uint8: int4 two per byte, int8 one per
byte), `scale` and `zero` ([out, groups], in the model dtype) in the `QuantFormat` `fmt`, and calls
`fxquant::quantized_linear` (fxquant.runtime.library). The one idea: the op's reference
implementation dequantizes with `fxquant.quant.numerics` and multiplies exactly as the layer it
replaced did (`F.linear`, or `addmm` for a transformers Conv1D), so a packed model computes bit for
bit what its fake-quant model did; `torch.export` and `torch.compile` see one named node, which a
kernel can replace. `spec()` / `from_spec()` are the layer as plain data, in the keys saved
directories have always used (the format as bits, symmetric, group_size, float_zero).
"""
from __future__ import annotations

import torch

from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import QuantizedWeight
from fxquant.quant.packed import pack_int4
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxquant.quantized_linear(x, self.codes, self.scale, self.zero, self.bias,
                                                  *self._op_format(), self.transposed)

    def describe(self) -> str:
        """`int4 asym float-zero group 64`: the storage format in words."""
        return self.fmt.describe()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.describe()}, bias={self.bias is not None}"
