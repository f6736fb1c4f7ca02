"""The table `fxquant quantize` prints, and the progress bar over passes."""
from fxquant import apply_recipe
from fxquant.viz.report import module_names, result_table
from fxquant.models import tiny_model


def test_module_names_keep_distinct_leaves_in_order():
    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj")]
    assert module_names(targets + ["model.norm"]) == "q_proj, k_proj, norm"
    assert module_names([f"m.{c}" for c in "abcdefghi"], limit=3) == "a, b, c, +6"


def test_result_table_has_one_row_per_pass_with_counts(capsys):
    result = apply_recipe(tiny_model("llama"), "quarot-w4a4kv4", progress=True)
    lines = result_table(result).splitlines()
    assert lines[0].split() == ["pass", "changed", "where", "how", "blocked", "seconds"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == list(result.results)
    assert "14 quantized" in rows["quantize_weights"] and "down_proj" in rows["quantize_weights"]
    assert "2 inserted" in rows["insert_online_hadamard"] and "R4 online Hadamard(128)" in rows["insert_online_hadamard"]
    assert rows["layernorms_to_rms"].split()[1] == "-"
    assert "passes" in capsys.readouterr().err  # the tqdm bar went to stderr
