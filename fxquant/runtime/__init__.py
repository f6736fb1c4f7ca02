"""The runtime room: everything that runs at inference, apart from what transforms a model.

`library` defines fxquant's torch.library ops (`fxquant::hadamard`, `::fake_quant`,
`::quantized_linear`) with their reference implementations and fake (shape) functions; `hooks` holds
the forward pre-hooks that call them on a layer's input; `attention` is the attention
implementation that applies R3 and the KV-cache quantizer; `linear` is the packed `QuantizedLinear`.
`kernels/` holds the fast implementations (one family per module, reference beside kernels, Triton
for GPUs) and `lowered` the objects `fxquant.lower` swaps in: `LoweredLinear` and the fast twins of
the hooks and attention transform. Passes and lowering install these objects on a model; nothing
here imports a pass, the pipeline or analysis.
"""
