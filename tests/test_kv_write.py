"""The KV cache written once: R3 and the KV quantizer run on the rows entering the cache, not on the
whole cache at every decode step, and give what reading the raw cache gives (runtime/attention.py)."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

import fxquant
from fxquant.lowering import lower
from fxquant.models import tiny_model
from fxquant.runtime import attention
from fxquant.runtime.attention import ATTR, TAG, AttentionTransform


@pytest.fixture(scope="module")
def quantized():
    model = tiny_model("llama", seed=0)
    fxquant.quantize(model, "quarot-w4a4kv4")
    return model.eval()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@contextmanager
def reading_raw(model):
    """Without the writer: the cache keeps raw rows and the transform runs on all of them per call."""
    removed = []
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is attention.write_kv_hook:
                removed.append((module, key, hook))
                del module._forward_pre_hooks[key]
    try:
        yield
    finally:
        for module, key, hook in removed:
            module._forward_pre_hooks[key] = hook


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                              return_dict_in_generate=True, output_logits=True, **kw)


def _assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


@pytest.mark.parametrize("lowered", [False, True])
@pytest.mark.parametrize("fields", [{}, {"kv_group_size": 8, "kv_sink_tokens": 2}, {"kv_bits": None}])
def test_writing_the_cache_gives_what_reading_it_raw_gives(quantized, lowered, fields):
    model = copy.deepcopy(quantized)
    for module in model.modules():
        if getattr(module, ATTR, None) is not None:
            setattr(module, ATTR, AttentionTransform(**{**vars(getattr(module, ATTR)), **fields}))
    if lowered:
        lower(model, plan="rule")
    ids = _ids(7)
    written = _generate(model, ids)
    with reading_raw(model):
        raw = _generate(model, ids)
    _assert_same_generation(written, raw)
    # the beam search reorders the cache's rows: transformed rows reorder like raw ones
    with reading_raw(model):
        beams_raw = _generate(model, ids, num_beams=2)
    assert torch.equal(_generate(model, ids, num_beams=2).sequences, beams_raw.sequences)


def test_a_decode_step_transforms_only_the_new_rows(quantized, monkeypatch):
    model = copy.deepcopy(quantized)
    rows = []
    write = AttentionTransform.write
    monkeypatch.setattr(AttentionTransform, "write", lambda self, k, v, start=0: rows.append(
        (k.shape[-2], start)) or write(self, k, v, start))
    with torch.no_grad():
        out = model(_ids(9), use_cache=True)
        layers = model.config.num_hidden_layers
        assert rows == [(9, 0)] * layers  # prefill: every row once, from position 0
        rows.clear()
        model(_ids(1, seed=1), past_key_values=out.past_key_values, use_cache=True)
    assert rows == [(1, 9)] * layers  # a decode step: one row per layer, at position 9
    tags = {getattr(layer, TAG) for layer in out.past_key_values.layers}
    assert tags == {getattr(model.model.layers[0].self_attn, ATTR).numerics()}


def test_a_cache_of_raw_rows_is_read_raw_to_the_end(quantized):
    model = copy.deepcopy(quantized)
    ids = _ids(8)
    with torch.no_grad():
        with reading_raw(model):  # the prompt's rows enter raw
            out = model(ids[:, :6], use_cache=True)
        cache = out.past_key_values
        step = model(ids[:, 6:7], past_key_values=cache, use_cache=True).logits[:, -1]
        full = model(ids[:, :7], use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    assert all(getattr(layer, TAG, None) is None for layer in cache.layers)  # still raw: never mixed


def test_a_cache_written_by_another_transform_is_refused_with_the_reason(quantized):
    model = copy.deepcopy(quantized)
    other = copy.deepcopy(quantized)
    for module in other.modules():
        if getattr(module, ATTR, None) is not None:
            setattr(module, ATTR, AttentionTransform(**{**vars(getattr(module, ATTR)), "kv_bits": 8}))
    with torch.no_grad():
        cache = model(_ids(5), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="start a new cache"):
            other(_ids(1), past_key_values=cache, use_cache=True)


def test_the_writer_survives_save_and_load(quantized, tmp_path):
    fxquant.save(quantized, tmp_path / "m")
    loaded = fxquant.load(tmp_path / "m")
    hooked = [m for m in loaded.modules() if attention.write_kv_hook in m._forward_pre_hooks.values()]
    assert len(hooked) == loaded.config.num_hidden_layers
    _assert_same_generation(_generate(loaded, _ids(6)), _generate(quantized, _ids(6)))


def test_a_forward_with_gradients_reads_its_cache_raw_and_backpropagates():
    model = tiny_model("llama")  # float weights, the attention transform alone (as learned rotations train)
    for layer in model.model.layers:
        attention.install(model, layer.self_attn, rotate_qk=True, kv_bits=4, kv_symmetric=False)
    out = model(_ids(8), use_cache=True)  # transformers makes a cache by default
    out.logits.sum().backward()  # an in-place write into the cache would break autograd here
    assert model.model.layers[0].self_attn.v_proj.weight.grad.abs().sum() > 0
    assert all(getattr(layer, TAG, None) is None for layer in out.past_key_values.layers)
    with torch.no_grad():
        ref = model(_ids(8), use_cache=False).logits
    torch.testing.assert_close(out.logits.detach(), ref, rtol=1e-5, atol=1e-5)
