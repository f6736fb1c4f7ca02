"""The packed quantized linear: integer codes stored as a kernel reads them.

Entry point: `QuantizedLinear`, the module that holds `codes` (uint8: int4 two per byte, int8 one per
byte), `scale` and `zero` ([out, groups], in the model dtype) and calls `fxquant::quantized_linear`
(fxquant.runtime.library). The one idea: the op's reference implementation dequantizes
with `fxquant.quant.numerics` and multiplies exactly as the layer it replaced did (`F.linear`, or
`addmm` for a transformers Conv1D), so a packed model computes bit for bit what its fake-quant
model did; `torch.export` and `torch.compile` see one named node, which a kernel can replace.
"""
from __future__ import annotations

import torch

from fxquant.quant.numerics import QuantizedWeight, describe_format
from fxquant.quant.packed import pack_int4
from fxquant.runtime.library import dequantized_weight, packs_two_per_byte


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose weight is stored as packed integer codes with scales (and zeros)."""

    def __init__(self, in_features: int, out_features: int, bits: int, symmetric: bool, group_size: int | None,
                 float_zero: bool, bias: bool, dtype: torch.dtype = torch.float32, transposed: bool = False,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric, self.group_size = bits, symmetric, group_size
        self.float_zero, self.transposed = float_zero and not symmetric, transposed
        groups = 1 if group_size is None else in_features // group_size
        width = (in_features + 1) // 2 if packs_two_per_byte(bits) else in_features
        self.register_buffer("codes", torch.zeros(out_features, width, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        zero = None if symmetric else torch.zeros(out_features, groups, dtype=dtype, device=device)
        self.register_buffer("zero", zero)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_weight(cls, qw: QuantizedWeight, bias: torch.Tensor | None, transposed: bool = False) -> QuantizedLinear:
        """The packed form of a quantized weight [out, in] (codes, scales, zeros) and its layer's bias."""
        out_f, in_f = qw.codes.shape
        device = qw.scale.device
        layer = cls(in_f, out_f, qw.bits, qw.symmetric, qw.group_size, qw.float_zero, bias is not None,
                    qw.scale.dtype, transposed, device)
        codes = qw.codes
        if packs_two_per_byte(qw.bits):
            codes = pack_int4(torch.nn.functional.pad(codes, (0, in_f % 2)))
        layer.codes.copy_(codes)
        layer.scale.copy_(qw.scale)
        if qw.zero is not None:
            layer.zero.copy_(qw.zero)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    def spec(self) -> dict:
        """The constructor arguments as plain data (what serialize records to rebuild the layer)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "symmetric": self.symmetric, "group_size": self.group_size, "float_zero": self.float_zero,
                "bias": self.bias is not None, "transposed": self.transposed}

    def weight_values(self) -> torch.Tensor:
        """The dequantized weight [out, in] in the model dtype (what the op multiplies by)."""
        return dequantized_weight(self.codes, self.scale, self.zero, self.bits, self.symmetric, self.group_size or 0,
                       self.float_zero, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the replaced layer's storage layout ([in, out] for a Conv1D): a
        read-only copy, for code that inspects `layer.weight`; the codes are what the layer stores."""
        w = self.weight_values()
        return w.t().contiguous() if self.transposed else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxquant.quantized_linear(x, self.codes, self.scale, self.zero, self.bias, self.bits,
                                                  self.symmetric, self.group_size or 0, self.float_zero,
                                                  self.in_features, self.transposed)

    def describe(self) -> str:
        """`int4 asym float-zero group 64`: the storage format in words."""
        return describe_format(self.bits, self.symmetric, self.group_size, self.float_zero)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.describe()}, bias={self.bias is not None}"
