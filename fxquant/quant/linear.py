"""The packed quantized linear: integer codes stored as a kernel reads them, and the reference op.

Entry points: the custom op `torch.ops.fxquant.quantized_linear` and `QuantizedLinear`, the module
that holds `codes` (uint8: int4 two per byte, int8 one per byte), `scale` and `zero` ([out, groups],
in the model dtype) and calls the op. The one idea: the op's reference implementation dequantizes
with `fxquant.quant.numerics` and multiplies exactly as the layer it replaced did (`F.linear`, or
`addmm` for a transformers Conv1D), so a packed model computes bit for bit what its fake-quant
model did; `torch.export` and `torch.compile` see one named node, which a kernel can replace.
"""
from __future__ import annotations

import torch

from fxquant.quant.numerics import QuantizedWeight, describe_format
from fxquant.quant.packed import pack_int4, unpack_int4


def packs_two_per_byte(bits: int) -> bool:
    """Codes of at most 4 bits are stored two per byte."""
    return bits <= 4


def _weight(codes, scale, zero, bits, symmetric, group_size, float_zero, in_features) -> torch.Tensor:
    unpacked = unpack_int4(codes)[..., :in_features] if packs_two_per_byte(bits) else codes
    return QuantizedWeight(unpacked, scale, zero, bits, symmetric, group_size or None, float_zero).values()


@torch.library.custom_op("fxquant::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     bias: torch.Tensor | None, bits: int, symmetric: bool, group_size: int, float_zero: bool,
                     in_features: int, transposed: bool) -> torch.Tensor:
    """y = x W^T + b with W dequantized from `codes` (`group_size` 0: one scale per output row);
    `transposed`: the product as transformers' Conv1D computes it (addmm with W^T stored contiguous)."""
    w = _weight(codes, scale, zero, bits, symmetric, group_size, float_zero, in_features)
    if transposed:
        return torch.addmm(bias, x.reshape(-1, in_features), w.t().contiguous()).view(*x.shape[:-1], w.shape[0])
    return torch.nn.functional.linear(x, w, bias)


@quantized_linear.register_fake
def _quantized_linear_fake(x, codes, scale, zero, bias, bits, symmetric, group_size, float_zero, in_features,
                           transposed):
    return x.new_empty(*x.shape[:-1], scale.shape[0])


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
        return _weight(self.codes, self.scale, self.zero, self.bits, self.symmetric, self.group_size or 0,
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
