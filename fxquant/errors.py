"""One error hierarchy for fxquant.

Every message says what went wrong, where (module path and graph node), why, and what to do.
Errors are raised before any weight is touched, so a failed call leaves the model as it was.
"""
from __future__ import annotations


class FxquantError(Exception):
    """Base class of every error fxquant raises on purpose."""


class CaptureError(FxquantError):
    """The model could not be turned into a graph (torch.export failed, or a weight has no owner)."""


class UnsupportedPatternError(FxquantError):
    """The graph holds a pattern a pass cannot prove correct (a barrier on the residual stream, ...)."""


class NoHadamardError(FxquantError):
    """No Hadamard matrix of the requested size is known to fxquant."""


class RecipeError(FxquantError):
    """A recipe or pass configuration is malformed (unknown key, value out of range, bad order)."""


class ModelLoadError(FxquantError):
    """A model could not be found, fetched or loaded."""


class PassError(FxquantError):
    """A pass failed inside a Pipeline; the message names the pass and the passes that ran before it."""


class CalibrationError(FxquantError):
    """Calibration data has the wrong type, dtype or shape for the model."""
