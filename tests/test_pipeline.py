"""Pipeline: fact ordering, re-analysis and re-capture after invalidation, verification, log, dump.

Toy passes edit a tiny llama through the graph -> ParamRef -> model link; analysis is a stub that
counts its calls, so these tests do not depend on fxquant.analysis.
"""
from __future__ import annotations

import logging

import pytest
import torch

from fxquant.capture import capture
from fxquant.errors import PassError, RecipeError, UnsupportedPatternError
from fxquant.models import tiny_model
from fxquant.pipeline import Change, PassInfo, PassResult, Pipeline, Step, check_order, fxpass
from fxquant.verify import finite_weights, model_outputs, outputs_unchanged
from fxquant.viz import TextDumper, op_counts

aten = torch.ops.aten


@pytest.fixture
def tiny_llama():
    return capture(tiny_model("llama"))


class CountingAnalyse:
    """Stub analysis: returns the call number, so a pass can see which structure it was given."""

    def __init__(self):
        self.calls = 0

    def __call__(self, cg):
        self.calls += 1
        return self.calls


def _lm_head_weight(cg):
    """The ParamRef of the weight that the lm_head linear reads, found through the graph."""
    (node,) = [n for n in cg.graph.nodes if n.target == aten.linear.default and cg.module_of(n) == "lm_head"]
    return cg.param_of(node.args[1])


@fxpass(provides={"lm_head_scaled"})
def scale_lm_head(cg, structure, cfg):
    # lm_head(w * n(x)) with W' = W s, w' = w / s  =>  W' (w' * n) = W (w * n); s = 2 is exact in fp
    s = cfg or 2.0
    with torch.no_grad():
        cg.param(_lm_head_weight(cg)).mul_(s)
        cg.model.model.norm.weight.div_(s)
    return PassResult((Change("scaled", "lm_head", f"x{s}"), Change("scaled", "model.norm", f"/{s}")))


@fxpass(requires={"lm_head_scaled"})
def break_outputs(cg, structure, cfg):
    with torch.no_grad():
        cg.param(_lm_head_weight(cg)).add_(1.0)
    return PassResult((Change("broke", "lm_head"),))


@fxpass(invalidates={"outputs"})
def perturb_on_purpose(cg, structure, cfg):
    with torch.no_grad():
        cg.param(_lm_head_weight(cg)).add_(0.5)
    return PassResult((Change("quantized", "lm_head"),))


@fxpass(invalidates={"structure"})
def touch_structure(cg, structure, cfg):
    cfg.append(structure)  # cfg is a list the test reads: the structure each call was given
    return PassResult((Change("touched", "structure"),))


class HalveInput(torch.nn.Module):
    def forward(self, x):
        return x * 0.5


@fxpass(invalidates={"graph"})
def insert_halving(cg, structure, cfg):
    # lm_head(x) = (2 W)(x / 2): an online op inserted as a module, the weight compensates
    with torch.no_grad():
        cg.model.lm_head.weight.mul_(2.0)
    cg.model.lm_head = torch.nn.Sequential(HalveInput(), cg.model.lm_head)
    return PassResult((Change("inserted", "lm_head.0", "x * 0.5"),))


@fxpass(provides="norms_folded")
def fold(cg, structure, cfg):
    return PassResult()


@fxpass(requires="norms_folded", provides="rotated")
def rotate(cg, structure, cfg):
    return PassResult()


@fxpass(invalidates="norms_folded")
def unfold(cg, structure, cfg):
    return PassResult()


@fxpass()
def crash(cg, structure, cfg):
    raise ValueError("index 7 out of range")


@fxpass()
def refuse(cg, structure, cfg):
    raise UnsupportedPatternError("barrier aten.cumsum on the residual stream at node 'cumsum' (model)")


@fxpass()
def corrupt_graph(cg, structure, cfg):
    first = next(n for n in cg.graph.nodes if n.op == "call_function")
    last = [n for n in cg.graph.nodes if n.target == aten.linear.default][-1]
    with cg.graph.inserting_before(first):
        cg.graph.call_function(aten.neg.default, (last,))  # reads a value before it is defined
    return PassResult()


