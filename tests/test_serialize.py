"""fxquant.save / fxquant.load: safetensors + JSON, replayed on a fresh model, outputs bit-identical."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fxquant import load, quantize, save
from fxquant.errors import ModelLoadError
from fxquant.models import tiny_model


def _ids():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch,preset", [("llama", "quarot-w4a4kv4"), ("opt", "rotate-r1r2"), ("gpt2", "w8a8"),
                                         ("qwen2_moe", "quarot-w4a8")])
def test_a_saved_model_loads_back_bit_identical(tmp_path, arch, preset):
    model = tiny_model(arch)
    quantize(model, preset)
    with torch.no_grad():
        ref = model(_ids()).logits
    save(model, tmp_path, recipe=preset)
    loaded = load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, ref)
    assert json.loads((tmp_path / "fxquant.json").read_text())["recipe"] == preset


def test_what_is_recorded_for_a_rotated_layernorm_model(tmp_path):
    model = tiny_model("opt")
    quantize(model, "rotate-r1r2-w8a8")
    save(model, tmp_path)
    meta = json.loads((tmp_path / "fxquant.json").read_text())
    assert meta["modules"]["model.decoder.final_layer_norm"] == {"type": "RMSNorm", "width": [64], "eps": 1e-05}
    assert meta["extra_parameters"] == {} or all(k.endswith("bias") for k in meta["extra_parameters"])
    assert meta["hooks"]["model.decoder.layers.0.fc1"] == [{"type": "ActivationFakeQuant", "bits": 8, "symmetric": True,
                                                                "clip_ratio": 1.0}]


def test_loading_in_a_fresh_process_gives_the_same_logits(tmp_path):
    model = tiny_model("llama")
    quantize(model, "quarot-w4a4kv4")
    with torch.no_grad():
        ref = model(_ids()).logits
    save(model, tmp_path)
    torch.save(_ids(), tmp_path / "ids.pt")
    code = ("import sys, torch, fxquant; m = fxquant.load(sys.argv[1]); ids = torch.load(sys.argv[1] + '/ids.pt'); "
            "torch.save(m(ids).logits.detach(), sys.argv[1] + '/out.pt')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), ref)


def test_load_refuses_a_directory_fxquant_did_not_write(tmp_path):
    with pytest.raises(ModelLoadError, match="has no fxquant.json: it was not written by fxquant.save"):
        load(tmp_path)
    (tmp_path / "fxquant.json").write_text('{"format": "other-9"}')
    with pytest.raises(ModelLoadError, match="has format 'other-9'; this fxquant reads 'fxquant-1'"):
        load(tmp_path)


def _saved(tmp_path, arch="llama", preset="rotate-r1r2-w8a8"):
    model = tiny_model(arch)
    quantize(model, preset)
    save(model, tmp_path / arch)
    return tmp_path / arch


def test_the_json_records_every_tensor_with_its_checksum_and_the_version(tmp_path):
    meta = json.loads((_saved(tmp_path) / "fxquant.json").read_text())
    assert meta["fxquant_version"] not in ("", None)
    assert meta["tensors"]["model.layers.0.self_attn.q_proj.codes"] | {"crc32": 0} == {  # packed int8
        "shape": [64, 64], "dtype": "uint8", "crc32": 0}
    assert meta["tensors"]["model.layers.0.self_attn.q_proj.scale"]["shape"] == [64, 1]
    assert meta["modules"]["model.layers.0.self_attn.q_proj"]["type"] == "QuantizedLinear"
    assert all(set(r) == {"shape", "dtype", "crc32"} for r in meta["tensors"].values())


def test_a_truncated_weights_file_is_refused_naming_the_file(tmp_path):
    path = _saved(tmp_path) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors' cannot be read as safetensors \(truncated"):
        load(path.parent)


def test_a_flipped_byte_is_refused_naming_the_tensor(tmp_path):
    path = _saved(tmp_path) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # in the data of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"tensor '.+' in '.+model\.safetensors' is corrupted"):
        load(path.parent)


def test_weights_with_a_config_of_another_model_are_refused(tmp_path):
    llama, qwen = _saved(tmp_path), _saved(tmp_path, "qwen2", "rotate-r1r2")
    (llama / "config.json").write_text((qwen / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="builds a Qwen2ForCausalLM, but the weights .* LlamaForCausalLM"):
        load(llama)
    other = tiny_model("llama", intermediate_size=96)
    other.config.save_pretrained(llama)
    with pytest.raises(ModelLoadError, match=r"packed layer 'model\.layers\.0\.mlp\..+' in .+ is \d+x\d+ .+ builds it"):
        load(llama)
    float_dir = _saved(tmp_path, "llama", "rotate-r1r2")  # no packed layers: the tensor shapes say it
    other.config.save_pretrained(float_dir)
    with pytest.raises(ModelLoadError, match=r"tensor 'model\.layers\.0\.mlp\..+' in .+ has shape .+ expects"):
        load(float_dir)


def test_a_damaged_json_is_refused(tmp_path):
    directory = _saved(tmp_path)
    (directory / "fxquant.json").write_text('{"format": "fxquant-1", ')
    with pytest.raises(ModelLoadError, match="fxquant.json' is not valid JSON"):
        load(directory)


def test_cli_quantize_out_writes_a_directory_that_loads(tmp_path, capsys):
    from fxquant.cli import main

    assert main(["quantize", "--model", "tiny-llama", "--recipe", "quarot-w4a8", "--out", str(tmp_path)]) == 0
    assert f"saved to {tmp_path}" in capsys.readouterr().out
    loaded = load(tmp_path)
    assert len([m for m in loaded.modules() if m._forward_pre_hooks]) == 14  # 14 act-quant (2 with R4 too)


@pytest.mark.slow
def test_cli_eval_with_a_recipe_prints_before_and_after(capsys):
    from fxquant.cli import main

    assert main(["eval", "--model", "smollm2", "--windows", "1", "--recipe", "quarot-w4a8"]) == 0
    assert "(quarot-w4a8)" in capsys.readouterr().out.splitlines()[-1]
