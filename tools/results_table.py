"""The README's results tables, generated from docs/BENCHMARKS.md, so the two never disagree.

Usage: python tools/results_table.py            # print the block
       python tools/results_table.py --write    # replace the block between the markers in README.md

Each table is read from the first markdown table under a heading of docs/BENCHMARKS.md; the rows
shown are the main presets. `tests/test_results_table.py` fails when README.md is stale.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin (tools/results_table.py --write) -->", "<!-- results:end -->"
FP32_PERPLEXITY = 9.807  # SmolLM2 float32 on the default split (docs/BENCHMARKS.md, eval harness)
ACCURACY = ("### Perplexity before and after `fxquant.lower`, every preset",
            ["w8a8", "smoothquant-w8a8", "rotate-r1r2-w8a8", "w4a16", "awq-w4a16", "gptq-w4a16", "quarot-w4a8",
             "quarot-gptq-w4a4kv4", "quarot-w4a4kv4"])
SPEED = "### Decode and prefill speed (bench/speed.py)"
BACKEND_SPEED = "### Under `torch.compile(backend=\"fxquant\")` on the C kernels (2026-12-02)"


def section_table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first markdown table after `heading`, as {column: cell}."""
    lines = text.splitlines()
    if heading not in lines:
        raise SystemExit(f"docs/BENCHMARKS.md has no heading {heading!r}")
    start = next(i for i in range(lines.index(heading), len(lines)) if lines[i].startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row)) for row in body]


def _accuracy(text: str) -> list[str]:
    heading, presets = ACCURACY
    rows = {r["preset"].strip("`"): r for r in section_table(text, heading)}
    out = ["| preset | perplexity, lowered | x float32 (9.807) |", "|---|---|---|"]
    for name in presets:
        ppl = float(rows[name]["lowered (measure)"])
        out.append(f"| `{name}` | {ppl:.2f} | {ppl / FP32_PERPLEXITY:.2f} |")
    return out


def _speed(text: str) -> list[str]:
    """One run's rows (ratios only mean something within a run): the backend run, else the eager one."""
    heading = BACKEND_SPEED if BACKEND_SPEED in text.splitlines() else SPEED
    out = ["| model (SmolLM2, batch 1, decode) | tok/s | x float32 | x bfloat16 |", "|---|---|---|---|"]
    for r in section_table(text, heading):
        if not (r["model"].endswith("packed") or "(fast)" in r["model"]):
            out.append(f"| {r['model']} | {r['decode (tok/s)']} | {r['x fp32']} | {r['x bf16']} |")  # 2nd x fp32: decode's
    return out


def block(text: str) -> str:
    """The README block: markers, both tables, and where they come from."""
    return "\n".join([BEGIN, "", *_accuracy(text), "", *_speed(text), "",
                      "Generated from [docs/BENCHMARKS.md](docs/BENCHMARKS.md) (commands, machine and date there; "
                      "speed of the other presets in its \"Lowering\" section).",
                      END])


def updated_readme(readme: str, text: str) -> str:
    """README.md with its results block replaced by a freshly generated one."""
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no results block ({BEGIN} ... {END})")
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + block(text) + tail


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    if not args.write:
        print(block(text))
        return
    readme = ROOT / "README.md"
    readme.write_text(updated_readme(readme.read_text(), text))


if __name__ == "__main__":
    main()
