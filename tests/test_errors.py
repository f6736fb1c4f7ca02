"""One error hierarchy, exported from fxquant; each error path raises with what, where and why."""
from __future__ import annotations

import pytest

import fxquant
from conftest import captured
from fxquant.analysis import analyse
from fxquant.capture import capture
from fxquant.models import tiny_model


def test_hierarchy_is_exported_from_the_package():
    for cls in (fxquant.CaptureError, fxquant.UnsupportedPatternError, fxquant.NoHadamardError,
                fxquant.RecipeError, fxquant.ModelLoadError, fxquant.PassError):
        assert issubclass(cls, fxquant.FxquantError)


def test_blocked_structure_refuses_with_node_module_and_reason():
    s = analyse(capture(tiny_model("opt", do_layer_norm_before=False)))
    with pytest.raises(fxquant.UnsupportedPatternError,
                       match=r"(?s)R1 rotation refused, nothing was changed.*node 'add_5' in module 'model\.decoder\.layers\.0'.*self_attn_layer_norm"):
        s.refuse_if_blocked("R1 rotation")


def test_clean_structure_does_not_refuse():
    captured("llama")[1].refuse_if_blocked("R1 rotation")  # no exception


def test_cli_reports_errors_without_a_traceback(capsys):
    from fxquant.cli import main

    assert main(["inspect", "--model", "tiny-nosucharch"]) == 2
    err = capsys.readouterr().err
    assert "fxquant: error: no tiny config for architecture 'nosucharch'" in err and "Traceback" not in err
