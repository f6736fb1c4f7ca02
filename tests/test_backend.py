"""torch.compile(backend="fxquant"): the entry point, quantized and float-with-recipe models, refusals, reports."""
import copy
import subprocess
import sys

import pytest
import torch

import fxquant
from fxquant.runtime.kernels import float_gemv
from fxquant.backend import BackendOptions, collect
from fxquant.backend.graph_pass import FxquantGraphPass, rewrite
from fxquant.backend.modules import raise_graph
from fxquant.errors import RecipeError
from fxquant.models import tiny_model
from fxquant.runtime.kernels import ops as kernel_ops
from fxquant.runtime.library import FAKE_QUANT, HADAMARD

IDS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
REL = 1e-5  # compiled vs eager lowered: inductor reorders the float math around the kernels (measured 3e-7)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _logits(model, **options):
    compiled = torch.compile(model, backend="fxquant", options=options) if options is not None else model
    with torch.no_grad():
        return compiled(IDS, use_cache=False).logits


def _eager_lowered(arch, recipe, plan="rule"):
    model = tiny_model(arch)
    fxquant.quantize(model, recipe)
    return fxquant.lower(model, plan=plan)


def _close(out, ref):
    assert (out - ref).abs().max().item() <= REL * ref.abs().max().item()


def test_entry_point_finds_the_backend_in_a_fresh_process_without_importing_fxquant():
    code = (
        "import sys, torch\n"
        "layer = torch.nn.Linear(4, 3)\n"
        "x = torch.randn(2, 4)\n"
        "assert 'fxquant' not in sys.modules\n"
        "y = torch.compile(layer, backend='fxquant', options={'lower': False})(x)\n"
        "assert 'fxquant' in sys.modules, 'the entry point should have imported fxquant'\n"
        "torch.testing.assert_close(y, layer(x))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("recipe, kernel", [
    ({"preset": "w4a16", "group_size": 32}, "int4 tinygemm"),
    ({"preset": "w8a8"}, "exact integer product"),
    ({"preset": "quarot-w4a4kv4", "group_size": 32}, "fused fxquant::fast_hadamard_fake_quant"),
])
def test_quantized_model_compiles_to_the_eager_lowered_numerics_with_its_kernels_reported(recipe, kernel):
    model = tiny_model("llama")
    fxquant.quantize(model, recipe)
    with collect() as reports:
        out = _logits(model, plan="rule")
    _close(out, _logits(_eager_lowered("llama", recipe)))
    (report,) = reports
    assert report.linears == 15 and report.attentions == 2
    assert kernel in report.lowering
    if float_gemv.unavailable() is None:  # the output layer, found in the graph, decodes on the C GEMV
        assert "1 x float linear: fxquant's C float32 GEMV" in report.lowering
    assert all(isinstance(m, torch.nn.Linear) or not isinstance(m, fxquant.lowering.LoweredLinear)
               for m in model.modules()), "the user's model must not be lowered by compiling it"


def test_quantized_but_unpacked_model_is_packed_and_lowered_inside_the_backend():
    recipe = {"passes": [{"pass": "quantize_weights", "bits": 4, "symmetric": False, "group_size": 32}]}  # no pack
    model = tiny_model("llama")
    fxquant.quantize(model, recipe)
    with collect() as reports:
        out = _logits(model, plan="rule")
    _close(out, _logits(_eager_lowered("llama", recipe)))
    assert "14 x int4 asym float-zero group 32 linear: int4 tinygemm" in reports[0].lowering
    assert all(type(m) is not fxquant.lowering.QuantizedLinear for m in model.modules())  # the user's: untouched


