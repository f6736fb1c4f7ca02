"""Calibration as users bring it: every form, one canonical batching, the same model whatever the batching."""
import pytest
import torch

import fxquant
from fxquant.calibration import Calibration, calibration_batches, token_count
from fxquant.errors import CalibrationError
from fxquant.models import tiny_model

WINDOWS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))


class _Tokenizer:
    """The part of a Hugging Face tokenizer calibration uses: text -> {"input_ids": [1, n]}."""

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("form", [  # each makes a fresh form: a generator is used up once read
    lambda: WINDOWS,
    lambda: list(WINDOWS),
    lambda: [WINDOWS[i:i + 1] for i in range(4)],
    lambda: [WINDOWS[:2], WINDOWS[2:]],
    lambda: [{"input_ids": WINDOWS[:3]}, {"input_ids": WINDOWS[3]}],
    lambda: torch.utils.data.DataLoader(WINDOWS, batch_size=3),
    lambda: (w for w in WINDOWS),
], ids=["tensor", "rows", "row-batches", "halves", "dicts", "dataloader", "generator"])
def test_every_batching_of_the_same_windows_gives_the_same_batches(form):
    _same_batches(calibration_batches(form()), [{"input_ids": WINDOWS[i:i + 1]} for i in range(4)])
    _same_batches(calibration_batches(Calibration(form(), batch_size=2)), [{"input_ids": WINDOWS[:2]},
                                                                           {"input_ids": WINDOWS[2:]}])


def test_text_and_text_files_are_cut_into_windows_with_the_tokenizer(tmp_path):
    text = "abcdefghij" * 10  # 100 tokens with the toy tokenizer
    batches = calibration_batches(Calibration(text, tokenizer=_Tokenizer(), seq_len=16))
    assert [b["input_ids"].shape for b in batches] == [(1, 16)] * 6
    path = tmp_path / "calib.txt"
    path.write_text(text)
    _same_batches(calibration_batches(Calibration(path, tokenizer=_Tokenizer(), seq_len=16, windows=2)), batches[:2])
    with pytest.raises(CalibrationError, match="less than one window of seq_len=512"):
        calibration_batches(Calibration("short", tokenizer=_Tokenizer()))


def test_masks_and_other_per_sequence_inputs_follow_their_sequence():
    mask = torch.ones_like(WINDOWS)
    mask[1, 10:] = 0
    batches = calibration_batches(Calibration({"input_ids": WINDOWS, "attention_mask": mask}, batch_size=2))
    assert torch.equal(batches[0]["attention_mask"], mask[:2]) and torch.equal(batches[1]["input_ids"], WINDOWS[2:])
    assert token_count(batches) == 64 - 6
    with pytest.raises(CalibrationError, match="'attention_mask' has 1 rows, input_ids has 4"):
        calibration_batches({"input_ids": WINDOWS, "attention_mask": mask[:1]})


def test_bad_calibration_settings_are_refused():
    with pytest.raises(CalibrationError, match=r"Calibration\(batch_size=0\) must be a positive integer"):
        Calibration(WINDOWS, batch_size=0)


@pytest.mark.parametrize("preset", ["awq-w4a16", "gptq-w4a16", "smoothquant-w8a8"])
def test_the_same_windows_batched_three_ways_give_the_same_model(preset):
    recipe = {"preset": preset, "group_size": 32} if preset != "smoothquant-w8a8" else preset
    states = []
    for form in (WINDOWS, list(WINDOWS[:, None]), [WINDOWS[:2], WINDOWS[2:]]):
        model = fxquant.quantize(tiny_model("llama"), recipe, calibration=form)
        states.append(model.state_dict())
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        assert all(torch.equal(other[k], states[0][k]) for k in other), preset


def test_cli_calibration_file_flags_give_windows_of_the_file(tmp_path, capsys):
    import argparse

    from fxquant.cli import _calibration, _calibration_flags

    path = tmp_path / "mine.txt"
    path.write_text("abcdefghij" * 10)
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    _calibration_flags(parser)
    args = parser.parse_args(["--calibration-file", str(path), "--calibration-windows", "3", "--calibration-seq", "16"])
    batches = _calibration(_Tokenizer(), args, model=None)
    assert [b["input_ids"].shape for b in batches] == [(1, 16)] * 3
    assert f"3 windows of 16 tokens from {path}" in capsys.readouterr().out
    assert parser.parse_args(["--calibration", "5"]).calibration == 5  # the old spelling still works


@pytest.mark.parametrize("preset", ["smoothquant-w8a8", "awq-w4a16", "gptq-w4a16"])
def test_padded_positions_are_never_counted(preset):
    """A right-padded sequence with its mask calibrates like the same sequence without the padding;
    without the mask the padding (here: a token planted far from the others) would count."""
    recipe = {"preset": preset, "group_size": 32} if preset != "smoothquant-w8a8" else preset
    real = WINDOWS[:1, :10]
    padded = torch.cat([real, torch.full((1, 6), 127)], dim=1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)], dim=1)

    def model_after(calibration):
        return fxquant.quantize(tiny_model("llama"), recipe, calibration=calibration).state_dict()

    truth, masked = model_after(real), model_after({"input_ids": padded, "attention_mask": mask})
    counted = model_after({"input_ids": padded, "attention_mask": torch.ones_like(mask)})

    def distance(a):  # over every tensor: scales, zeros and the packed codes
        return max(float((a[k].float() - truth[k].float()).abs().max()) for k in truth)

    assert distance(masked) <= 1e-5 < distance(counted)