def test_fxpass_attaches_frozen_info():
    assert rotate.fxpass == PassInfo("rotate", frozenset({"norms_folded"}), frozenset({"rotated"}), frozenset())
    with pytest.raises(AttributeError):
        rotate.fxpass.name = "other"


def test_change_and_summary_read_as_one_line():
    result = PassResult([Change("rotated", "v_proj", "head 1"), Change("rotated", "o_proj"), Change("folded", "n")],
                        blocked=["node cumsum: barrier"])
    assert str(result.changes[0]) == "rotated v_proj (head 1)"
    assert result.summary() == "2 rotated, 1 folded, 1 blocked"
    assert result.modified and not PassResult().modified
    assert PassResult().summary() == "no changes, 0 blocked"


def test_scaling_pass_keeps_outputs_and_provides_its_fact(tiny_llama):
    before = model_outputs(tiny_llama.model, tiny_llama.example_inputs)
    weight = tiny_llama.model.lm_head.weight.clone()
    result = Pipeline([scale_lm_head], analyse=CountingAnalyse(), verify_inputs=True).run(tiny_llama)
    assert result.facts == {"lm_head_scaled"}
    assert result.results["scale_lm_head"].summary() == "2 scaled, 0 blocked"
    assert torch.equal(tiny_llama.model.lm_head.weight, 2 * weight)  # the model itself was edited
    torch.testing.assert_close(model_outputs(result.cg.model, tiny_llama.example_inputs), before)


def test_output_change_names_pass_and_predecessors(tiny_llama):
    pipeline = Pipeline([scale_lm_head, break_outputs], analyse=CountingAnalyse(), verify_inputs=True)
    with pytest.raises(PassError, match=r"pass 'break_outputs' \(after \[scale_lm_head\]\) changed the float"):
        pipeline.run(tiny_llama)


def test_intended_output_change_resets_the_reference(tiny_llama):
    pipeline = Pipeline([perturb_on_purpose, scale_lm_head], analyse=CountingAnalyse(), verify_inputs=True)
    assert pipeline.run(tiny_llama).log == ("perturb_on_purpose: 1 quantized, 0 blocked",
                                            "scale_lm_head: 2 scaled, 0 blocked")


def test_missing_fact_names_the_step_that_provides_it(tiny_llama):
    with pytest.raises(RecipeError, match=r"'rotate' requires fact 'norms_folded'.*step 'fold' does: move it"):
        Pipeline([rotate, fold], analyse=CountingAnalyse()).run(tiny_llama)


def test_missing_fact_with_no_provider():
    with pytest.raises(RecipeError, match=r"no step in this pipeline provides it"):
        check_order(Pipeline([rotate]).steps)


def test_invalidated_fact_names_the_invalidator():
    with pytest.raises(RecipeError, match=r"step 'fold' provided it and step 'unfold' then invalidated it"):
        check_order(Pipeline([fold, unfold, rotate]).steps)
    check_order(Pipeline([rotate]).steps, facts={"norms_folded"})  # already true of the input


def test_order_is_checked_before_any_pass_runs(tiny_llama):
    weight = tiny_llama.model.lm_head.weight.clone()
    with pytest.raises(RecipeError):
        Pipeline([scale_lm_head, rotate], analyse=CountingAnalyse()).run(tiny_llama)
    assert torch.equal(tiny_llama.model.lm_head.weight, weight)


def test_steps_must_be_fxpasses_with_distinct_names():
    with pytest.raises(RecipeError, match=r"'plain' is not an @fxpass function"):
        Step(lambda cg, s, cfg: PassResult(), name="plain")
    with pytest.raises(RecipeError, match=r"several steps named \['fold'\]"):
        Pipeline([fold, fold])
    assert [s.name for s in Pipeline([fold, Step(fold, name="fold_again")]).steps] == ["fold", "fold_again"]


def test_structure_invalidation_reanalyses_once_per_pass(tiny_llama):
    analyse, seen = CountingAnalyse(), []
    steps = [Step(touch_structure, seen, "a"), Step(fold, name="b"), Step(touch_structure, seen, "c")]
    result = Pipeline(steps, analyse=analyse).run(tiny_llama)
    assert analyse.calls == 3  # once up front, once after each of a and c
    assert seen == [1, 2] and result.structure == 3
    assert result.cg is tiny_llama  # no re-capture without "graph"


