"""fxquant.lower on tiny models: same outputs as the packed model, the report, save / load portability."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fxquant
from fxquant.lowering import lower, lowering_report
from fxquant.models import tiny_model
from fxquant.runtime.hooks import AbsorbedActivationQuant, ActivationFakeQuant, OnlineHadamard, hooks_of
from fxquant.runtime.kernels import onednn, packed_int
from fxquant.runtime.linear import QuantizedLinear
from fxquant.runtime.lowered import (
    FastActivationQuant, FastAttentionTransform, FastHadamardQuant, FastOnlineHadamard,
    LoweredLinear,
)
from fxquant.runtime.attention import ATTR


def _quantized(arch: str, recipe, seed: int = 0):
    model = tiny_model(arch, seed=seed)
    fxquant.quantize(model, recipe)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# (arch, recipe, relative error bound). Layers with quantized activations and symmetric per-channel
# weights run the exact integer product: float32 rounding apart. The bfloat16 kernels (weight-only
# layers, grouped weights) round activations and outputs to 2^-9: the logits move by under 2%.
PRESETS = [("llama", {"preset": "w4a16", "group_size": 32}, 0.02), ("llama", "w8a8", 1e-5),
           ("gpt2", "w8a8", 0.02), ("llama", {"preset": "w4a8", "group_size": 32}, 0.03),
           ("llama", "quarot-w4a4kv4", 1e-5), ("qwen2", "quarot-w4a4kv4", 1e-5)]


@pytest.mark.parametrize("arch,recipe,bound", PRESETS, ids=lambda v: str(v))
def test_a_lowered_model_computes_what_the_packed_model_computes(arch, recipe, bound):
    model = _quantized(arch, recipe)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))  # M = 9 <= 16: the decode kernels run
    ref = _logits(model, ids)
    assert lower(model, plan="rule") is model
    out = _logits(model, ids)
    assert any(isinstance(m, LoweredLinear) for m in model.modules())
    assert (out - ref).norm() <= bound * ref.norm()
    assert not torch.equal(out, ref)  # the kernels ran (the reference is bit-exact)
    generated = model.generate(ids[:, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_above_the_decode_range_the_exact_reference_runs():
    model = _quantized("llama", "quarot-w4a4kv4")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))  # M = 24 > 16: the rule's reference
    ref = _logits(model, ids)
    lower(model, plan="rule")
    for module in model.modules():
        if isinstance(module, LoweredLinear):
            assert module.plan.prefill == "reference"
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("preset", ["quarot-w4a4kv4", "w4a4", "rotate-r1r2r4-w16a4", "quarot-w4a8"])
def test_lowered_integer_presets_are_bit_exact_with_the_packed_model_on_every_exact_plan(arch, preset):
    """4-bit activations turn any last-bit difference into flipped codes (docs/BENCHMARKS.md), so the
    packed model's numerics are the kernels': the exact integer product, the CPU Hadamard's arithmetic."""
    model = _quantized(arch, preset)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    for plan in ("rule", "decode", "measure"):
        lower(model, plan=plan)
        assert torch.equal(_logits(model, ids), ref), plan


def test_quarot_hooks_and_attention_become_fast_twins_that_still_read_as_portable():
    model = _quantized("llama", "quarot-w4a4kv4")
    online, quant = len(hooks_of(model, OnlineHadamard)), len(hooks_of(model, ActivationFakeQuant))
    lower(model, plan="rule")
    assert len(hooks_of(model, OnlineHadamard)) == online and len(hooks_of(model, ActivationFakeQuant)) == quant
    # every quantizer is taken over by its layer's integer kernel; the R4 Hadamard runs on the fast op
    assert len(hooks_of(model, AbsorbedActivationQuant)) == quant
    assert len(hooks_of(model, FastOnlineHadamard)) == online
    lower(model, plan="fast")  # where a bf16 kernel wins, the quantizer runs as a hook (fused after R4)
    absorbed = len(hooks_of(model, AbsorbedActivationQuant))
    hooked = len(hooks_of(model, FastHadamardQuant)) + len(hooks_of(model, FastActivationQuant))
    assert absorbed + hooked == quant
    attention = [getattr(m, ATTR) for m in model.modules() if getattr(m, ATTR, None) is not None]
    assert attention and all(isinstance(t, FastAttentionTransform) for t in attention)


def test_the_report_names_each_kernel_and_what_was_left():
    model = _quantized("llama", "quarot-w4a4kv4")
    lower(model, plan="rule")
    report = lowering_report(model)
    whats = {e.what for e in report.entries}
    assert {"int4 sym per channel linear, int4 activations inside", "float linear", "online Hadamard",
            "attention R3 Hadamard + int4 KV quantizer"} <= whats
    lm_head = next(e for e in report.entries if e.path == "lm_head")
    assert lm_head.note == "not quantized by the recipe"
    first_exact = ("fxquant's C kernel" if packed_int.unavailable() is None  # the table's order
                   else "oneDNN u8 x s8" if onednn.unavailable() is None else "torch._int_mm")
    assert f"exact integer product ({first_exact}" in report.summary() and "for M <= 16" in report.summary()


