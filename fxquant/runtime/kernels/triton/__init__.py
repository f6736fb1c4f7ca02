"""Triton kernels for NVIDIA GPUs: one family per module, each checked against its torch reference.

`int4` (weight-only int4 GEMV / GEMM), `int8` (int8 x int8 -> int32 GEMM with its scale epilogue,
W4A8), `hadamard` (the fast Hadamard transform and the fused Hadamard -> per-token quantizer). The
CPU test suite runs every kernel under `TRITON_INTERPRET=1` on small shapes (fp32 / fp16 / int8:
the interpreter's bf16 math is not exact). Import these modules only where triton imports; the
families in `fxquant.runtime.kernels` pick them for CUDA tensors.
"""
