"""Quantization: integer numerics (a leaf) and the configs of quantizing passes."""