def test_a_layer_no_kernel_takes_stays_on_the_reference_with_the_reason():
    model = tiny_model("llama", intermediate_size=136)  # 136 = 8 * 17: not a multiple of 16
    fxquant.quantize(model, {"preset": "w4a16", "group_size": None})
    lower(model, plan="rule")
    down = model.get_submodule("model.layers.0.mlp.up_proj")
    assert down.plan.decode == "reference"
    assert "not a multiple of 16" in down.plan.why


def test_a_float_model_has_nothing_to_lower_and_is_unchanged():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lower(model, plan="rule")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(e.what == "float linear" for e in lowering_report(model).entries)


def test_a_quantized_model_that_was_not_packed_is_packed_first():
    model = tiny_model("llama")
    fxquant.quantize(model, {"passes": [{"pass": "quantize_weights", "bits": 4, "symmetric": True}]})
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    lower(model, plan="rule")
    assert sum(isinstance(m, LoweredLinear) for m in model.modules()) == 14


def test_lowering_twice_re_plans_and_computes_the_same():
    model = _quantized("llama", "quarot-w4a4kv4")
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    portable = set(model.state_dict())
    lower(model, plan="rule")
    once = _logits(model, ids)
    lower(model, plan="decode")  # another plan: the first plan's kernel layouts must not linger
    lower(model, plan="rule")
    assert torch.equal(_logits(model, ids), once)
    assert set(model.state_dict()) == portable  # kernel layouts never reach the state dict (or save)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert {name for name, _ in layer.named_buffers()} == {"codes", "scale"} | {
        f"{kernel}_{key}" for kernel, keys in layer.kernel_buffers.items() for key in keys}


def test_measured_plans_pick_kernels_that_take_the_layer():
    model = _quantized("llama", {"preset": "w4a16", "group_size": 32})
    lower(model)  # plan="measure": times the candidates on each layer's shape
    for module in model.modules():
        if isinstance(module, LoweredLinear):
            assert module.plan.why == "measured"
            assert {module.plan.decode, module.plan.prefill} <= {"reference", "int4_tinygemm"}


def test_a_lowered_model_saves_exactly_the_packed_model(tmp_path):
    packed = _quantized("llama", "quarot-w4a4kv4")
    fxquant.save(packed, tmp_path / "packed")
    lower(packed, plan="rule")
    fxquant.save(packed, tmp_path / "lowered")
    a, b = load_file(tmp_path / "packed" / "model.safetensors"), load_file(tmp_path / "lowered" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = [json.loads((tmp_path / d / "fxquant.json").read_text()) for d in ("packed", "lowered")]
    assert meta[0]["modules"] == meta[1]["modules"] and meta[0]["hooks"] == meta[1]["hooks"]
    assert meta[0]["attention"] == meta[1]["attention"]


def test_load_with_lower_gives_the_model_lowered_in_memory(tmp_path):
    model = _quantized("llama", "quarot-w4a4kv4")
    fxquant.save(model, tmp_path / "m")
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    lower(model, plan="rule")
    loaded = fxquant.load(tmp_path / "m", lower=True)
    assert any(isinstance(m, LoweredLinear) for m in loaded.modules())
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-2, rtol=1e-2)


def test_the_decode_plan_runs_the_decode_kernel_at_every_token_count_and_a_bad_plan_is_refused():
    model = _quantized("llama", {"preset": "w4a16", "group_size": 32})
    lower(model, plan="decode")
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.plan.decode == layer.plan.prefill == "int4_tinygemm"
    with pytest.raises(fxquant.RecipeError, match="plan='fastest' is not one of"):
        lower(model, plan="fastest")


def test_the_fast_plan_puts_4_bit_activation_layers_on_the_bf16_kernels_at_a_measured_cost():
    model = _quantized("llama", "quarot-w4a4kv4")
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    ref = _logits(model, ids)
    lower(model, plan="fast")
    # tiny shapes: whichever is faster may still be the integer kernel; force the bf16 one to see its cost
    for module in model.modules():
        if isinstance(module, LoweredLinear):
            assert module.plan.why == "measured"
    out = _logits(model, ids)
    assert (out - ref).norm() <= 0.25 * ref.norm()  # flips of ~1% of the 4-bit codes: ~sqrt(1%) of the logits


