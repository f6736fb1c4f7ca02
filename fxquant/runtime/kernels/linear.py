"""The linear kernel table: every kernel a packed `QuantizedLinear` can run on, as data.

Entry points: `LinearKernel` (name, device type, when it refuses a layer, how it converts the
weight once, how it runs), `LINEAR_KERNELS` (the table, reference first) and `candidates(layer,
device)` (the kernels that take a layer there, with the reasons the others refuse). The reference
reads the portable codes every call (exact: it is `fxquant::quantized_linear`, which also runs a layer's
absorbed input quantizer and the integer product); every other kernel
reads buffers `prepare` made once, in its own layout, named `<kernel>_<key>` on the layer.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from fxquant.runtime.kernels import int4, int8, integer, onednn, packed_int
from fxquant.runtime.linear import QuantizedLinear


@dataclass(frozen=True)
class LinearKernel:
    """One way to compute a packed layer's product: `refusal(layer)` says why not (None: it can),
    `prepare(layer)` returns the buffers it reads, `run(layer, x)` computes y."""

    name: str
    device: str  # the device type it runs on ("cpu", "cuda"); "any" for the reference
    what: str  # the kernel in words, for the lowering report
    exact: bool  # the reference's product (bit-identical), or the exact integer product of the codes
    refusal: Callable[[torch.nn.Module], str | None]
    prepare: Callable[[torch.nn.Module], dict[str, torch.Tensor]]
    run: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    quantizes_input: bool = False  # runs the layer's absorbed activation quantizer itself


def _reference(layer, x):
    return QuantizedLinear.forward(layer, x)  # with an absorbed quantizer: the integer product's definition


def _tinygemm(layer, x):
    return int4.int4_tinygemm(x, layer.int4_tinygemm_weight, layer.int4_tinygemm_scale_zeros,
                                           int4.tinygemm_group(layer), layer.bias)


def _int8(layer, x):
    return int8.int8_weight_mm(x, layer.int8_weight_weight, layer.int8_weight_scales, layer.bias)


def _int_mm(layer, x):
    if not layer.act.symmetric:
        return integer.int_mm_linear_asym(x, layer.int_mm_codes_t, [layer.int_mm_scale, layer.int_mm_colsum],
                                          layer.bias, layer.act.bits, layer.act.clip_ratio)
    return integer.int_mm_linear(x, layer.int_mm_codes_t, layer.int_mm_scale, layer.bias,
                                 layer.act.bits, layer.act.clip_ratio)


def _onednn(layer, x):
    if not layer.act.symmetric:
        return onednn.onednn_linear_asym(x, layer.onednn_codes, [layer.onednn_scale, layer.onednn_colsum],
                                         layer.bias, layer.act.bits, layer.act.clip_ratio)
    return onednn.onednn_linear(x, layer.onednn_codes, layer.onednn_scale, layer.bias, layer.act.bits,
                                layer.act.clip_ratio)


def _packed_int(layer, x):
    return packed_int.packed_int_linear(x, layer.packed_int_weight, [layer.packed_int_scale, layer.packed_int_colsum],
                                        layer.bias, [layer.fmt.bits, layer.act.bits, int(layer.act.symmetric)],
                                        layer.act.clip_ratio)


def _float_codes(layer, x):
    kernel = integer.float_codes_linear if layer.act.symmetric else integer.float_codes_linear_asym
    return kernel(x, layer.float_codes_codes, layer.float_codes_scale, layer.bias, layer.act.bits, layer.act.clip_ratio)


def _triton_int8_refusal(layer) -> str | None:
    reason = integer.integer_refusal(layer)
    if reason is not None:
        return reason
    if not layer.act.symmetric:
        return "asymmetric activations (the Triton int8 GEMM takes symmetric per-token codes)"
    try:
        importlib.import_module("fxquant.runtime.kernels.triton.int8")
    except ImportError as exc:
        return f"triton does not import ({exc})"
    return None


def _triton_int8(layer, x):
    """The quantizer's codes (fxquant's numerics, torch ops) into the Triton int8 GEMM: exact sums."""
    from fxquant.quant.numerics import row_codes
    from fxquant.runtime.kernels.triton import int8 as triton_int8

    q, x_scale, _ = row_codes(x.reshape(-1, x.shape[-1]), layer.act.bits, True, layer.act.clip_ratio)
    y = triton_int8.int8_linear(q.to(torch.int8), x_scale, layer.triton_int8_codes, layer.triton_int8_scale,
                                layer.bias, x.dtype)
    return y.view(*x.shape[:-1], layer.out_features)


def _triton_int4_refusal(layer) -> str | None:
    if layer.fmt.bits != 4:
        return f"{layer.fmt.bits}-bit codes (the kernel is int4)"
    try:
        from fxquant.runtime.kernels.triton import int4 as triton_int4
    except ImportError as exc:
        return f"triton does not import ({exc})"
    groups = layer.scale.shape[1]
    try:
        triton_int4.check_group(layer.in_features, groups)
    except ValueError as exc:
        return str(exc)
    return None


def _triton_int4_prepare(layer) -> dict[str, torch.Tensor]:
    from fxquant.runtime.kernels.triton import int4 as triton_int4

    w = triton_int4.prepare_int4(layer.codes, layer.scale, layer.zero, layer.fmt, layer.in_features)
    return {"codes": w.codes, "scale": w.scale, **({"offset": w.offset} if w.offset is not None else {})}


def _triton_int4(layer, x):
    return torch.ops.fxquant.triton_int4_linear(x, layer.triton_int4_codes, layer.triton_int4_scale,
                                                getattr(layer, "triton_int4_offset", None), layer.bias)


REFERENCE = LinearKernel("reference", "any", "fxquant::quantized_linear (dequantize + F.linear; the integer "
                         "product where the input is quantized inside)", True, lambda layer: None, lambda layer: {},
                         _reference, quantizes_input=True)
LINEAR_KERNELS = (
    REFERENCE,
    LinearKernel("int4_tinygemm", "cpu", "int4 tinygemm (aten._weight_int4pack_mm_for_cpu, bf16 activations)",
                 False, int4.tinygemm_refusal, int4.to_tinygemm, _tinygemm),
    LinearKernel("int8_weight", "cpu", "int8 weights (aten._weight_int8pack_mm, bf16 activations)",
                 False, int8.int8_refusal, int8.to_int8pack, _int8),
    LinearKernel("packed_int", "cpu", "exact integer product (fxquant's C kernel: weights at their width, "
                 "quantizer and epilogue in one call)", True, packed_int.packed_int_refusal, packed_int.to_packed_int,
                 _packed_int, quantizes_input=True),
    LinearKernel("onednn", "cpu", "exact integer product (oneDNN u8 x s8 GEMM, int8 weights in memory)", True,
                 onednn.onednn_refusal, onednn.to_onednn, _onednn, quantizes_input=True),
    LinearKernel("int_mm", "cpu", "exact integer product (torch._int_mm, int8 x int8 -> int32)", True,
                 integer.integer_refusal, integer.to_int_mm, _int_mm, quantizes_input=True),
    LinearKernel("float_codes", "any", "exact integer product (float32 GEMM of the codes)", True,
                 integer.float_codes_refusal, integer.to_float_codes, _float_codes, quantizes_input=True),
    LinearKernel("triton_int8", "cuda", "exact integer product (Triton int8 GEMM, int32 sums)", True,
                 _triton_int8_refusal, integer.to_int8_codes, _triton_int8, quantizes_input=True),
    LinearKernel("triton_int4", "cuda", "Triton int4 GEMV (M <= 16) / GEMM", False,
                 _triton_int4_refusal, _triton_int4_prepare, _triton_int4),
)
KERNELS = {k.name: k for k in LINEAR_KERNELS}


def candidates(layer, device: torch.device) -> tuple[list[LinearKernel], dict[str, str]]:
    """(kernels that run `layer` on `device`, reference first; {kernel name: why it refuses})."""
    usable, refused = [], {}
    for kernel in LINEAR_KERNELS:
        if kernel.device not in ("any", torch.device(device).type):
            continue
        reason = kernel.refusal(layer)
        if reason is None:
            usable.append(kernel)
        else:
            refused[kernel.name] = reason
    return usable, refused
