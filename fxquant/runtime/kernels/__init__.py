"""Kernels: the fast implementations of fxquant's inference ops, one family per module.

Each family module holds the op's torch reference (the numerics, from fxquant.quant.numerics and
fxquant.hadamard) beside its kernels, and says which kernel serves which device and token count.
`triton/` holds the GPU kernels. Nothing here edits a model: `fxquant.lower` does that.
"""
