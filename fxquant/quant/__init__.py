"""Quantization: the format and tensor math (leaves) and the libraries quantizing passes call.

Leaves (no fx, no modules): `format` (QuantFormat, the one value for how codes are read), `numerics`
(the reference every kernel matches), `packed` (int4 two per byte), `gptq` (the solver). Engine:
`rtn` (round-to-nearest of a model's linears), `records` (which codes were chosen for which
weight), `pack` (quantized linears -> QuantizedLinear).
"""