def test_a_pass_that_changed_nothing_invalidates_nothing(tiny_llama):
    analyse, seen = CountingAnalyse(), []

    @fxpass(invalidates={"structure", "graph"})
    def no_op(cg, structure, cfg):
        return PassResult()

    result = Pipeline([no_op, Step(touch_structure, seen)], analyse=analyse).run(tiny_llama)
    assert analyse.calls == 2 and seen == [1]  # up front, then after touch_structure only
    assert result.cg is tiny_llama


def test_recapture_waits_for_a_reader_and_final_capture_false_skips_it(tiny_llama):
    captures = []

    def counting_capture(model, example):
        captures.append(example)
        return capture(model, example)

    result = Pipeline([insert_halving], capture=counting_capture, final_capture=False).run(tiny_llama)
    assert captures == [] and result.cg is tiny_llama
    Pipeline([insert_halving], capture=counting_capture).run(capture(tiny_model("llama")))
    assert len(captures) == 1


def test_graph_invalidation_recaptures_the_edited_model(tiny_llama):
    captures, analyse = [], CountingAnalyse()

    def counting_capture(model, example):
        captures.append(example)
        return capture(model, example)

    before = op_counts(tiny_llama.gm)
    result = Pipeline([insert_halving], analyse=analyse, capture=counting_capture, verify_inputs=True).run(tiny_llama)
    assert len(captures) == 1 and analyse.calls == 2
    assert set(captures[0]) == {"input_ids", "use_cache"}
    assert result.cg is not tiny_llama and result.cg.model is tiny_llama.model
    assert op_counts(result.cg.gm)["aten.mul.Tensor"] == before["aten.mul.Tensor"] + 1
    (halve,) = [n for n in result.cg.graph.nodes if result.cg.module_of(n) == "lm_head.0"]
    assert halve.target == aten.mul.Tensor


def test_exception_in_pass_is_wrapped_with_cause(tiny_llama):
    with pytest.raises(PassError, match=r"pass 'crash' failed after \[fold\]: ValueError: index 7") as info:
        Pipeline([fold, crash], analyse=CountingAnalyse()).run(tiny_llama)
    assert isinstance(info.value.__cause__, ValueError)


def test_fxquant_error_keeps_its_type_and_gains_the_pass_name(tiny_llama):
    with pytest.raises(UnsupportedPatternError, match=r"^pass 'refuse' \(as the first pass\): barrier aten.cumsum"):
        Pipeline([refuse], analyse=CountingAnalyse()).run(tiny_llama)


def test_broken_graph_fails_lint_naming_the_pass(tiny_llama):
    with pytest.raises(PassError, match=r"pass 'corrupt_graph' left a graph .* lint"):
        Pipeline([corrupt_graph], analyse=CountingAnalyse()).run(tiny_llama)


def test_model_broken_for_verification_names_the_pass(tiny_llama):
    @fxpass()
    def swap_lm_head(cg, structure, cfg):
        cg.model.lm_head = torch.nn.Linear(3, 128)  # wrong input width: forward raises
        return PassResult((Change("replaced", "lm_head"),))

    ids = torch.zeros(1, 4, dtype=torch.long)
    pipeline = Pipeline([swap_lm_head], analyse=CountingAnalyse(), verify_inputs=((ids,), {"use_cache": False}))
    with pytest.raises(PassError, match=r"'swap_lm_head' left a model that verification could not run"):
        pipeline.run(tiny_llama)


def test_non_result_return_is_an_error(tiny_llama):
    @fxpass()
    def forgets_result(cg, structure, cfg):
        return None

    with pytest.raises(PassError, match=r"'forgets_result' returned NoneType, not a PassResult"):
        Pipeline([forgets_result], analyse=CountingAnalyse()).run(tiny_llama)


