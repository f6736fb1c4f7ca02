"""Calibration: run token windows through a model block by block, and observe what layers see.

Entry points: `sweep(cg, groups)` (what calibrated passes iterate: each block with the groups of
linears inside it, over the run's calibration data `cg.context.calibration`), `require_calibration`
(their `check`), and below them `decoder_blocks(model, paths)`, `block_sweep(model, batches, blocks)`
and `observe(block, ...)` (per-channel `ChannelStats`, inputs, recorded calls). The one idea: a decoder is a list of blocks that each map the
hidden state to the next, so calibration holds one block's inputs at a time: the hidden states
entering block 0 and every block's keyword arguments (masks, rotary tables) are recorded in one
cheap forward in which each block is the identity, then each block runs on its inputs, lets the
caller observe and edit it, and runs again to make the next block's inputs. A pass that edits a
block (an equalization scale, a clipped weight) is seen by every later block, as at inference.
A model with no list of blocks is one block: the whole model, on the batches as given.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fxquant.errors import CalibrationError


@dataclass
class Call:
    """One forward call of a module: its positional and keyword arguments, and which token positions
    are real (`mask` [batch, seq], from the batch's attention mask; None: all of them)."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    mask: torch.Tensor | None = None

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [batch, seq, ...] without its padded positions ([tokens, ...]); as it is when unmasked."""
        if self.mask is None or tuple(x.shape[:2]) != tuple(self.mask.shape):
            return x
        return x[self.mask]

    def tokens(self, x: torch.Tensor) -> int:
        """How many real token positions `x` [batch, seq, ..., channels] holds."""
        return self.kept(x).numel() // x.shape[-1]

    def run(self, module: torch.nn.Module):
        return module(*self.args, **self.kwargs)


@dataclass
class Block:
    """A block of the sweep: its path ("" for a whole model without blocks), module and calls."""

    path: str
    module: torch.nn.Module
    calls: list[Call]
    outputs: list | None = None  # set by observe(keep_outputs=True): the next block's inputs, no re-run


def decoder_blocks(model: torch.nn.Module, paths) -> list[str]:
    """The blocks (`model.layers.3`) that contain `paths`, in order: children of one ModuleList.

    Returns [] when the paths lie in no ModuleList (the model is then swept as one block).
    """
    found: dict[str, set[int]] = {}
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts)):
            if parts[k].isdigit() and isinstance(model.get_submodule(".".join(parts[:k])), torch.nn.ModuleList):
                found.setdefault(".".join(parts[:k]), set()).add(int(parts[k]))
                break
    if not found:
        return []
    owner = max(found, key=lambda p: len(found[p]))  # the decoder's own list, not an expert list
    size = len(model.get_submodule(owner))
    return [f"{owner}.{i}" for i in range(size)]


def block_of(path: str, blocks: list[str]) -> str:
    """The block that contains module `path` ("" when it is in none)."""
    return next((b for b in blocks if path == b or path.startswith(b + ".")), "")


class _Stop(Exception):
    """Raised by the last identity block: nothing after it is needed."""


def model_kwargs(model) -> dict:
    """The keyword arguments a calibration or training forward adds: no KV cache where the model takes one."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def block_sweep(model: torch.nn.Module, batches: list[dict], blocks: list[str],
                progress: bool = False) -> Iterator[Block]:
    """Yield each block with its calls on the calibration batches; after the caller resumes the
    generator, run the (possibly edited) block to make the next block's inputs.

    With no blocks, yield the whole model once, called on each batch.
    """
    extra, masks = model_kwargs(model), [_token_mask(b) for b in batches]
    if not blocks:
        yield Block("", model, [Call((), {**b, **extra}, m) for b, m in zip(batches, masks)])
        return
    calls = _block_inputs(model, batches, blocks, extra)
    bar = tqdm(blocks, desc="calibration", unit="block", disable=not progress, leave=False)
    for index, path in enumerate(bar):
        module = model.get_submodule(path)
        here = [Call((hidden, *args), kwargs, mask)
                for hidden, (args, kwargs), mask in zip(calls[0], calls[1][index], masks)]
        block = Block(path, module, here)
        yield block
        outputs = block.outputs if block.outputs is not None else [call.run(module) for call in here]
        calls = ([_hidden(out, path) for out in outputs], calls[1])
    bar.close()


def _token_mask(batch: dict) -> torch.Tensor | None:
    """The real (not padded) token positions of a batch [batch, seq], or None when all are real."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return None
    return mask.bool()


def _block_inputs(model, batches, blocks, extra):
    """The hidden states entering blocks[0] per batch, and every block's other arguments per batch."""
    modules = [model.get_submodule(p) for p in blocks]
    hidden, rest = [], [[] for _ in modules]

    def identity(index):
        def forward(*args, **kw):
            if args:
                state, others = args[0], (args[1:], kw)
            else:
                state, others = kw.get("hidden_states"), ((), {k: v for k, v in kw.items() if k != "hidden_states"})
            if not isinstance(state, torch.Tensor):
                raise CalibrationError(
                    f"block '{blocks[index]}' is not called with the hidden state first (or as hidden_states=), "
                    "so fxquant cannot run it alone for calibration")
            if index == 0:
                hidden.append(state)
            rest[index].append(others)
            if index == len(modules) - 1:
                raise _Stop
            return state
        return forward

    # an instance attribute shadows the class's forward; one already there (accelerate's offload
    # wrapper) is put back afterwards
    previous = [module.__dict__.get("forward") for module in modules]
    for index, module in enumerate(modules):
        module.forward = identity(index)
    try:
        for batch in batches:
            try:
                model(**batch, **extra)
            except _Stop:
                pass
    finally:
        for module, before in zip(modules, previous):
            if before is None:
                del module.forward
            else:
                module.forward = before
    if len(hidden) != len(batches) or any(len(r) != len(batches) for r in rest):
        raise CalibrationError(f"the blocks under '{blocks[0].rpartition('.')[0]}' were not each called once per "
                               "calibration batch, so they cannot be calibrated one at a time")
    return hidden, rest


