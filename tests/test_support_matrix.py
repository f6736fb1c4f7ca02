"""docs/ARCHITECTURES.md records what fxquant's float recipes do to every transformers causal LM.

The fast tests pin the tool's own logic (layer folding, outcome classification, the table read back).
The slow test runs the matrix on the types the doc records as cheapest, within BUDGET_S of recorded
time (the slow tier must stay well inside CI's 15 minutes; the full matrix takes ~6 min on 2 cores):
no row may be WRONG or crash, and each outcome must be the one the doc records.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fxquant.analysis.structure import Blocked
from fxquant.errors import PassError, UnsupportedPatternError
from fxquant.pipeline import PassResult

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 90  # recorded seconds of the types the slow test runs: the cheapest first
REGENERATE = "python tools/support_matrix.py"


def _tool():
    spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "tools" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


sm = _tool()


def _result(**blocked) -> SimpleNamespace:
    """A stand-in PipelineResult: pass name -> what it left."""
    return SimpleNamespace(results={name: PassResult((), items) for name, items in blocked.items()})


def test_fold_layers_gives_every_layer_one_spelling():
    lines = [Blocked("linear_5", "model.layers.0.mlp.down_proj", "not a reader"),
             Blocked("linear_11", "model.layers.1.mlp.down_proj", "not a reader"),
             "norm 'transformer.h.3.ln_2' before add 'add_7'"]
    assert sm.distinct(lines) == ("module 'model.layers.N.mlp.down_proj': not a reader",
                                  "norm 'transformer.h.N.ln_2' before add 'add'")
    assert sm.fold_layers("max abs error 0.25 (atol=8.7e-05)") == "max abs error 0.25 (atol=8.7e-05)"


def test_a_result_is_handled_partly_handled_or_wrong():
    assert sm.classify_result(_result(fold_norms=()), []) == sm.Outcome(sm.HANDLED)
    left = _result(rotate_vo=(Blocked("sdpa", "model.layers.0.self_attn", "no v->o chain"),
                              Blocked("sdpa_1", "model.layers.1.self_attn", "no v->o chain")))
    assert sm.classify_result(left, []) == sm.Outcome(
        sm.PARTLY, ("rotate_vo: module 'model.layers.N.self_attn': no v->o chain",))
    assert sm.classify_result(left, ["logits differ"]).kind == sm.WRONG


def test_an_error_is_a_refusal_a_crash_or_wrong():
    message = ("pass 'fold_norms' (as the first pass): refused:\n"
               "  - node 'to_1' in module 'model.layers.0.norm': post-norm\n"
               "  - node 'to_9' in module 'model.layers.1.norm': post-norm\n"
               "Run `fxquant inspect` to see the structure found")
    refused = sm.classify_error(UnsupportedPatternError(message))
    assert refused == sm.Outcome(sm.REFUSED, ("pass 'fold_norms' (as the first pass): refused:",
                                              "- module 'model.layers.N.norm': post-norm"))
    assert sm.classify_error(UnsupportedPatternError(message), changed="diff 0.3").kind == sm.WRONG
    try:
        try:
            raise KeyError("w")
        except KeyError as exc:
            raise PassError("pass 'rotate_vo' failed as the first pass: KeyError: 'w'") from exc
    except PassError as wrapped:
        assert sm.classify_error(wrapped).details[0] == "KeyError: 'w'"  # a bug inside a pass
        assert sm.classify_error(wrapped).kind == sm.CRASH
    assert sm.classify_error(TypeError("x")).kind == sm.CRASH


def test_the_table_reads_back_and_the_budget_takes_the_cheapest():
    rows = [sm.Row("llama", "LlamaForCausalLM", {r: sm.Outcome(sm.HANDLED) for r in sm.RECIPES}, 1.5),
            sm.Row("bart", "BartForCausalLM", {r: sm.Outcome(sm.REFUSED, ("why | not",)) for r in sm.RECIPES}, 0.5),
            sm.Row("blt", "BltForCausalLM", {r: sm.Outcome(sm.TIMEOUT, in_fxquant=False) for r in sm.RECIPES}, 3.0)]
    recorded = sm.doc_rows(sm.render(rows, REGENERATE))
    assert recorded == {"llama": ((sm.HANDLED, sm.HANDLED), 1.5), "bart": ((sm.REFUSED, sm.REFUSED), 0.5),
                        "blt": ((sm.TIMEOUT, sm.TIMEOUT), 3.0)}
    assert sm.within_budget(recorded, 2.0) == ["bart", "llama"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_the_matrix_matches_docs_architectures(one_thread, caplog):
    caplog.set_level(logging.ERROR)  # 300 models' export traces would bury the failure message
    recorded = sm.doc_rows(sm.DOC.read_text())
    assert sorted(recorded) == sm.model_types(), (
        f"docs/ARCHITECTURES.md does not list every causal-LM type of this transformers: run `{REGENERATE}`")
    rows = sm.survey(sm.within_budget(recorded, BUDGET_S))
    bugs = [f"{row.type} / {r}: {o.kind}: {' | '.join(o.details)}"
            for row in rows for r, o in row.outcomes.items() if o.is_bug]
    assert not bugs, "fxquant bugs:\n" + "\n".join(bugs)
    stale = [f"{row.type}: recorded {recorded[row.type][0]}, now {now}" for row in rows
             if (now := tuple(row.outcomes[r].kind for r in sm.RECIPES)) != recorded[row.type][0]]
    assert not stale, (f"docs/ARCHITECTURES.md is stale for {len(stale)} of {len(rows)} types checked: run "
                       f"`{REGENERATE}` (about 6 min) and commit it:\n" + "\n".join(stale))
