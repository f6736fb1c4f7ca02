"""fxquant.save / fxquant.load: safetensors + JSON, replayed on a fresh model, outputs bit-identical."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxquant import load, quantize, save
from fxquant.errors import ModelLoadError
from fxquant.models import tiny_model
from fxquant.serialize import load_tokenizer
from fxquant.runtime.hooks import ActivationFakeQuant
from fxquant.runtime.linear import QuantizedLinear


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
    assert len([m for m in loaded.modules() if m._forward_pre_hooks]) == 14 + 2  # 14 act-quant (2 with R4 too), 2 attention (the KV cache note)


@pytest.mark.slow
def test_cli_eval_with_a_recipe_prints_before_and_after(capsys):
    from fxquant.cli import main

    assert main(["eval", "--model", "smollm2", "--windows", "1", "--recipe", "quarot-w4a8"]) == 0
    assert "(quarot-w4a8)" in capsys.readouterr().out.splitlines()[-1]


def _tiny_tokenizer():
    """A six-word WordLevel tokenizer built offline (tiny models have none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", "the", "cat", "sat"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def saved_with_tokenizer(tmp_path_factory):
    """One tiny llama saved once, with a generation config and a tokenizer; tests copy it (saved_llama)."""
    model = tiny_model("llama")
    model.generation_config.max_new_tokens = 2  # the default would generate up to 20 tokens
    directory = save(model, tmp_path_factory.mktemp("saved") / "llama")
    _tiny_tokenizer().save_pretrained(directory)
    return model, directory


@pytest.fixture
def saved_llama(saved_with_tokenizer, tmp_path):
    """A fresh copy of the saved directory, for a test to damage."""
    return shutil.copytree(saved_with_tokenizer[1], tmp_path / "llama")


def _truncate(path):
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def test_the_generation_config_round_trips_and_generate_behaves_as_before(saved_with_tokenizer, saved_llama):
    model, _ = saved_with_tokenizer
    loaded = load(saved_llama)
    assert loaded.generation_config.to_diff_dict() == model.generation_config.to_diff_dict()
    assert loaded.generation_config.max_new_tokens == 2
    with torch.no_grad():  # 2 new tokens as saved, not the default 20 (weights are bit-identical: tested above)
        assert loaded.generate(_ids()[:1, :4], do_sample=False).shape == (1, 4 + 2)


def _edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


# (file, how it is damaged, what the error must say): one row per way a saved config can be wrong
DAMAGED_CONFIGS = {
    "truncated config": ("config.json", _truncate,
                         r"config\.json' is not valid JSON \(truncated or damaged.*save the model"),
    "config not an object": ("config.json", lambda p: p.write_text("[1, 2]"),
                             r"config\.json' holds a JSON array, not an object"),
    "missing config": ("config.json", lambda p: p.unlink(),
                       r"config\.json' is missing: without it the architecture cannot be"),
    "unknown model_type": ("config.json", lambda p: _edit_json(p, lambda c: c | {"model_type": "no-such-arch"}),
                           r"config\.json' is rejected by transformers' AutoConfig \(ValueError: .*no-such-arch"),
    "no model_type": ("config.json",
                      lambda p: _edit_json(p, lambda c: {k: v for k, v in c.items() if k != "model_type"}),
                      r"config\.json' has no 'model_type'"),
    "truncated generation config": ("generation_config.json", _truncate,
                                    r"generation_config\.json' is not valid JSON"),
    "generation config transformers rejects": (
        "generation_config.json", lambda p: p.write_text('{"cache_implementation": "no-such-cache"}'),
        r"generation_config\.json' is rejected by transformers' GenerationConfig \(ValueError: Invalid "
        r"`cache_implementation`"),
}


@pytest.mark.parametrize("case", list(DAMAGED_CONFIGS))
def test_a_damaged_config_is_refused_naming_the_file(saved_llama, case):
    name, damage, match = DAMAGED_CONFIGS[case]
    damage(saved_llama / name)
    with pytest.raises(ModelLoadError, match=match):
        load(saved_llama)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_truncated_tokenizer_file_is_refused_naming_it_by_load_and_load_tokenizer(saved_llama, name):
    _truncate(saved_llama / name)
    match = name.replace(".", r"\.") + "' is not valid JSON .*save the tokenizer again"
    with pytest.raises(ModelLoadError, match=match):
        load(saved_llama)
    with pytest.raises(ModelLoadError, match=match):
        load_tokenizer(saved_llama)


def test_a_tokenizer_json_autotokenizer_rejects_is_refused_naming_the_directory(saved_llama):
    (saved_llama / "tokenizer.json").write_text('{"model": 3}')  # a JSON object, but no tokenizer
    with pytest.raises(ModelLoadError, match=r"the tokenizer in '.+llama' \(tokenizer\.json, tokenizer_config\.json\) "
                                             r"is rejected by transformers' AutoTokenizer \(KeyError"):
        load_tokenizer(saved_llama)


def test_load_tokenizer_returns_the_saved_tokenizer_or_none(saved_llama, tmp_path):
    assert load_tokenizer(saved_llama)("the cat sat").input_ids == [3, 4, 5]
    assert load_tokenizer(tmp_path) is None  # a directory without tokenizer files
    with pytest.raises(ModelLoadError, match=r"no-such-dir' is not a directory, so it holds no tokenizer"):
        load_tokenizer(tmp_path / "no-such-dir")


def test_cli_load_for_eval_refuses_a_damaged_tokenizer_by_name(saved_llama):
    from fxquant.cli import _load_for_eval

    model, tokenizer = _load_for_eval(str(saved_llama))
    assert tokenizer("the cat").input_ids == [3, 4] and model.generation_config.max_new_tokens == 2
    (saved_llama / "tokenizer_config.json").write_text("{")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json' is not valid JSON"):
        _load_for_eval(str(saved_llama))


def test_a_plain_transformers_directory_is_refused_saying_how_to_load_it(saved_llama):
    (saved_llama / "fxquant.json").unlink()
    with pytest.raises(ModelLoadError, match=r"llama' has no fxquant\.json: it was not written by fxquant\.save; it "
                                             r"has a config\.json, .*load it with fxquant\.models\.load_model"):
        load(saved_llama)


def test_a_nonexistent_path_or_a_file_is_refused_saying_what_load_takes(saved_llama):
    with pytest.raises(ModelLoadError, match=r"no-such-dir' does not exist: fxquant\.load takes the directory "
                                             r"fxquant\.save .* wrote; check the path"):
        load(saved_llama / "no-such-dir")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors' is a file, not a directory"):
        load(saved_llama / "model.safetensors")


def test_an_fxquant_json_that_is_not_an_object_is_refused_naming_it(saved_llama):
    (saved_llama / "fxquant.json").write_text('"fxquant-1"')
    with pytest.raises(ModelLoadError, match=r"fxquant\.json' holds a JSON string, not an object"):
        load(saved_llama)


def test_a_directory_saved_before_the_house_move_loads_with_the_same_logits():
    """tests/data/saved_llama_quarot_w4a8_v0 was written by fxquant at 3563d8d (before the runtime,
    QuantFormat and records moves): packed int4 layers, act-quant and R4 hooks, R3 in attention."""
    from safetensors.torch import load_file

    data = Path(__file__).resolve().parent / "data"
    expected = load_file(str(data / "saved_llama_quarot_w4a8_v0.expected.safetensors"))
    model = load(data / "saved_llama_quarot_w4a8_v0")
    packed = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert packed and all(m.act == ActivationFakeQuant(8, True, 1.0) for m in packed)  # loading absorbs them
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    # since 2026-12-02 a layer with quantized inputs computes the exact integer product: the float32
    # rounding of the float product the recorded logits came from apart
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4 * expected["logits"].abs().max().item(), rtol=0)