def _hidden(out, path: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise CalibrationError(f"block '{path}' returned {type(out).__name__}, not the next hidden state")


@dataclass
class ChannelStats:
    """Per-channel statistics of a layer input, accumulated over every token: mean |x| and max |x|."""

    abs_sum: torch.Tensor
    abs_max: torch.Tensor
    count: int = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).abs().float()
        self.abs_sum += x.sum(0)
        self.abs_max = torch.maximum(self.abs_max, x.amax(0))
        self.count += x.shape[0]


def _hooks(model, paths, fn):
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(lambda m, args, kwargs, out, p=path: fn(p, args, kwargs, out),
                                                    with_kwargs=True))
    return handles


@torch.no_grad()
def observe(block: Block, stats_of=(), inputs_of=(), calls_of=(), keep_outputs: bool = False, each_input=None):
    """Run `block` on its calls once and observe modules by path: per-channel stats (`stats_of`:
    (path, "in") for a module's first input, (path, "out") for its output), first inputs
    themselves (`inputs_of`, a list per path) and whole calls with outputs (`calls_of`, a list of
    (Call, output) per path; a dict {path: tokens} keeps only the first calls holding that many
    tokens, so what a search holds is bounded by its budget, not by the data). `each_input` maps a path to a function called with each first input
    (a running statistic that must not hold every input, GPTQ's Hessian). `keep_outputs`: the
    caller's edits will not change what the block computes (an exact fold), so these outputs become
    the next block's inputs without a re-run."""
    stats, inputs, calls = {}, {p: [] for p in inputs_of}, {p: [] for p in calls_of}
    stats_of, each_input = set(stats_of), dict(each_input or {})
    budget = dict(calls_of) if isinstance(calls_of, dict) else {}
    held = dict.fromkeys(calls, 0)

    def seen(path, args, kwargs, out):  # padded positions are never counted (running.kept)
        x = args[0] if args else next(iter(kwargs.values()))
        for key, t in (((path, "in"), x), ((path, "out"), out)):
            if key in stats_of:
                if key not in stats:
                    stats[key] = ChannelStats(torch.zeros(t.shape[-1]), torch.zeros(t.shape[-1]))
                stats[key].add(running.kept(t))
        if path in inputs:
            inputs[path].append(running.kept(x.detach()))
        if path in each_input:
            each_input[path](running.kept(x.detach()))
        if path in calls and (budget.get(path) is None or held[path] < budget[path]):
            calls[path].append((Call(args, kwargs, running.mask), out))
            held[path] += running.tokens(x)

    paths = {p for p, _ in stats_of} | set(inputs_of) | set(calls_of) | set(each_input)
    handles = _hooks(block.module, _relative(block.path, paths), lambda p, *a: seen(_absolute(block.path, p), *a))
    running = Call(())  # the call now running: its mask applies to what the hooks see
    try:
        outputs = []
        for call in block.calls:
            running = call
            outputs.append(call.run(block.module))
    finally:
        for h in handles:
            h.remove()
    if keep_outputs:
        block.outputs = outputs
    return stats, inputs, calls


def _relative(root: str, paths) -> list[str]:
    return sorted(p[len(root) + 1:] if root and p != root else ("" if p == root else p) for p in paths)


def _absolute(root: str, rel: str) -> str:
    return rel if not root else (root if rel == "" else f"{root}.{rel}")


def require_calibration(cg, structure, cfg) -> None:
    """The `check` of a calibrated pass: refuse before any pass runs when there is no data."""
    if not cg.context.calibration:
        raise CalibrationError(
            "this pass measures activations and needs calibration data: fxquant.quantize(model, recipe, "
            "calibration=token_ids) with a LongTensor [n, seq] (e.g. fxquant.eval.calibration_windows), "
            "or on the command line any model with a tokenizer (the default text's first windows are used)")


class SiteGroup:
    """One linear as a group of one reader: what `sweep` takes for per-linear passes."""

    def __init__(self, site):
        self.readers = (site,)


def sweep(cg, groups: list) -> Iterator[tuple[Block, list]]:
    """Yield (block, its groups) over the run's calibration data, block by block; groups outside
    every block come last, with the whole model as their block. A group is anything whose
    `readers[0].module` names the module it sits in (a ScaleGroup, a SiteGroup)."""
    blocks = decoder_blocks(cg.model, [g.readers[0].module for g in groups])
    by_block: dict[str, list] = {}
    for g in groups:
        by_block.setdefault(block_of(g.readers[0].module, blocks), []).append(g)
    batches = list(cg.context.calibration)
    for block in block_sweep(cg.model, batches, blocks, progress=cg.context.progress):
        if by_block.get(block.path):
            yield block, by_block[block.path]
    if blocks and by_block.get(""):
        for block in block_sweep(cg.model, batches, [], progress=False):
            yield block, by_block[""]
