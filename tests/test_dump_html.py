"""The HTML dump, read in a real browser: headless Chromium over the DevTools pipe (tests/browser.py).

One dump of a tiny Llama under quarot-w4a4kv4 (every kind of step: folds, rotations, inserted
Hadamards, quantizers, packing) is opened once per module; each test drives the page through its
DOM and `window.fxq` and asserts what a reader sees: groups, the `x N` repeat box, chain colours,
inserted ops counted against the pass's changes, search, expand / collapse, before / after, blocked
places with their reason, and no console error. Browser tests skip where no chromium is installed.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from browser import Browser, chromium_path
from conftest import ARCHS, captured
from fxquant.analysis.structure import Blocked
from fxquant.api import apply_recipe, quantize
from fxquant.capture import capture
from fxquant.errors import RecipeError
from fxquant.models import tiny_model
from fxquant.pipeline import PassResult, Pipeline, fxpass
from fxquant.viz.graphdata import FLAGS
from fxquant.viz.html import HtmlDumper, dump

needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
RECIPE = "quarot-w4a4kv4"
BLOCK = "'#root section.group section.group'"  # JS: the opened block's section (and its opened children)


# JS: open every box, then every box those sections show, until none is left; the number opened
OPEN_ALL = """(() => { let n = 0; for (let round = 0; round < 10; round++) {
  const boxes = [...document.querySelectorAll('.node[data-path]')].map(e => e.dataset.path).filter(p => !fxq.state.open.has(p));
  if (!boxes.length) break; boxes.forEach(p => fxq.state.open.add(p)); fxq.render(); n += boxes.length; }
  return n; })()"""

# JS: pairs of nodes in one row of one section's layout whose boxes overlap
OVERLAPS = """[...document.querySelectorAll('svg')].flatMap(svg => {
  const boxes = [...svg.querySelectorAll(':scope > .node')].map(g => {
    const [x, y] = g.getAttribute('transform').match(/[-\\d.]+/g).map(Number);
    return [x, y, +g.querySelector('rect.box').getAttribute('width'), g.textContent]; });
  return boxes.flatMap((a, i) => boxes.slice(i + 1).filter(b => a[1] === b[1] && a[0] < b[0] + b[2] && b[0] < a[0] + a[2])
    .map(b => a[3] + ' / ' + b[3])); })"""


def _data(path) -> dict:
    text = path.read_text()
    blob = re.search(r"<script type=application/json id=fxq-data>(.*?)</script>", text, re.S).group(1)
    return json.loads(blob.replace("<\\/", "</"))


def _step(data, name) -> int:
    return next(k for k, s in enumerate(data["steps"]) if s["step"] == name)


@pytest.fixture(scope="module")
def quarot_page(tmp_path_factory):
    path = tmp_path_factory.mktemp("dump") / "quarot.html"
    quantize(tiny_model("llama"), RECIPE, dump_dir=path)
    return path


@pytest.fixture(scope="module")
def browser():
    if chromium_path() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    with Browser() as b:
        yield b


@pytest.fixture()
def page(browser, quarot_page):
    return browser.open(quarot_page)


def _show(page, step: int, *paths, side: str = "after") -> None:
    page.eval(f"fxq.state.step = {step}; fxq.state.side = {side!r}; fxq.state.open = new Set({json.dumps(paths)}); "
              "fxq.render(); 1")


def test_page_is_one_self_contained_file(quarot_page):
    text = quarot_page.read_text()
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(|https?://", text)
    data = _data(quarot_page)
    assert [s["step"] for s in data["steps"]] == ["input", "fold_norms", "layernorms_to_rms", "rotate_residual",
                                                 "rotate_vo", "rotate_qk", "insert_online_hadamard", "quantize_weights",
                                                 "quantize_activations", "quantize_kv_cache", "pack"]
    assert data["steps"][-1]["repeats"] == {"model.layers": [["0-1", [0, 1]]]}


@needs_chromium
def test_page_opens_without_console_errors_and_in_under_two_seconds(page):
    timings = page.eval("fxq.timings")
    assert timings["firstRender"] < 2000, timings
    assert page.eval("document.querySelectorAll('section.group').length") == 1  # only the top level is laid out
    assert page.errors() == []


@needs_chromium
def test_identical_blocks_are_one_repeat_box_that_opens_and_closes(page):
    box = page.eval("[...document.querySelectorAll('.node[data-count]')].map(e => [e.dataset.path, e.dataset.count, "
                    "e.querySelector('text').textContent])")
    assert box == [["model.layers.0", "2", "layers.0-1 \u00d7 2"]]
    page.eval("document.querySelector('.node[data-count]').dispatchEvent(new MouseEvent('click', {bubbles: true})); 1")
    heads = page.eval("[...document.querySelectorAll('section.group > .ghead b')].map(e => e.textContent)")
    assert heads == ["after pack", "layers.0-1 \u00d7 2"]
    assert "2 blocks have this graph" in page.eval("document.querySelector('section.group section.group .ghead').textContent")
    groups = page.eval("[...document.querySelectorAll('section.group section.group .node[data-path]')].map(e => e.dataset.path)")
    # after pack the mlp's linears run their activation quantizers themselves: few enough ops to inline
    assert groups == ["model.layers.0.input_layernorm", "model.layers.0.self_attn", "model.layers.0.post_attention_layernorm"]
    page.eval("document.querySelector('section.group section.group .ghead .x').click(); 1")
    assert page.eval("document.querySelectorAll('section.group').length") == 1
    assert page.errors() == []


@needs_chromium
def test_chains_have_one_colour_per_class(page, quarot_page):
    _show(page, _step(_data(quarot_page), "rotate_vo"), "model.layers.0", "model.layers.0.self_attn")
    fills = page.eval("Object.fromEntries(['norm', 'vo', 'mlp', 'stream'].map(c => [c, [...new Set([...document"
                      ".querySelectorAll('#root .stripe.chain-' + c)].map(e => getComputedStyle(e).fill))]]))")
    assert all(len(v) == 1 for v in fills.values()) and len({v[0] for v in fills.values()}) == 4, fills
    vo = page.eval("[...document.querySelectorAll('#root .node[data-i]')].filter(e => e.querySelector('.chain-vo'))"
                   ".map(e => e.querySelector('.sub').textContent)")
    assert sorted(vo) == ["o_proj", "v_proj"]
    heads = page.eval("Object.fromEntries([...document.querySelectorAll('#root .node[data-i]')].filter(e => e.querySelector('.head'))"
                      ".map(e => [e.querySelector('.sub').textContent, [...e.querySelectorAll('.head')].map(h => +h.dataset.kv)]))")
    assert heads == {"v_proj": [0, 1], "o_proj": [0, 0, 1, 1]}  # 2 KV heads, each read by 2 of the 4 query heads
    mlp = page.eval("[...document.querySelectorAll('#root .node[data-i]')].filter(e => e.querySelector('.chain-mlp'))"
                    ".map(e => e.querySelector('.sub').textContent)")
    assert sorted(mlp) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    # after pack analysis reads no linears; the last chains it found stay, matched by module path, and the page says so
    data = _data(quarot_page)
    _show(page, _step(data, "pack"), "model.layers.0", "model.layers.0.mlp")
    mlp = page.eval("[...document.querySelectorAll('#root .node[data-i]')].filter(e => e.querySelector('.chain-mlp'))"
                    ".map(e => e.querySelector('text').textContent + ' ' + e.querySelector('.sub').textContent)")
    assert sorted(mlp) == ["quantized_linear mlp.down_proj", "quantized_linear mlp.gate_proj", "quantized_linear mlp.up_proj"]
    assert "matched by module path" in page.eval("document.getElementById('pulled').textContent")
    stream = page.eval(f"[...document.querySelectorAll({BLOCK} + ' .node[data-i]')].filter(e => e.querySelector('.chain-stream'))"
                       ".map(e => e.querySelector('text').textContent)")
    assert stream == ["add", "add"]  # the residual adds come from this graph's own analysis


@needs_chromium
@pytest.mark.parametrize("step, op, per_block", [("insert_online_hadamard", "hadamard", 1),
                                                 ("quantize_activations", "fake_quant", 7)])
def test_inserted_ops_are_highlighted_with_the_pass_name_and_match_its_changes(page, quarot_page, step, op, per_block):
    data = _data(quarot_page)
    k = _step(data, step)
    _show(page, k, "model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp")
    created = page.eval("[...document.querySelectorAll('#root .node.created[data-i]')].map(e => [e.querySelector('text').textContent, "
                        "e.querySelector('.tag').textContent])")
    assert created == [[op, "+" + step]] * per_block
    blocks = page.eval("+document.querySelector('.node[data-count]').dataset.count")
    assert per_block * blocks == len(data["steps"][k]["changes"])
    assert page.eval("document.querySelector('#diff .dc').textContent") == str(per_block * blocks)
    # the boxes that hold what the step created are outlined too: the way to the new ops from the top
    assert page.eval("[...document.querySelectorAll('.node.created[data-count]')].length") == 1


@needs_chromium
def test_weights_a_pass_edited_are_marked(page, quarot_page):
    data = _data(quarot_page)
    _show(page, _step(data, "fold_norms"), "model.layers.0")
    edited = page.eval(f"[...document.querySelectorAll({BLOCK} + ' .node[data-i]')].filter(e => e.querySelector('.mark.edited'))"
                       ".map(e => e.querySelector('.sub').textContent)")
    # the inlined mlp's gate/up linears took post_attention_layernorm's weight; q/k/v sit in the self_attn box
    assert sorted(edited) == ["mlp.gate_proj", "mlp.up_proj"]
    assert page.eval(f"[...document.querySelectorAll({BLOCK} + ' .node[data-path]')].filter(e => e.querySelector('.mark.edited'))"
                     ".map(e => e.dataset.path)") == ["model.layers.0.input_layernorm", "model.layers.0.self_attn",
                                                     "model.layers.0.post_attention_layernorm"]
    assert page.eval("document.querySelector('#diff .dm').textContent") == str(len(data["steps"][1]["changes"]))
    # values changed: q/k/v/gate/up/lm_head scaled and the 5 norms set to ones (fingerprints differ)
    assert page.eval("document.querySelector('#diff .dw').textContent") == "16"


@needs_chromium
def test_before_and_after_show_erased_and_created_nodes(page, quarot_page):
    k = _step(_data(quarot_page), "pack")
    _show(page, k, "model.layers.0", "model.layers.0.mlp", side="before")
    erased = page.eval("[...document.querySelectorAll('#root .node.erased[data-i]')].map(e => e.querySelector('.sub').textContent)")
    # aten.linear, replaced by packed ones, and the activation quantizers the packed ones run themselves
    assert sorted(erased) == ["down_proj", "down_proj", "gate_proj", "gate_proj", "up_proj", "up_proj"]
    _show(page, k, "model.layers.0", "model.layers.0.mlp", side="after")
    assert page.eval("document.querySelectorAll('#root .node.erased').length") == 0
    assert page.eval("[...document.querySelectorAll('#root .node.created[data-path]')].map(e => e.dataset.path)") == \
        ["model.layers.0", "model.layers.0.self_attn"]  # the boxes holding the packed linears (the mlp's are inline)
    assert page.eval("[...document.querySelectorAll('#root .node.created[data-i] text')].filter(e => !e.classList.length)"
                     ".map(e => e.textContent)") == ["quantized_linear"] * 3
    assert page.errors() == []


@needs_chromium
def test_search_finds_modules_and_ops_and_reveals_a_hit(page, quarot_page):
    data = _data(quarot_page)
    last = data["steps"][-1]
    strings, flags = data["strings"], data["flags"]
    hidden = flags["param"] | flags["shared"] | flags["hidden"]
    expected = sum(1 for r in last["nodes"] if "down_proj" in strings[r[2]] and not r[5] & hidden)
    page.eval("{ const s = document.getElementById('search'); s.value = 'down_proj'; s.dispatchEvent(new Event('input')); 1 }")
    page.eval("new Promise(r => setTimeout(r, 300))")
    assert page.eval("document.querySelector('#results .count').textContent") == f"{expected} matches"
    assert expected == 4  # per block: the R4 hadamard, the packed linear (which quantizes its input itself)
    page.eval("[...document.querySelectorAll('#results .hit')].find(e => e.textContent.includes('layers.1.mlp.down_proj'))"
              ".click(); 1")
    assert page.eval("[...fxq.state.open]") == ["model.layers.0"]  # the mlp is inline in its block after pack
    assert page.eval("document.querySelector('.node.flash .sub').textContent") == "mlp.down_proj"
    page.eval("{ const s = document.getElementById('search'); s.value = 'scaled_dot'; s.dispatchEvent(new Event('input')); 1 }")
    page.eval("new Promise(r => setTimeout(r, 300))")
    assert page.eval("document.querySelector('#results .count').textContent") == "2 matches"
    assert page.errors() == []


@fxpass()
def refuse_layer_1(cg, structure, cfg):
    v = next(c.v for c in structure.vo_chains if c.v.module == "model.layers.1.self_attn.v_proj")
    return PassResult((), (Blocked(v.node, v.module, "test: this layer is refused"),))


@needs_chromium
def test_blocked_places_are_marked_with_their_reason_and_split_the_repeat(browser, tmp_path):
    path = tmp_path / "blocked.html"
    Pipeline([refuse_layer_1], dumper=HtmlDumper(path)).run(capture(tiny_model("llama")))
    page = browser.open(path)
    assert page.eval("[...document.querySelectorAll('.node[data-path]')].map(e => e.querySelector('text').textContent)")[:2] \
        == ["layers.0", "layers.1"]  # no longer one class of identical blocks
    page.eval("fxq.state.open = new Set(['model.layers.1', 'model.layers.1.self_attn']); fxq.render(); 1")
    title = page.eval("document.querySelector('.node[data-i] .mark.blocked').closest('.node').querySelector('title').textContent")
    assert "model.layers.1.self_attn.v_proj" in title and "blocked: test: this layer is refused" in title
    assert "test: this layer is refused" in page.eval("document.getElementById('blocked').textContent")
    assert page.errors() == []


@needs_chromium
@pytest.mark.parametrize("arch", ARCHS)
def test_every_group_of_every_tiny_arch_opens_without_console_errors(browser, tmp_path, arch):
    cg, _ = captured(arch)
    page = browser.open(dump(cg, tmp_path / f"{arch}.html"))
    opened = page.eval(OPEN_ALL)
    assert opened >= 3  # the block, its attention and its norms at least, each laid out
    assert page.eval(OVERLAPS) == []  # within a layer of any section, boxes keep apart
    assert page.eval("[...document.querySelectorAll('.node[data-count]')].map(e => e.dataset.count)") == ["2"]
    assert page.errors() == []


def test_dump_of_one_graph_and_of_a_graph_module(tmp_path):
    model = tiny_model("llama")
    data = _data(dump(model, tmp_path / "one.html"))
    assert [s["step"] for s in data["steps"]] == ["input"] and data["title"] == "fxquant dump: LlamaForCausalLM"
    assert {c[0] for c in data["steps"][0]["chains"]} == {"norm", "vo", "mlp", "stream"}
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    assert len(_data(dump(gm, tmp_path / "gm.html"))["steps"][0]["nodes"]) == 4
    with pytest.raises(TypeError, match="needs a model, CapturedGraph or GraphModule"):
        dump("model", tmp_path / "x.html")


def test_dump_dir_chooses_text_html_or_both(tmp_path, monkeypatch):
    recipe = {"passes": [{"pass": "fold_norms"}]}
    monkeypatch.setenv("FXQUANT_DUMP_FORMAT", "both")
    quantize(tiny_model("llama"), recipe, dump_dir=tmp_path / "both")
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["00_input.txt", "01_fold_norms.txt", "dump.html"]
    monkeypatch.setenv("FXQUANT_DUMP_FORMAT", "html")
    quantize(tiny_model("llama"), recipe, dump_dir=tmp_path / "page")
    assert [p.name for p in (tmp_path / "page").iterdir()] == ["dump.html"]
    monkeypatch.setenv("FXQUANT_DUMP", str(tmp_path / "env.html"))  # a .html target is the page, whatever the format
    apply_recipe(tiny_model("llama"), recipe)
    assert [s["step"] for s in _data(tmp_path / "env.html")["steps"]] == ["input", "fold_norms"]
    assert _data(tmp_path / "env.html")["title"] == "fxquant dump: LlamaForCausalLM, custom"
    monkeypatch.setenv("FXQUANT_DUMP_FORMAT", "svg")
    with pytest.raises(RecipeError, match=r"FXQUANT_DUMP_FORMAT='svg' is not one of \['text', 'html', 'both'\]"):
        quantize(tiny_model("llama"), recipe, dump_dir=tmp_path / "bad")


def test_cli_dump_writes_the_page(tmp_path, capsys, monkeypatch):
    import os

    from fxquant.cli import main

    monkeypatch.delenv("FXQUANT_DUMP", raising=False)
    out = tmp_path / "cli.html"
    assert main(["dump", "--model", "tiny-llama", "--recipe", "rotate-r1r2", "--out", str(out)]) == 0
    assert [s["step"] for s in _data(out)["steps"]][-1] == "rotate_vo"
    printed = capsys.readouterr().out
    assert out.resolve().as_uri() in printed and re.search(r"^rotate_vo +2 rotated", printed, re.M)  # the pass table
    assert "FXQUANT_DUMP" not in os.environ  # set for the run only
    assert main(["dump", "--model", "tiny-qwen2", "--out", str(tmp_path / "graph.html")]) == 0  # no recipe: the graph
    assert [s["step"] for s in _data(tmp_path / "graph.html")["steps"]] == ["input"]
    assert main(["dump", "--model", "tiny-llama", "--out", str(tmp_path / "x.txt")]) == 2


def test_flags_are_distinct_bits():
    assert sorted(FLAGS.values()) == [1 << i for i in range(len(FLAGS))]


@pytest.mark.slow
@needs_chromium
def test_smollm2_dump_opens_in_under_two_seconds(browser, tmp_path):
    from fxquant.models import load_model

    model, _ = load_model("smollm2")
    path = tmp_path / "smollm2.html"
    quantize(model, "rotate-r1r2r4", dump_dir=path)
    page = browser.open(path)
    timings = page.eval("fxq.timings")
    print(f"SmolLM2 rotate-r1r2r4 dump: {path.stat().st_size / 2 ** 20:.1f} MiB, first render {timings['firstRender']:.0f} ms")
    assert timings["firstRender"] < 2000, timings
    assert page.eval("document.querySelector('.node[data-count]').dataset.count") == "30"
    page.eval("fxq.state.open = new Set(['model.layers.0', 'model.layers.0.self_attn']); fxq.render(); 1")
    assert page.eval("document.querySelectorAll('section.group').length") == 3
    assert page.errors() == []


def test_read_a_dump_example_writes_the_page(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("read_a_dump", Path(__file__).parent.parent / "examples" / "read_a_dump.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--model", "tiny-llama", "--recipe", "rotate-r1r2r4", "--out", str(tmp_path / "ex.html")])
    assert [s["step"] for s in _data(out)["steps"]][-1] == "insert_online_hadamard"
    assert out.as_uri() in capsys.readouterr().out
