"""The perplexity harness: where the split's windows come from, and perplexity against a hand computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fxquant.errors import RecipeError
from fxquant.eval import EvalSplit, calibration_windows, default_text, default_tokens, eval_windows, perplexity
from fxquant.models import tiny_model

SPLIT = EvalSplit(seq_len=8, n_eval=3)
STREAM = torch.arange(50)  # token id == position, so a window shows where it came from


def test_eval_windows_are_the_last_non_overlapping_windows():
    w = eval_windows(STREAM, SPLIT)
    assert w.shape == (3, 8) and w.dtype == torch.long
    assert torch.equal(w.flatten(), torch.arange(50 - 24, 50))  # contiguous, disjoint, ends at the end


def test_default_split_is_24_windows_of_512():
    assert (EvalSplit().seq_len, EvalSplit().n_eval) == (512, 24)
    w = eval_windows(torch.arange(20_000))
    assert w.shape == (24, 512) and w[-1, -1] == 19_999 and w[0, 0] == 20_000 - 24 * 512


def test_calibration_windows_come_from_the_start():
    c = calibration_windows(STREAM, 2, seq_len=5, split=SPLIT)
    assert torch.equal(c, torch.arange(10).reshape(2, 5))


def test_calibration_windows_never_overlap_eval_region():
    fit = (50 - 24) // 5
    c = calibration_windows(STREAM, fit, seq_len=5, split=SPLIT)
    assert c.shape == (5, 5)
    assert not set(c.flatten().tolist()) & set(eval_windows(STREAM, SPLIT).flatten().tolist())


def test_too_many_calibration_windows_raises():
    with pytest.raises(RecipeError, match=r"asked for 6 calibration windows of 5 tokens, but only 5 fit"):
        calibration_windows(STREAM, 6, seq_len=5, split=SPLIT)


def test_stream_shorter_than_eval_region_raises():
    with pytest.raises(RecipeError, match=r"has 20 tokens, fewer than the 24"):
        eval_windows(torch.arange(20), SPLIT)


def test_eval_split_rejects_out_of_range_values():
    with pytest.raises(RecipeError, match=r"seq_len >= 2"):
        EvalSplit(seq_len=1)


def test_default_tokens_tokenizes_the_pydoc_topics_once_without_special_tokens():
    calls = []

    def fake_tokenizer(text, add_special_tokens):
        calls.append((text, add_special_tokens))
        return {"input_ids": [5, 6, 7]}

    tokens = default_tokens(fake_tokenizer)
    assert tokens.dtype == torch.long and tokens.tolist() == [5, 6, 7]
    assert calls == [(default_text(), False)]
    assert default_text().startswith('The "assert" statement') and "\n\n" in default_text()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_matches_hand_computation(batch_size):
    model = tiny_model("llama")
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    nll = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None], use_cache=False).logits[0]
            nll.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    expected = math.exp(torch.cat(nll).double().mean().item())
    got = perplexity(model, windows, batch_size=batch_size, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got > 1.0


def test_perplexity_rejects_bad_windows():
    with pytest.raises(RecipeError, match=r"perplexity needs a \[n, seq_len >= 2\] LongTensor"):
        perplexity(tiny_model("llama"), torch.arange(16), progress=False)


@pytest.mark.slow
def test_smollm2_perplexity_on_two_eval_windows():
    from fxquant.models import load_model

    model, tokenizer = load_model("smollm2")
    windows = eval_windows(default_tokens(tokenizer))[:2]
    ppl = perplexity(model, windows, progress=False)
    assert math.isfinite(ppl) and ppl < 30
