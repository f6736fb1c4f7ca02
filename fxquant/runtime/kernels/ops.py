"""The kernel ops' `OpOverload`s, for the op table and graph matching (importing registers them)."""
from __future__ import annotations

import torch

from fxquant.runtime.kernels import hadamard, int4, int8, quantize

FAMILIES = (hadamard, int4, int8, quantize)  # importing them registers the ops named below

FAST_HADAMARD = torch.ops.fxquant.fast_hadamard.default
FAST_FAKE_QUANT = torch.ops.fxquant.fast_fake_quant.default
FAST_HADAMARD_FAKE_QUANT = torch.ops.fxquant.fast_hadamard_fake_quant.default
INT4_TINYGEMM = torch.ops.fxquant.int4_tinygemm.default
INT8_WEIGHT_MM = torch.ops.fxquant.int8_weight_mm.default
