"""Imports flow one way through the rooms (STYLE.md): an ast scan of every module's imports.

Module-level imports must respect the order; imports inside functions are allowed to look
*forward* only for the CLI and the package root (they sit after every room).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# rank of each room, in data-flow order; a module may import only modules of lower or equal rank
RANK = {
    "fxquant.errors": 0, "fxquant.ir": 0,
    "fxquant.hadamard": 0, "fxquant.hadamard_constructions": 0, "fxquant.weights": 0, "fxquant.quant.numerics": 0,
    "fxquant.ops": 1, "fxquant.capture": 1, "fxquant.models": 1, "fxquant.eval": 1, "fxquant.verify": 1,
    "fxquant.analysis": 2, "fxquant.viz": 2,
    "fxquant.pipeline": 3, "fxquant.config": 3, "fxquant.online": 3, "fxquant.attention": 3, "fxquant.calibrate": 3,
    "fxquant.quant": 3, "fxquant.passes": 4, "fxquant.recipes": 5, "fxquant.api": 5, "fxquant.serialize": 5, "fxquant.report": 5, "fxquant.qat": 5,
    "fxquant.cli": 9, "fxquant": 9,
}
LEAVES = {"fxquant.errors", "fxquant.ir", "fxquant.hadamard", "fxquant.hadamard_constructions", "fxquant.weights", "fxquant.quant.numerics"}
# shared nouns and tensor-math leaves: import no other fxquant room but errors
VIZ_MAY_READ = {"fxquant.ir", "fxquant.analysis.structure"}


def _room(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no room in RANK; add it to tests/test_layering.py")


def _modules():
    for path in sorted((ROOT / "fxquant").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path
    for path in sorted((ROOT / "passes").glob("*.py")):
        yield "fxquant.passes." + path.stem.removesuffix("__init__").rstrip("."), path


def _imports(path: Path, top_level_only: bool):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxquant"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("fxquant"))


def test_imports_flow_one_way():
    bad = []
    for name, path in _modules():
        room = _room(name)
        for target in _imports(path, top_level_only=room not in ("fxquant.cli", "fxquant")):
            if RANK[_room(target)] > RANK[room] and room not in ("fxquant.cli", "fxquant"):
                bad.append(f"{name} imports {target} (a later room)")
    assert bad == []


def test_function_level_imports_do_not_look_forward_either():
    """Lazy imports are still imports: only pipeline may lazily reach analysis and viz (same direction)."""
    bad = []
    for name, path in _modules():
        room = _room(name)
        if room in ("fxquant.cli", "fxquant"):
            continue
        for target in _imports(path, top_level_only=False):
            if RANK[_room(target)] > RANK[room]:
                bad.append(f"{name} imports {target}")
    assert bad == []


def test_shared_nouns_are_leaves_and_viz_reads_only_nouns():
    for name, path in _modules():
        targets = set(_imports(path, top_level_only=False))
        if name in LEAVES:
            assert targets <= LEAVES - {"fxquant.ir"}, f"{name} imports {targets}"
        if _room(name) == "fxquant.viz":
            assert {t for t in targets if not t.startswith("fxquant.viz")} <= VIZ_MAY_READ, f"{name} imports {targets}"


def test_passes_import_submodules_never_the_package_root():
    for name, path in _modules():
        if _room(name) == "fxquant.passes":
            assert "fxquant" not in set(_imports(path, top_level_only=False)), name
