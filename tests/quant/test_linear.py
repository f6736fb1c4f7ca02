"""QuantizedLinear: the packed layer computes exactly what its fake-quant layer computes."""
from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from fxquant.config import WeightQuantConfig
from fxquant.quant.rtn import quantize_weight
from fxquant.runtime.linear import QuantizedLinear
from fxquant.weights import canonical

SCHEMES = [  # (bits, symmetric, group_size, zero_point)
    (8, True, None, "float"), (8, False, None, "int"), (4, True, None, "float"), (4, True, 32, "float"),
    (4, False, 32, "float"), (4, False, 64, "float"), (4, False, 32, "int"), (3, False, 32, "float"),
]


def _layers(kind: str, dtype, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        return torch.nn.Linear(128, 48, bias=True, dtype=dtype), False
    layer = Conv1D(48, 128)  # GPT-2's layer: weight stored [in, out], computed with addmm
    layer.to(dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.bias.normal_(0, 0.1)
    return layer, True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bits,symmetric,group,zero_point", SCHEMES)
def test_packed_layer_output_equals_the_fake_quant_layer_output_exactly(bits, symmetric, group, zero_point, kind,
                                                                         dtype):
    layer, transposed = _layers(kind, dtype)
    cfg = WeightQuantConfig(bits, symmetric, group, zero_point=zero_point)
    qw = quantize_weight(canonical(layer.weight.detach(), transposed), cfg)
    with torch.no_grad():
        layer.weight.copy_(canonical(qw.values(dtype), transposed))  # the fake-quant layer
    packed = QuantizedLinear.from_weight(qw, layer.bias, transposed)
    x = torch.randn(3, 5, 128, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(packed(x), layer(x))
    assert packed.scale.dtype == dtype and (packed.zero is None) == symmetric
    assert packed.codes.dtype == torch.uint8
    assert packed.codes.shape == (48, 64 if bits <= 4 else 128)  # two codes per byte at 4 bits and fewer
    assert torch.equal(packed.weight, layer.weight)  # the read-only dequantized view, in storage layout


def test_tinygemm_layout_stores_codes_from_the_group_min_and_a_float_zero():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    qw = quantize_weight(w, WeightQuantConfig(4, False, 32))  # zero_point="float" is the default
    layer = QuantizedLinear.from_weight(qw, None)
    g = w.reshape(4, 2, 32)
    torch.testing.assert_close(layer.scale, ((g.amax(-1) - g.amin(-1)) / 15).clamp_min(1e-6))
    torch.testing.assert_close(layer.zero, g.amin(-1) + 8 * layer.scale)
    low = layer.codes & 0xF  # element 0 of each byte pair: u = round((w - min) / scale)
    expected = torch.round((w[:, 0::2] - g.amin(-1).repeat_interleave(16, 1)) / layer.scale.repeat_interleave(16, 1))
    assert torch.equal(low.float(), expected.clamp(0, 15))


def test_the_op_passes_opcheck_and_its_fake_has_the_output_shape():
    qw = quantize_weight(torch.randn(24, 64), WeightQuantConfig(4, False, 32))
    layer = QuantizedLinear.from_weight(qw, torch.randn(24))
    args = (torch.randn(2, 7, 64), layer.codes, layer.scale, layer.zero, layer.bias, 4, False, 32, True, 64, False)
    torch.library.opcheck(torch.ops.fxquant.quantized_linear.default, args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.fxquant.quantized_linear(torch.empty(2, 7, 64), *args[1:])
    assert out.shape == (2, 7, 24)


def test_export_shows_one_quantized_linear_node_per_layer():
    qw = quantize_weight(torch.randn(24, 64), WeightQuantConfig(8, True))
    model = torch.nn.Sequential(QuantizedLinear.from_weight(qw, None), torch.nn.ReLU())
    graph = torch.export.export(model, (torch.randn(2, 64),)).graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert targets.count("fxquant.quantized_linear.default") == 1 and "aten.linear.default" not in targets


SAVED_SPECS = [  # what fxquant.save wrote for packed layers before QuantFormat (the same keys it writes now)
    {"in_features": 64, "out_features": 24, "bits": 4, "symmetric": False, "group_size": 32, "float_zero": True,
     "bias": True, "transposed": False},
    {"in_features": 64, "out_features": 24, "bits": 4, "symmetric": False, "group_size": 32, "float_zero": False,
     "bias": False, "transposed": True},
    {"in_features": 64, "out_features": 24, "bits": 8, "symmetric": True, "group_size": None, "float_zero": False,
     "bias": False, "transposed": False},
]


@pytest.mark.parametrize("spec", SAVED_SPECS)
def test_saved_specs_rebuild_the_layer_and_round_trip(spec):
    layer = QuantizedLinear.from_spec(spec, torch.bfloat16)
    assert layer.spec() == spec and layer.scale.dtype == torch.bfloat16
    assert layer.fmt.float_zero == spec["float_zero"] and (layer.zero is None) == spec["symmetric"]
    without = {k: v for k, v in spec.items() if k != "transposed"}  # older saves may lack it: False
    assert QuantizedLinear.from_spec(without, torch.float32).transposed is False


def test_a_spec_with_other_fields_is_refused():
    with pytest.raises(TypeError, match=r"unknown fields \['kernel'\]"):
        QuantizedLinear.from_spec({**SAVED_SPECS[0], "kernel": "marlin"}, torch.float32)
    with pytest.raises(TypeError, match=r"missing fields \['bits'\]"):
        QuantizedLinear.from_spec({k: v for k, v in SAVED_SPECS[0].items() if k != "bits"}, torch.float32)
