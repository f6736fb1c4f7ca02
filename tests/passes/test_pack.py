"""The pack pass: quantized layers become QuantizedLinear holding integer codes, outputs bit-identical."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS
from fxquant import apply_recipe, quantize
from fxquant.analysis import analyse
from fxquant.capture import capture
from fxquant.errors import PassError, RecipeError
from fxquant.models import tiny_model
from fxquant.runtime.hooks import OnlineHadamard
from fxquant.quant.pack import pack_model
from fxquant.quant.records import recorded
from fxquant.runtime.hooks import AbsorbedActivationQuant, ActivationFakeQuant
from fxquant.quant.numerics import row_codes
from fxquant.runtime.linear import QuantizedLinear
from fxquant.recipes import PRESETS

W4 = {"pass": "quantize_weights", "bits": 4, "symmetric": False, "group_size": 16}


def _ids(seed=0):
    return torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


def _packed(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _unpacked(preset: str) -> dict:
    """The preset's passes without its final pack step."""
    steps = PRESETS[preset]
    assert steps[-1][0] == "pack"
    return {"passes": [{"pass": key, **fields} for key, fields in steps[:-1]]}


@pytest.mark.parametrize("arch", ARCHS)
def test_packing_is_bit_exact_on_every_architecture(arch):
    fake, packed = tiny_model(arch), tiny_model(arch)
    quantize(fake, {"passes": [W4]})
    result = apply_recipe(packed, {"passes": [W4, {"pass": "pack"}]})
    blocked = {b.module for b in result.results["pack"].blocked}
    left = {n for n, m in packed.named_modules() if recorded(m) and not isinstance(m, QuantizedLinear)}
    assert left == blocked and len(_packed(packed)) == len(result.results["pack"].changes) >= 4
    with torch.no_grad():
        assert torch.equal(packed(_ids()).logits, fake(_ids()).logits)
    out = packed.generate(_ids()[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, fake.generate(_ids()[:1], max_new_tokens=6, do_sample=False))


def test_stacked_experts_are_reported_not_packed():
    model = tiny_model("mixtral")
    result = apply_recipe(model, {"passes": [W4, {"pass": "pack"}]})
    reasons = {b.module: b.reason for b in result.results["pack"].blocked}
    assert reasons and all(m.endswith(("experts", "gate")) and "not a linear layer" in r for m, r in reasons.items())
    assert all("experts" not in n for n in _packed(model))


def test_hooks_and_online_hadamards_move_to_the_packed_layer():
    fake, packed = tiny_model("llama"), tiny_model("llama")
    quantize(fake, _unpacked("quarot-w4a4kv4"))
    quantize(packed, "quarot-w4a4kv4")
    down = packed.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantizedLinear)
    hooks = list(down._forward_pre_hooks.values())
    # R4, then the int4 quantizer, which the layer runs itself (symmetric per-channel weights)
    assert [type(h) for h in hooks] == [OnlineHadamard, AbsorbedActivationQuant]
    assert down.act == ActivationFakeQuant(4, True, 1.0) and hooks[1] == AbsorbedActivationQuant(4, True, 1.0)
    x = torch.randn(6, down.in_features)
    with torch.no_grad():
        want, got = fake.model.layers[0].mlp.down_proj(x), down(x)
    # the same codes; the exact integer product, against the float product of their values
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    assert not torch.equal(got, want)
    signed = down.signed_codes().double()
    h = torch.ops.fxquant.hadamard(x)
    q, s, _ = row_codes(h, 4, True)
    exact = ((q.double() @ signed.t()).float() * s * down.scale[:, 0].float())
    assert torch.equal(got, exact)


def test_pack_refuses_a_layer_that_does_not_compute_what_its_fake_quant_layer_did(monkeypatch):
    model = tiny_model("llama")
    quantize(model, _unpacked("w8a8"))
    monkeypatch.setattr(QuantizedLinear, "forward", lambda self, x: torch.zeros(*x.shape[:-1], self.out_features))
    with pytest.raises(PassError, match=r"packed 'model\.layers\.0\.self_attn\.q_proj' does not compute"):
        pack_model(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing was replaced


def test_int4_codes_take_an_eighth_of_the_float32_bytes():
    model = tiny_model("llama")
    float_bytes = {n: m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize(model, {"preset": "w4a16", "group_size": 32})
    for name, layer in _packed(model).items():
        assert layer.codes.numel() * layer.codes.element_size() == float_bytes[name] // 8
        stored = sum(t.numel() * t.element_size() for t in (layer.codes, layer.scale, layer.zero))
        assert stored == float_bytes[name] * 3 // 16  # + a float32 scale and zero per 32 weights: 5.3x smaller


def test_a_bfloat16_model_packs_with_bfloat16_scales_and_exact_outputs():
    fake, packed = tiny_model("llama", dtype=torch.bfloat16), tiny_model("llama", dtype=torch.bfloat16)
    quantize(fake, {"passes": [W4]})
    quantize(packed, {"passes": [W4, {"pass": "pack"}]})
    layer = packed.model.layers[0].self_attn.q_proj
    assert layer.scale.dtype == torch.bfloat16 and layer.zero.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(packed(_ids()).logits, fake(_ids()).logits)


def test_a_weight_edited_after_quantization_is_refused_by_name():
    model = tiny_model("llama")
    quantize(model, {"passes": [W4]})
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(PassError, match=r"'model\.layers\.1\.mlp\.up_proj' is not the quantized weight"):
        pack_model(model)


def test_pack_must_come_last_and_needs_quantized_weights():
    with pytest.raises(RecipeError, match=r"passes\[0\]: 'pack' must be the last pass"):
        quantize(tiny_model("llama"), {"passes": [{"pass": "pack"}, W4]})
    with pytest.raises(RecipeError, match="weights_quantized"):
        quantize(tiny_model("llama"), {"passes": [{"pass": "pack"}]})


def test_a_packed_model_refuses_more_passes_and_still_captures():
    model = quantize(tiny_model("llama"), "w8a8")
    with pytest.raises(RecipeError, match=r"'model\.layers\.0\.self_attn\.q_proj' is already packed"):
        quantize(model, "rotate-r1r2")
    cg = capture(model)
    nodes = [n for n in cg.graph.nodes if str(n.target) == "fxquant.quantized_linear.default"]
    assert len(nodes) == 14
    structure = analyse(cg)  # a packed model is still analysable: its layers show as opaque ops
    layers = [f"model.layers.{i}" for i in range(2)]
    # no packed layer is taken for a linear: lm_head (float) is the stream's only reader left, and
    # nothing writes, chains or folds through a quantized_linear node
    assert {r.module for g in structure.stream.groups for r in g.readers} == {"lm_head"}
    assert structure.stream.writers == () and structure.vo_chains == () and structure.mlp_chains == ()
    # ...and every place a packed layer stops the analysis is reported, not dropped
    opaque = {b.module for b in structure.blocked if "quantized_linear" in b.reason}
    # (each packed layer reads the norm's output itself: it runs its input's quantizer inside)
    packed = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert opaque == {f"{layer}.{m}" for layer in layers
                      for m in (*(f"self_attn.{p}" for p in packed), "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                "self_attn")}


def test_torch_compile_of_a_packed_model_matches_eager():
    model = quantize(tiny_model("llama"), {"preset": "w4a16", "group_size": 32})
    with torch.no_grad():
        eager = model(_ids(), use_cache=False).logits
        compiled = torch.compile(model)(_ids(), use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
