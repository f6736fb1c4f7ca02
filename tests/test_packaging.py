"""pyproject's explicit package list names every package in the tree (a new room is never left out of a wheel)."""
from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_tree_is_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fxquant").rglob("__init__.py")}
    assert set(setuptools["packages"]) == tree | {"fxquant.passes"}
    assert setuptools["package-dir"]["fxquant.passes"] == "passes"


def test_every_c_kernel_source_is_package_data():
    """A wheel without a kernel's .c file could not build it on the user's machine."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for source in (ROOT / "fxquant").rglob("*.c"):
        package = ".".join(source.parent.relative_to(ROOT).parts)
        globs = setuptools["package-data"].get(package, [])
        assert any(source.match(g) for g in globs), f"{source.relative_to(ROOT)} is not in package-data of {package}"
