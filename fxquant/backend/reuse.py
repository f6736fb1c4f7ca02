"""One recipe and one lowering per model, however many graphs dynamo makes of it.

Entry points: `find(key, raised)` and `remember(key, raised, graph)`, and `transplant(raised, done)`.
The one idea: `generate` compiles a prefill graph and a decode graph (and dynamic shapes add more)
over the same weights. The decode graph alone cannot prove the recipe (its attention reads the KV
cache an earlier graph wrote), and lowering it again would time the kernels and build their layouts
twice. So the first graph's transformed, lowered tree is kept (weakly) with the user's tensors it
was built from; a later graph over the same tensors, unchanged since (`_version`), under the same
options, takes that tree's modules and tensors at its own paths instead of running the passes again.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from fxquant.backend.modules import RaisedGraph


@dataclass
class _Done:
    key: str
    sources: dict  # fqn -> (weakref to the user's tensor, its _version then)
    tree: weakref.ref
    graph: int  # the number of the compile that built the tree (for the report)


_DONE: list[_Done] = []


def remember(key: str, raised: RaisedGraph, graph: int) -> None:
    """Keep `raised`'s transformed tree for later graphs over the same tensors under `key`."""
    _DONE[:] = [d for d in _DONE if d.tree() is not None]
    sources = {fqn: (weakref.ref(t), t._version) for fqn, t in raised.sources.items()}
    _DONE.append(_Done(key, sources, weakref.ref(raised.module), graph))


def find(key: str, raised: RaisedGraph):
    """(tree, the number of its graph) of an earlier graph built from the very tensors `raised` reads, or None."""
    for done in reversed(_DONE):
        tree = done.tree()
        if tree is None or done.key != key or not raised.sources:
            continue
        if all(_same(done.sources.get(fqn), tensor) for fqn, tensor in raised.sources.items()) and _covers(tree, raised):
            return tree, done.graph
    return None


def _same(kept, tensor: torch.Tensor) -> bool:
    return kept is not None and kept[0]() is tensor and kept[1] == tensor._version


def _covers(tree: torch.nn.Module, raised: RaisedGraph) -> bool:
    """Does `tree` hold a module or tensor at every path `raised`'s graph reads?"""
    for node in raised.module.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            try:
                _at(tree, node.target)
            except AttributeError:
                return False
    return True


def _at(tree: torch.nn.Module, fqn: str):
    path, _, name = fqn.rpartition(".")
    owner = tree.get_submodule(path)
    if name not in owner._modules and name not in owner._parameters and name not in owner._buffers:
        raise AttributeError(fqn)
    return owner, name


def transplant(raised: RaisedGraph, tree: torch.nn.Module) -> None:
    """Give `raised`'s tree the modules (with their hooks and kernels) and tensors `tree` has at the
    paths its graph reads: the recipe's and the lowering's result, shared, not recomputed."""
    for node in raised.module.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        source_owner, name = _at(tree, node.target)
        path = node.target.rpartition(".")[0]
        owner = raised.module.get_submodule(path)
        if owner is source_owner:  # already shared: an enclosing module was transplanted first
            continue
        for slot in ("_modules", "_parameters", "_buffers"):
            if name in getattr(source_owner, slot):
                for other in ("_modules", "_parameters", "_buffers"):
                    getattr(owner, other).pop(name, None)
                getattr(owner, slot)[name] = getattr(source_owner, slot)[name]