def test_a_lowered_model_runs_under_torch_compile_with_its_kernels_as_graph_nodes():
    model = _quantized("llama", "quarot-w4a4kv4")
    lower(model, plan="rule")
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(_logits(compiled, ids), _logits(model, ids))
    targets = {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    integer_op = (torch.ops.fxquant.packed_int_linear if packed_int.unavailable() is None
                  else torch.ops.fxquant.onednn_linear if onednn.unavailable() is None else torch.ops.fxquant.int_mm_linear)
    assert {integer_op.default, torch.ops.fxquant.fast_hadamard.default} <= targets


def test_plan_fast_decodes_the_float_output_layer_in_bfloat16_and_saves_it_as_float(tmp_path):
    from fxquant.runtime.lowered import Bf16Linear

    model = _quantized("llama", {"preset": "w4a16", "group_size": 32})
    weight = model.lm_head.weight
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    hidden = torch.randn(1, 3, model.config.hidden_size)
    exact = model.lm_head(hidden)
    lower(model, plan="fast")
    head = model.lm_head
    assert isinstance(head, Bf16Linear) and head.weight is weight  # the parameter stays (and a tie with it)
    ref16 = torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16()).float()
    long = torch.randn(1, Bf16Linear.max_decode_m + 1, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(head(hidden), ref16) and not torch.equal(head(hidden), exact)
        assert torch.equal(head(long), torch.nn.functional.linear(long, weight))  # prefill: float32
        one = hidden[:, :1]  # one token: the C GEMV on the bfloat16 weight, x and the sums in float32
        rounded = torch.nn.functional.linear(one.double(), weight.bfloat16().double()).float()
        if head.gemv:
            torch.testing.assert_close(head(one), rounded, rtol=0, atol=1e-6 * rounded.abs().max().item())
        else:
            assert torch.equal(head(one), ref16[:, :1])
    head(hidden).sum().backward()  # training: float32 F.linear, the gradient reaches the weight
    assert weight.grad is not None and torch.equal(head(hidden), exact)
    assert "F.linear in bfloat16" in lowering_report(model).summary()
    fxquant.save(model, tmp_path / "m")
    loaded = fxquant.load(tmp_path / "m", lower=False)
    assert type(loaded.lm_head) is torch.nn.Linear and torch.equal(loaded.lm_head.weight, weight)
    lower(model, plan="rule")  # lowering again starts from the float linear: no bfloat16 copy is left
    assert type(model.lm_head) is not Bf16Linear and not list(model.lm_head.buffers())
    from fxquant.runtime.kernels import float_gemv
    from fxquant.runtime.lowered import GemvLinear

    if float_gemv.unavailable() is None:  # and it is found again as the output layer
        assert type(model.lm_head) is GemvLinear and model.lm_head.weight is weight
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_the_float_output_layer_decodes_on_the_c_gemv_and_saves_as_float(tmp_path):
    from fxquant.runtime.kernels import float_gemv
    from fxquant.runtime.lowered import GemvLinear

    if float_gemv.unavailable() is not None:
        pytest.skip(float_gemv.unavailable())
    model = _quantized("llama", "quarot-w4a4kv4")
    weight = model.lm_head.weight
    hidden = torch.randn(1, 3, model.config.hidden_size)
    exact = model.lm_head(hidden).detach()
    lower(model, plan="rule")
    head = model.lm_head
    assert isinstance(head, GemvLinear) and head.weight is weight and not list(head.buffers())  # reads the weight itself
    assert isinstance(model.model.layers[0].mlp.down_proj, LoweredLinear)  # only the output layer is a GemvLinear
    with torch.no_grad():
        y = head(hidden)
        torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
        long = torch.randn(1, GemvLinear.max_decode_m + 1, model.config.hidden_size)
        assert torch.equal(head(long), torch.nn.functional.linear(long, weight))  # prefill: F.linear
    assert "C float32 GEMV" in lowering_report(model).summary()
    fxquant.save(model, tmp_path / "m")
    loaded = fxquant.load(tmp_path / "m", lower=False)
    assert type(loaded.lm_head) is torch.nn.Linear and torch.equal(loaded.lm_head.weight, weight)
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("build", [(), ("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["this CPU", "AVX2", "plain C"])
def test_the_c_gemv_op_passes_opcheck_and_matches_float64(build, monkeypatch):
    from fxquant.runtime.kernels import float_gemv

    if float_gemv.unavailable() is not None:
        pytest.skip(float_gemv.unavailable())
    older = float_gemv._function(build)  # the code paths of older CPUs, built here
    monkeypatch.setattr(float_gemv, "_function", lambda: older)
    for k, n, m in ((100, 37, 1), (576, 64, 3), (7, 5, 2)):  # tails: K not a multiple of the lanes, N of 4 rows
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
        torch.testing.assert_close(float_gemv.float_gemv(x, w, b).double(), ref, rtol=0, atol=1e-6 * ref.abs().max().item())
        halved = torch.nn.functional.linear(x.double(), w.bfloat16().double(), b.double())  # bfloat16 weights
        torch.testing.assert_close(float_gemv.float_gemv(x, w.bfloat16(), b).double(), halved, rtol=0,
                                   atol=1e-6 * halved.abs().max().item())
        no_bias = torch.nn.functional.linear(x.double(), w.double())
        torch.testing.assert_close(float_gemv.float_gemv(x, w, None).double(), no_bias, rtol=0,
                                   atol=1e-6 * no_bias.abs().max().item())
    torch.library.opcheck(torch.ops.fxquant.float_gemv.default, (torch.randn(3, 40), torch.randn(24, 40), torch.randn(24)),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    with pytest.raises(ValueError, match="takes float32 x and a float32 or bfloat16 weight on CPU"):
        float_gemv.float_gemv(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8), None)
