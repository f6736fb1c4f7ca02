"""Golden snapshots: the op counts of each preset's graph on tiny models, re-captured after quantize.

A change in what a recipe inserts (or removes) shows up here as a diff. Regenerate deliberately:
    FXQUANT_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fxquant import capture, quantize
from fxquant.models import tiny_model
from fxquant.viz.text import op_counts

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = [("llama", "rotate-r1r2"), ("llama", "rotate-r1r2-w8a8"), ("opt", "rotate-r1r2"), ("gpt2", "w8a8"),
         ("llama", "rotate-r1r2r4-w16a4")]


@pytest.mark.parametrize("arch,preset", CASES)
def test_recipe_graph_op_counts_match_the_snapshot(arch, preset):
    model = tiny_model(arch)
    quantize(model, preset)
    counts = op_counts(capture(model))
    path = GOLDEN / f"{arch}.{preset}.json"
    if os.environ.get("FXQUANT_UPDATE_GOLDEN"):
        path.write_text(json.dumps(counts, indent=1) + "\n")
    assert counts == json.loads(path.read_text())
