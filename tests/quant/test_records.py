"""The quantized-weight records: owned by fxquant.quant.records, not hidden on the module."""
from __future__ import annotations

import gc
import weakref

import torch

from fxquant import quantize
from fxquant.models import tiny_model
from fxquant.quant import records
from fxquant.config import WeightQuantConfig
from fxquant.quant.rtn import apply_quantized, quantize_weight


def _layer_and_weight():
    layer = torch.nn.Linear(64, 8)
    return layer, quantize_weight(layer.weight.detach(), WeightQuantConfig(4, False, 32))


def test_apply_writes_the_values_and_records_the_codes_off_the_module():
    layer, qw = _layer_and_weight()
    attributes = set(vars(layer))
    apply_quantized(layer, "weight", qw, False)
    assert torch.equal(layer.weight, qw.values(layer.weight.dtype))
    assert dict(records.recorded(layer)) == {"weight": (qw, False)}
    assert set(vars(layer)) == attributes  # no side channel in module.__dict__
    records.forget(layer)
    assert dict(records.recorded(layer)) == {}


def test_records_go_with_their_module_and_a_snapshot_restores_them_exactly():
    layer, qw = _layer_and_weight()
    other = torch.nn.Linear(64, 8)
    saved = records.snapshot([layer, other])
    records.record(layer, "weight", qw, False)
    records.record(other, "weight", qw, True)
    records.restore(saved)
    assert not records.recorded(layer) and not records.recorded(other)
    records.record(layer, "weight", qw, False)
    alive = weakref.ref(layer)
    del layer, saved
    gc.collect()
    assert alive() is None  # the registry holds its modules weakly: a dropped model takes its records along


def test_quantize_records_every_quantized_layer_and_pack_takes_them():
    fake, packed = tiny_model("llama"), tiny_model("llama")
    w4 = {"pass": "quantize_weights", "bits": 4, "symmetric": False, "group_size": 16}
    quantize(fake, {"passes": [w4]})
    quantize(packed, {"passes": [w4, {"pass": "pack"}]})
    assert sum(1 for m in fake.modules() if records.recorded(m)) == 14
    assert not any(records.recorded(m) for m in packed.modules())  # the codes live in the QuantizedLinears
