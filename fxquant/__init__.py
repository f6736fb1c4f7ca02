"""fxquant: torch.fx graph-rewriting passes that make LLMs small and fast without losing accuracy.

    capture -> analyse -> transform -> quantize -> lower -> compile / visualise

The model stays the source of truth and the graph is the map: `capture` links every weight-reading
node to the module and parameter it came from, `analyse` reads the graph into a frozen `Structure`,
and passes (run by a `Pipeline`) edit the model through those links. `quantize(model, recipe)`
runs a recipe (an ordered list of passes) on a model in place; `lower(model)` puts the quantized
model on the fastest correct kernels for its device.
"""
from fxquant import qat  # fxquant.qat.prepare / fxquant.qat.convert
from fxquant.analysis import Blocked, Structure, analyse
from fxquant.api import apply_recipe, quantize
from fxquant.backend import explain
from fxquant.calibration import Calibration
from fxquant.capture import capture
from fxquant.errors import (
    CalibrationError, CaptureError, FxquantError, ModelLoadError, NoHadamardError, PassError, RecipeError, UnsupportedPatternError,
)
from fxquant.ir import CapturedGraph, ParamRef
from fxquant.lowering import lower, lowering_report
from fxquant.pipeline import Change, PassResult, Pipeline, Step, fxpass
from fxquant.recipes import PRESETS, Recipe, load_recipe, register_pass
from fxquant.serialize import load, save
from fxquant.viz.html import dump  # fxquant.dump(model_or_graph, path): the HTML page of one graph

__version__ = "0.1.0"

__all__ = [
    "quantize", "apply_recipe", "Calibration", "explain", "dump", "lower", "lowering_report", "save", "load", "load_recipe", "register_pass", "Recipe", "PRESETS", "CalibrationError", "capture", "analyse", "Pipeline", "Step", "fxpass", "Change", "PassResult", "Structure", "Blocked",
    "CapturedGraph", "ParamRef", "FxquantError", "CaptureError", "UnsupportedPatternError",
    "NoHadamardError", "RecipeError", "ModelLoadError", "PassError", "qat",
]
