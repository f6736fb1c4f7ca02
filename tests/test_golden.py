"""Golden snapshots: the op signature of each preset's graph on tiny models, re-captured after quantize.

The signature (fxquant.analysis.signature) counts the ops on the hidden state's path: linears, norm
reductions, activations, residual adds, attention and fxquant's own ops, not views, casts or runtime
asserts, so a transformers or torch release that adds bookkeeping nodes does not break it while a
pass that inserts or drops an op does. Regenerate deliberately:
    FXQUANT_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fxquant import capture, quantize
from fxquant.analysis.signature import op_signature, signature_diff
from fxquant.models import tiny_model
from fxquant.install import install_input_scale

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = [("llama", "rotate-r1r2"), ("llama", "rotate-r1r2-w8a8"), ("opt", "rotate-r1r2"), ("gpt2", "w8a8"),
         ("llama", "rotate-r1r2r4-w16a4")]


def _assert_matches_snapshot(signature: dict[str, int], path: Path) -> None:
    diff = signature_diff(json.loads(path.read_text()), signature)
    assert not diff, f"{path.name}: the graph's ops differ from the snapshot:\n  " + "\n  ".join(diff)


@pytest.mark.parametrize("arch,preset", CASES)
def test_recipe_graph_op_signature_matches_the_snapshot(arch, preset):
    model = tiny_model(arch)
    quantize(model, preset)
    signature = op_signature(capture(model))
    path = GOLDEN / f"{arch}.{preset}.json"
    if os.environ.get("FXQUANT_UPDATE_GOLDEN"):
        path.write_text(json.dumps(signature, indent=1) + "\n")
    _assert_matches_snapshot(signature, path)


def test_one_extra_op_inserted_by_a_pass_fails_the_snapshot_naming_the_op():
    model = tiny_model("llama")
    quantize(model, "rotate-r1r2")
    # what an equalization pass does when no weight absorbs its scale: one explicit multiply
    install_input_scale(model.model.layers[0].mlp.down_proj, torch.full((model.config.intermediate_size,), 2.0))
    snapshot = json.loads((GOLDEN / "llama.rotate-r1r2.json").read_text())
    n = snapshot["aten.mul.Tensor"]
    with pytest.raises(AssertionError, match=rf"aten\.mul\.Tensor: {n} -> {n + 1} \(\+1\)"):
        _assert_matches_snapshot(op_signature(capture(model)), GOLDEN / "llama.rotate-r1r2.json")


def test_the_signature_leaves_out_asserts_views_and_mask_bookkeeping_but_keeps_the_model_ops():
    signature = op_signature(capture(tiny_model("llama")))
    assert not {"aten._assert_tensor_metadata.default", "aten.view.default", "aten.to.dtype",
                "aten.arange.default", "aten.cumsum.default"} & set(signature)
    layers = tiny_model("llama").config.num_hidden_layers
    assert signature["aten.linear.default"] == 7 * layers + 1  # q k v o gate up down per layer + lm_head
    assert signature["aten.scaled_dot_product_attention.default"] == layers
    assert signature["aten.rsqrt.default"] == 2 * layers + 1  # two RMSNorms per layer + the final norm


def test_signature_diff_names_dropped_and_new_ops():
    assert signature_diff({"aten.linear.default": 3, "aten.silu.default": 1},
                          {"aten.linear.default": 2, "fxquant.hadamard.default": 1}) == [
        "aten.linear.default: 3 -> 2 (-1)", "aten.silu.default: 1 -> 0 (-1)", "fxquant.hadamard.default: 0 -> 1 (+1)"]