@pytest.mark.parametrize("no_lower", [False, True])
def test_cli_generate_lowers_a_saved_model_streams_and_prints_speed(tmp_path, capsys, no_lower):
    from fxquant.cli import main

    model = tiny_model("llama")
    quantize(model, {"preset": "w4a16", "group_size": 32})
    _tiny_tokenizer().save_pretrained(save(model, tmp_path / "q"))
    argv = ["generate", "--model", str(tmp_path / "q"), "--prompt", "the cat", "--max-new-tokens", "3",
            "--ignore-eos"]
    assert main(argv + (["--no-lower"] if no_lower else [])) == 0
    out = capsys.readouterr().out
    assert ("lowered in" in out) is not no_lower
    assert "int4 tinygemm" in out or no_lower
    assert "prefill: 2 tokens in" in out and "decode: 2 tokens at" in out


def test_cli_eval_lowers_by_default_and_no_lower_skips_it(tmp_path, capsys, monkeypatch):
    from fxquant import cli

    model = tiny_model("llama")
    quantize(model, {"preset": "w4a16", "group_size": 32})
    _tiny_tokenizer().save_pretrained(save(model, tmp_path / "q"))
    monkeypatch.setattr("fxquant.eval.default_tokens", lambda tok: torch.randint(0, 6, (4000,)))
    for flags, lowered in (([], True), (["--no-lower"], False)):
        assert cli.main(["eval", "--model", str(tmp_path / "q"), "--windows", "1", "--seq-len", "64", *flags]) == 0
        out = capsys.readouterr().out
        assert ("lowered in" in out) is lowered and "perplexity:" in out
