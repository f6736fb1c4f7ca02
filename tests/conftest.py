"""Shared fixtures: tiny random models of each architecture, captured and analysed once per session."""
from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU tensors; set before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fxquant.analysis import analyse
from fxquant.capture import capture
from fxquant.models import TINY_CONFIGS, tiny_model

ARCHS = sorted(TINY_CONFIGS)
SANDWICH = {"olmo2", "gemma3_text"}  # a norm on each writer's output: R1 cannot fold, so it goes online

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one process per core: one intra-op thread each, or the workers oversubscribe
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@functools.lru_cache(maxsize=None)
def captured(arch: str):
    """(CapturedGraph, Structure) of the tiny `arch` model; cached: treat as read-only."""
    cg = capture(tiny_model(arch))
    return cg, analyse(cg)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def planted_outliers(model, factor: float = 30.0):
    """Make input channels 0..3 of every norm-fed linear `factor` times larger (through the norm
    weights): the outlier channels that AWQ and GPTQ must handle better than round-to-nearest."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[:4] *= factor
    return model


def logit_change(model, ids, recipe) -> float:
    """Mean squared change of `model`'s logits on `ids` when `recipe` is applied to it in place."""
    import torch

    from fxquant import quantize

    with torch.no_grad():
        ref = model(ids).logits
        quantize(model, recipe)
        return (model(ids).logits - ref).pow(2).mean().item()
