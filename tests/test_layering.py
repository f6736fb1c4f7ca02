"""Imports flow one way through the rooms (STYLE.md, docs/LAYOUT.md): an ast scan of every module.

A module may import only modules of its own or an earlier room, at module level and inside
functions alike (a lazy import is still an import); only the CLI and the package root, which sit
after every room, are exempt. No pass imports another pass, and outside `passes/` only the recipe
registry imports a pass. No function takes more than 6 parameters except where an outside
signature dictates it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# rank of each room, in data-flow order (docs/LAYOUT.md); a module may import only lower or equal ranks
RANK = {
    # 0: shared nouns and tensor-math leaves (no fx, no modules of their own)
    "fxquant.errors": 0, "fxquant.ir": 0, "fxquant.hadamard": 0, "fxquant.hadamard_constructions": 0,
    "fxquant.weights": 0, "fxquant.quant.numerics": 0, "fxquant.quant.packed": 0, "fxquant.quant.format": 0,
    "fxquant.quant.gptq": 0, "fxquant.cayley": 0,
    # 1: what runs at inference: custom ops, hooks, attention, the packed linear, its kernels, lowered twins
    "fxquant.runtime": 1,
    # 2: the op table, capture and the sources of models, data and checks
    "fxquant.ops": 2, "fxquant.capture": 2, "fxquant.models": 2, "fxquant.eval": 2, "fxquant.verify": 2,
    "fxquant.calibration": 2,
    # 3: pure analysis
    "fxquant.analysis": 3,
    # 4: the engine passes stand on: pipeline, configs, calibration, equalization and quantization libraries
    "fxquant.pipeline": 4, "fxquant.config": 4, "fxquant.calibrate": 4, "fxquant.equalize": 4, "fxquant.install": 4,
    "fxquant.quant": 4, "fxquant.lowering": 4, "fxquant.rotations": 4, "fxquant.rotation_checkpoint": 4,
    # 5: renderers and dumpers (read results; never edit a model)
    "fxquant.viz": 5,
    # 6: the passes
    "fxquant.passes": 6,
    # 7: recipes and the API
    "fxquant.recipes": 7, "fxquant.api": 7, "fxquant.serialize": 7, "fxquant.qat": 7,
    # 8: the torch.compile backend (raises dynamo's graphs to modules, runs recipes and lowering on them)
    "fxquant.backend": 8,
    # 9: entry points
    "fxquant.cli": 9, "fxquant": 9,
}
ENTRY_POINTS = ("fxquant.cli", "fxquant")
LEAVES = {name for name, rank in RANK.items() if rank == 0}
# parameters dictated by an outside signature: torch.library op schemas (positional primitives only)
OUTSIDE_SIGNATURES = {"quantized_linear", "_quantized_linear_fake", "dequantized_weight"}


def _room(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no room in RANK; add it to tests/test_layering.py")


def _modules():
    for path in sorted((ROOT / "fxquant").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path
    for path in sorted((ROOT / "passes").glob("*.py")):
        yield "fxquant.passes" + ("" if path.stem == "__init__" else f".{path.stem}"), path


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxquant"):
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("fxquant"))


def _is_module(name: str) -> bool:
    """`from fxquant import qat` imports the module fxquant.qat, not a name of fxquant."""
    return any(m == name for m, _ in _modules())


def test_imports_flow_one_way():
    bad = []
    for name, path in _modules():
        room = _room(name)
        if room in ENTRY_POINTS:
            continue
        bad += [f"{name} imports {t} (room {_room(t)} runs later)" for t in _imports(path) if RANK[_room(t)] > RANK[room]]
    assert not bad, "\n".join(bad)


def test_leaves_import_only_leaves():
    bad = [f"{name} imports {t}" for name, path in _modules() if name in LEAVES
           for t in _imports(path) if _room(t) not in LEAVES]
    assert not bad, "\n".join(bad)


def test_no_pass_imports_a_pass_and_only_the_recipe_registry_imports_passes():
    bad = []
    for name, path in _modules():
        targets = {t for t in _imports(path) if t.startswith("fxquant.passes.")}
        if name.startswith("fxquant.passes.") and targets:
            bad.append(f"pass module {name} imports {sorted(targets)}")
        elif name == "fxquant.passes" or name.startswith("fxquant.passes."):
            continue
        elif _room(name) not in ("fxquant.recipes", *ENTRY_POINTS) and ({"fxquant.passes"} | targets) & set(_imports(path)):
            bad.append(f"engine module {name} imports passes")
    assert not bad, "\n".join(bad)


def test_passes_import_submodules_never_the_package_root():
    for name, path in _modules():
        if _room(name) == "fxquant.passes":
            assert "fxquant" not in set(_imports(path)), name


def _triton_kernel(node: ast.FunctionDef) -> bool:
    """A @triton.jit function: its parameters are pointers, strides and block sizes by the launch ABI."""
    return any("triton" in ast.unparse(d) for d in node.decorator_list)


def test_no_function_takes_more_than_six_parameters():
    bad = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in OUTSIDE_SIGNATURES \
                    and not _triton_kernel(node):
                args = node.args
                params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
                if len(params) > 6:
                    bad.append(f"{name}.{node.name} takes {len(params)} parameters")
    assert not bad, "\n".join(bad)