def test_quarot_attention_ops_go_through_the_inductor_pass():
    model = tiny_model("llama")
    fxquant.quantize(model, {"preset": "quarot-w4a4kv4", "group_size": 32})
    with collect() as reports:
        _logits(model, plan="rule")
    (report,) = reports  # R3 on q and k, the KV quantizers: two layers
    assert report.pending == {"fxquant::hadamard": 4, "fxquant::fake_quant": 4}
    if report.rewrites:  # empty when inductor's FX graph cache already held this graph
        assert report.rewrites == {"fused_hadamard_quant": 2, "fast_hadamard": 2, "fast_quant": 2}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_recipe_option_gives_the_logits_of_quantize_and_leaves_the_module_unchanged(arch):
    recipe = {"preset": "rotate-r1r2-w4a16", "group_size": 32}
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.config._attn_implementation
    out = _logits(model, recipe=recipe, plan="rule")
    _close(out, _logits(_eager_lowered(arch, recipe)))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation == attention


def test_recipe_with_r3_and_kv_quantization_runs_inside_the_raised_attention():
    recipe = {"preset": "quarot-w4a4kv4", "group_size": 32}
    with collect() as reports:
        out = _logits(tiny_model("llama"), recipe=recipe, plan="rule")
    _close(out, _logits(_eager_lowered("llama", recipe)))
    assert any("rotate_qk: 2 inserted" in line for line in reports[0].recipe)


def test_graph_break_under_a_recipe_needing_r1_is_refused_with_the_reason():
    model = tiny_model("llama")
    model.model.layers[1].register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="rotates the whole residual stream, but .* graph break"):
        _logits(model, recipe="rotate-r1r2", plan="rule")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recipe_needing_calibration_points_to_quantize():
    with pytest.raises(Exception, match="never calibrates on dynamo's example inputs: run fxquant.quantize"):
        _logits(tiny_model("llama"), recipe={"preset": "awq-w4a16", "group_size": 32})


def test_unknown_option_and_bad_plan_are_refused():
    with pytest.raises(RecipeError, match=r"options \['recipes'\] are not among"):
        BackendOptions.parse({"recipes": "w4a16"})
    with pytest.raises(RecipeError, match="plan='fastest' is not one of"):
        BackendOptions.parse({"plan": "fastest"})


def test_mode_reaches_inductor_with_the_fxquant_pass(monkeypatch):
    import torch._inductor.compile_fx  # a submodule: alone, nothing has imported it yet

    seen = {}

    def fake_compile_fx(gm, inputs, config_patches=None):
        seen.update(config_patches)
        return gm

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", fake_compile_fx)
    for how in ({"mode": "max-autotune"}, {"options": {"mode": "max-autotune", "plan": "rule"}}):
        seen.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(tiny_model("llama"), backend="fxquant", **how)(IDS, use_cache=False)
        assert seen["max_autotune"] is True
        assert isinstance(seen["post_grad_custom_pre_pass"], FxquantGraphPass)


def test_explain_reports_each_pass_and_kernel():
    reports = fxquant.explain(tiny_model("llama"), IDS, use_cache=False,
                              options={"recipe": {"preset": "rotate-r1r2-w4a16", "group_size": 32}, "plan": "rule"})
    text = str(reports[0])
    assert "recipe: rotate_residual: 16 rotated, 0 blocked" in text
    assert "kernel:" in text and "int4 tinygemm" in text


def test_compiled_lowered_model_generates_the_eager_tokens():
    recipe = {"preset": "w4a16", "group_size": 32}
    expected = _eager_lowered("llama", recipe).generate(IDS, max_new_tokens=4, do_sample=False)
    model = tiny_model("llama")
    fxquant.quantize(model, recipe)
    model.forward = torch.compile(model.forward, backend="fxquant", options={"plan": "rule"})
    with collect() as reports:
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False), expected)
    assert len(reports) >= 2  # prefill, then decode: the decode graph takes the prefill graph's lowering
    assert all("reused" in r.recipe[0] for r in reports[1:]), [r.recipe for r in reports]


