"""Pack: every layer whose weight a quantize pass left on an integer grid becomes a `QuantizedLinear`
holding that grid's codes (int4 two per byte, int8 one per byte) and its scales and zeros in the
model dtype, computing what it did (exactly, or as the exact integer product where the layer takes
its input's quantizer over) with a quarter (int8) or an eighth (int4) of the float32 weight's bytes. The library is `fxquant.quant.pack` (the recorded codes, never re-derived; hooks
move to the new layer). Packing is the last step of a recipe: later passes would not find float
weights to edit.
"""
from __future__ import annotations

from fxquant.pipeline import PassResult, fxpass
from fxquant.quant.pack import pack_model


@fxpass(requires={"weights_quantized"}, provides={"weights_packed"}, invalidates={"graph", "structure", "outputs"})
def pack(cg, structure, cfg=None) -> PassResult:
    """Store every quantized linear as packed integer codes: outputs bit-identical, except the layers
    that take their input's quantizer over (the exact integer product, float32 rounding apart; with
    4-bit activations such differences flip codes downstream, so the pipeline's end-to-end output
    check cannot bound them: each layer is checked against its fake-quant self as it is packed)."""
    changes, blocked = pack_model(cg.model)
    return PassResult(tuple(changes), tuple(blocked))
