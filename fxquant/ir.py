"""Shared nouns of fxquant: the captured graph and its links back to the model.

`CapturedGraph` is what `capture()` returns and every later room reads. The one idea: the model
stays the source of truth and the graph is the map. Each node that reads a weight carries a
`ParamRef` (module path + parameter name) in `node.meta[META_PARAM]`, so a transform finds the
real `nn.Parameter` to edit through `CapturedGraph.param(ref)`. No logic lives here beyond lookups.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

META_PARAM = "fxquant.param"  # node that *is* a parameter placeholder -> ParamRef
META_MODULE = "fxquant.module"  # every call node -> path of the innermost module that ran it
META_FROM = "fxquant.from_node"  # nodes inserted by fxquant -> name of the node they came from


@dataclass(frozen=True, order=True)
class ParamRef:
    """A parameter (or buffer) of the model, named by its owning module and attribute."""

    module: str
    name: str

    @property
    def fqn(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name

    def __str__(self) -> str:
        return self.fqn


@dataclass(frozen=True)
class RunContext:
    """What a recipe run hands its passes besides the graph, owned and set by the Pipeline:
    the calibration batches (model-input dicts), whether long passes show a progress bar, the
    run's steps (a pass that trains against the quantizers after it reads them) and `learned`,
    the one mutable part: matrices a step learned (`"R1"`, `"R2:<v module>"`) for a later step to fold."""

    calibration: tuple[dict, ...] = ()
    progress: bool = False
    steps: tuple = ()
    learned: dict = field(default_factory=dict)


@dataclass
class CapturedGraph:
    """A model, its fx graph, and the node -> parameter links between them.

    `gm` is the graph module from torch.export (aten ops, parameters lifted to placeholders).
    `params` maps each parameter placeholder name to the ParamRef it reads. `tied` lists groups
    of parameter names that are one tensor (tied embeddings), first name = the one export kept.
    """

    model: torch.nn.Module
    gm: torch.fx.GraphModule
    params: dict[str, ParamRef]
    tied: tuple[tuple[str, ...], ...] = ()
    example_inputs: tuple = ()
    capture_seconds: float = 0.0
    context: RunContext = field(default_factory=RunContext)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def node(self, name: str) -> torch.fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the captured graph")

    def param(self, ref: ParamRef) -> torch.Tensor:
        """The live tensor in the model that `ref` names (edits to it edit the model)."""
        return getattr(self.owner(ref), ref.name)

    def owner(self, ref: ParamRef) -> torch.nn.Module:
        """The module that holds the tensor `ref` names."""
        return self.model.get_submodule(ref.module) if ref.module else self.model

    def param_of(self, node: torch.fx.Node) -> ParamRef | None:
        """The ParamRef a placeholder node reads, or None when it is not a parameter/buffer."""
        return node.meta.get(META_PARAM)

    def module_of(self, node: torch.fx.Node) -> str:
        """Path of the innermost module that produced `node` ('' for the root)."""
        return node.meta.get(META_MODULE, "")
