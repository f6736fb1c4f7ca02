"""The pass library, installed as `fxquant.passes`: one pass family per module.

`PASSES` maps each recipe key to its pass function and config class (None: the pass takes no
configuration). Recipes name passes only through this table.
"""
from __future__ import annotations

from fxquant.config import (
    ActQuantConfig, AWQConfig, CLEConfig, GPTQConfig, KVQuantConfig, LearnRotationsConfig, NormFoldConfig,
    ResidualRotationConfig, RotationConfig, SmoothQuantConfig, WeightQuantConfig,
)
from fxquant.passes.awq import awq_clip, awq_scale
from fxquant.passes.equalize import cross_layer_equalize, smooth_quant
from fxquant.passes.fold_norms import fold_norms, layernorms_to_rms
from fxquant.passes.gptq import gptq
from fxquant.passes.learn_rotations import learn_rotations
from fxquant.passes.pack import pack
from fxquant.passes.online_rotations import insert_online_hadamard, rotate_qk
from fxquant.passes.quantize_activations import quantize_activations, quantize_kv_cache
from fxquant.passes.quantize_weights import quantize_lm_head, quantize_weights
from fxquant.passes.rotate_residual import rotate_residual
from fxquant.passes.rotate_vo import rotate_vo

PASSES = {
    "fold_norms": (fold_norms, NormFoldConfig),  # norm weights/bias -> readers; LayerNorm stream centred
    "layernorms_to_rms": (layernorms_to_rms, None),  # centred LayerNorm -> weightless RMSNorm
    "learn_rotations": (learn_rotations, LearnRotationsConfig),  # SpinQuant: train R1/R2 (calibrated)
    "rotate_residual": (rotate_residual, ResidualRotationConfig),  # R1 (folded, or online where a fold is unproven)
    "rotate_vo": (rotate_vo, RotationConfig),  # R2
    "insert_online_hadamard": (insert_online_hadamard, NormFoldConfig),  # R4 (precision of the fold)
    "rotate_qk": (rotate_qk, None),  # R3: Hadamard on q and k after RoPE, inside attention
    "quantize_weights": (quantize_weights, WeightQuantConfig),  # RTN fake-quant weights
    "quantize_lm_head": (quantize_lm_head, WeightQuantConfig),  # RTN fake-quant the output layer too (opt-in)
    "quantize_activations": (quantize_activations, ActQuantConfig),  # per-token fake-quant inputs
    "quantize_kv_cache": (quantize_kv_cache, KVQuantConfig),  # k (after R3) and v per (token, head)
    "smooth_quant": (smooth_quant, SmoothQuantConfig),  # s = max|x|^a / max|W|^(1-a), folded (calibrated)
    "awq_scale": (awq_scale, AWQConfig),  # AWQ's searched scales, folded (calibrated)
    "awq_clip": (awq_clip, AWQConfig),  # AWQ's weight-range clip search (calibrated, lossy)
    "cross_layer_equalize": (cross_layer_equalize, CLEConfig),  # balance linear -> act -> linear ranges
    "gptq": (gptq, GPTQConfig),  # GPTQ weights from calibration Hessians, block by block
    "pack": (pack, None),  # quantized linears -> QuantizedLinear (packed codes), outputs bit-identical
}
