"""README.md's results tables are the ones tools/results_table.py generates from docs/BENCHMARKS.md."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "tools" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_block_is_generated_from_benchmarks():
    tool = _tool()
    readme = (ROOT / "README.md").read_text()
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    assert tool.updated_readme(readme, text) == readme, "README.md is stale: run python tools/results_table.py --write"


def test_a_figure_changed_in_benchmarks_changes_the_block():
    tool = _tool()
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    changed = text.replace("| `w4a16` | 12.9398 | 12.9641 |", "| `w4a16` | 12.9398 | 99.0000 |")
    assert changed != text
    assert "| `w4a16` | 99.00 | 10.09 |" in tool.block(changed)