def test_one_log_line_per_pass(tiny_llama, caplog):
    with caplog.at_level(logging.INFO, logger="fxquant"):
        result = Pipeline([scale_lm_head, fold], analyse=CountingAnalyse()).run(tiny_llama)
    lines = [r.getMessage() for r in caplog.records if r.name == "fxquant"]
    assert lines == ["scale_lm_head: 2 scaled, 0 blocked", "fold: no changes, 0 blocked"]
    assert result.log == tuple(lines) and str(result) == "\n".join(lines)


def test_dump_writes_one_file_per_pass(tiny_llama, tmp_path):
    Pipeline([scale_lm_head, fold], analyse=CountingAnalyse(), dumper=TextDumper(tmp_path)).run(tiny_llama)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_input.txt", "01_scale_lm_head.txt", "02_fold.txt"]
    text = (tmp_path / "01_scale_lm_head.txt").read_text()
    assert text.startswith("# scale_lm_head: 2 scaled, 0 blocked\n# scaled lm_head (x2.0)\n# scaled model.norm (/2.0)\n# ")
    assert "param lm_head.weight" in text
    assert (tmp_path / "00_input.txt").read_text().startswith("# ")  # no log lines: the graph_text header


def test_a_custom_dumper_gets_the_input_then_one_fresh_snapshot_per_step(tiny_llama):
    snapshots = []
    result = Pipeline([scale_lm_head, insert_halving, fold], analyse=CountingAnalyse(),
                      dumper=snapshots.append).run(tiny_llama)
    assert [(s.index, s.step) for s in snapshots] == [(0, "input"), (1, "scale_lm_head"), (2, "insert_halving"), (3, "fold")]
    assert snapshots[0].result is None and snapshots[0].lines == () and snapshots[0].cg is tiny_llama
    assert snapshots[1].result is result.results["scale_lm_head"]
    assert snapshots[1].lines == ("scale_lm_head: 2 scaled, 0 blocked", "scaled lm_head (x2.0)", "scaled model.norm (/2.0)")
    # insert_halving left the graph stale: the dumper sees the re-captured graph with the new mul
    fresh = snapshots[2].cg
    assert fresh is not tiny_llama and any(fresh.module_of(n) == "lm_head.0" for n in fresh.graph.nodes)


def test_api_dump_dir_and_environment_write_text_dumps(tmp_path, monkeypatch):
    from fxquant.api import apply_recipe, quantize

    recipe = {"passes": [{"pass": "fold_norms"}]}
    quantize(tiny_model("llama"), recipe, dump_dir=tmp_path / "kw")
    assert sorted(p.name for p in (tmp_path / "kw").iterdir()) == ["00_input.txt", "01_fold_norms.txt"]
    monkeypatch.setenv("FXQUANT_DUMP", str(tmp_path / "env"))
    apply_recipe(tiny_model("llama"), recipe)
    assert sorted(p.name for p in (tmp_path / "env").iterdir()) == ["00_input.txt", "01_fold_norms.txt"]
    assert (tmp_path / "env" / "01_fold_norms.txt").read_text().startswith("# fold_norms: ")


def test_verify_helpers():
    model = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    reference = model_outputs(model, ((x,), {}))
    assert outputs_unchanged(model, x, reference) == (True, 0.0)
    with torch.no_grad():
        model.bias.add_(0.25)
        model.weight[1, 2] = float("nan")
    ok, err = outputs_unchanged(model, ((x,), {}), reference)
    assert not ok
    assert finite_weights(model) == ["weight"]


def test_relative_tolerance_scales_with_the_largest_reference_output(tiny_llama):
    @fxpass()
    def nudge(cg, structure, cfg):  # logits move by about 1e-3 of their largest value
        with torch.no_grad():
            cg.param(_lm_head_weight(cg)).mul_(1.001)
        return PassResult((Change("nudged", "lm_head"),))

    Pipeline([nudge], analyse=CountingAnalyse(), verify_inputs=True, rel_atol=1e-2, rtol=0).run(tiny_llama)
    with pytest.raises(PassError, match=r"pass 'nudge' .* changed the float outputs"):
        Pipeline([nudge], analyse=CountingAnalyse(), verify_inputs=True, rel_atol=1e-4, rtol=0).run(tiny_llama)