def test_weight_only_recipe_at_compile_time_generates_the_eager_tokens():
    recipe = {"preset": "w4a16", "group_size": 32}
    expected = _eager_lowered("llama", recipe).generate(IDS, max_new_tokens=4, do_sample=False)
    model = tiny_model("llama")
    model.forward = torch.compile(model.forward, backend="fxquant", options={"recipe": recipe, "plan": "rule"})
    assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False), expected)


def test_recipe_rotating_attention_that_reads_a_kv_cache_is_refused():
    model = tiny_model("llama")
    model.forward = torch.compile(model.forward, backend="fxquant", options={"recipe": "rotate-r1r2", "plan": "rule"})
    with pytest.raises(Exception, match="reads a KV cache .* use_cache=False, or run fxquant.quantize"):
        model.generate(IDS, max_new_tokens=2, do_sample=False)


def test_raised_graph_puts_every_linear_and_attention_back_at_its_path():
    store = {}

    def keep(gm, example_inputs):
        store["raised"] = raise_graph(gm, example_inputs, clone=True)
        return gm.forward

    model = tiny_model("llama", tie_word_embeddings=True)
    with torch.no_grad():
        torch.compile(model, backend=keep)(IDS, use_cache=False)
        raised = store["raised"]
        out = raised.module(IDS)[0]
    linears = {n for n, m in raised.module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert raised.attentions == 2 and raised.left == ()
    assert raised.module.get_parameter("model.embed_tokens.weight") is raised.module.get_parameter("lm_head.weight")
    assert raised.module.get_parameter("lm_head.weight") is not model.lm_head.weight  # clone=True: copies
    with torch.no_grad():
        torch.testing.assert_close(out, model(IDS, use_cache=False).logits, rtol=0, atol=0)


def test_inductor_pass_fuses_a_quantizer_with_its_hadamard_and_lowers_the_rest():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    rotated = graph.call_function(HADAMARD, (x,))
    fused = graph.call_function(FAKE_QUANT, (rotated, 4, True))
    alone = graph.call_function(HADAMARD, (fused,))
    quantized = graph.call_function(FAKE_QUANT, (x, 8, False))
    graph.output((alone, quantized))
    reference = torch.fx.GraphModule(torch.nn.Module(), graph)
    value = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    expected = reference(value)
    assert rewrite(graph) == {"fused_hadamard_quant": 1, "fast_hadamard": 1, "fast_quant": 1}
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [kernel_ops.FAST_HADAMARD_FAKE_QUANT, kernel_ops.FAST_HADAMARD, kernel_ops.FAST_FAKE_QUANT]
    got = torch.fx.GraphModule(torch.nn.Module(), graph)(value)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)  # the quantizer is bit-identical
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_inductor_pass_uuid_follows_options_so_the_cache_stays_on():
    assert FxquantGraphPass({"lower": True}).uuid() == FxquantGraphPass({"lower": True}).uuid()
    assert FxquantGraphPass({"lower": True}).uuid() != FxquantGraphPass({"lower": False}).uuid()


def test_a_w4a4_model_compiles_with_dynamic_shapes_its_clip_ratios_read_as_constants():
    model = tiny_model("llama")
    fxquant.quantize(model, "quarot-w4a4kv4")  # per-token quantizers with a clip ratio of 0.9
    ref = fxquant.lower(copy.deepcopy(model), plan="rule")
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(model, backend="fxquant", dynamic=True, options={"plan": "rule"})(IDS, use_cache=False)
            expected = ref(IDS, use_cache=False).logits
    finally:
        torch._dynamo.reset()
    assert (out.logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_the_pass_uuid_covers_every_kernel_a_compiled_graph_calls():
    from pathlib import Path

    from fxquant.backend.graph_pass import source_files
    from fxquant.runtime import kernels

    files = set(source_files())
    for path in Path(kernels.__file__).parent.rglob("*.py"):  # e.g. onednn.py, whose op a lowered layer calls
        assert str(path.resolve()) in files
    assert str(Path(fxquant.runtime.lowered.__file__).resolve()) in files
