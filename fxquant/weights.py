"""The only code that edits a model's parameters: rotations, scales, centring, untying, replacement.

Entry points: `rotate_in`, `rotate_out`, `scale_in`, `scale_out`, `shift_in`, `center_out`, `untie`, `assign`,
`assign_quantized`, `add_bias`, `add_parameter`, `set_storage` (a search's trial weights), `replace_module`,
and for training a rotation through the model `rotated` (the same math, differentiable) and `substituted`.
The one idea: every linear weight is handled in one canonical layout, `[..., out, in]` (y = x W^T),
whatever its storage (Conv1D and some MoE experts store `[in, out]`: `transposed=True`; an
embedding table `[vocab, hidden]` is a transposed linear from one-hot ids). The math runs under
no_grad in `precision` (float64 by default) and is written back in the parameter's own dtype, in
place (same Parameter objects), so every module, hook and tie that holds the tensor sees the new values.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

DEFAULT_PRECISION = torch.float64
Span = tuple[int, int] | None  # a [start, end) slice of the rows (outputs) or columns (inputs)


def canonical(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A view of `weight` as [..., out, in] (its own inverse: a canonical tensor back to storage)."""
    return weight.transpose(-1, -2) if transposed else weight



def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    """Store `value` in `target`, cast to its dtype.

    A whole tensor (not a view) gets new storage through `.data`, as `Module._apply` does: every
    module, tie and optimizer still holds the same Parameter object, and a checkpoint memory-mapped
    by `from_pretrained` pays no copy-on-write page faults (0.7 s on SmolLM2). A view (a head's
    rows, a transposed layout) is written in place.
    """
    if target._base is None and target.shape == value.shape :
        target.data = value.to(target.dtype).contiguous()
    else:
        target.copy_(value.to(target.dtype))


def _write_canonical(weight: torch.Tensor, transposed: bool, part: torch.Tensor, value: torch.Tensor) -> None:
    """Store a new canonical-layout `value` for `part` of `weight`: the whole weight when part is all of it."""
    if part.shape == canonical(weight, transposed).shape:
        _write(weight, value.transpose(-1, -2) if transposed else value)
    else:
        _write(part, value)


def _right(x: torch.Tensor, q) -> torch.Tensor:
    """x @ Q, where q is the matrix or an operator computing x @ Q (a fast Hadamard transform)."""
    return q(x) if callable(q) else x @ q.to(x.dtype)


@torch.no_grad()
def rotate_in(weight, q, *, transposed=False, cols: Span = None, precision=DEFAULT_PRECISION) -> None:
    """The layer's input is rotated (x' = x Q), so undo it in the weight: W' = W Q  =>  x' W'^T = x W^T.

    `q` is Q or an operator x -> x @ Q. `cols` restricts Q to one span of input columns (one
    attention head of o_proj).
    """
    w = canonical(weight, transposed)
    part = w if cols is None else w[..., :, cols[0]:cols[1]]
    _write_canonical(weight, transposed, part, _right(part.to(precision), q))


@torch.no_grad()
def rotate_out(weight, bias, q, *, transposed=False, rows: Span = None, precision=DEFAULT_PRECISION) -> None:
    """Rotate the layer's output (y' = y Q): W' = Q^T W and b' = b Q  =>  x W'^T + b' = (x W^T + b) Q.

    `rows` restricts Q to one span of output rows (one value head of a fused qkv projection).
    """
    w = canonical(weight, transposed)
    part = w if rows is None else w[..., rows[0]:rows[1], :]
    value = _right(part.to(precision).transpose(-1, -2), q).transpose(-1, -2)  # Q^T W = (W^T Q)^T
    _write_canonical(weight, transposed, part, value)
    if bias is not None:
        b = bias if rows is None else bias[..., rows[0]:rows[1]]
        _write(b, _right(b.to(precision), q))


def rotated(weight, bias=None, *, q_in=None, q_out=None, transposed=False):
    """(W', b') = (Q_out^T W Q_in, b Q_out) as new tensors, differentiable in the Qs (dense matrices):
    the values rotate_in / rotate_out store, computed through autograd to train the rotations."""
    w = canonical(weight, transposed)
    if q_in is not None:
        w = w @ q_in.to(w.dtype)  # rotate_in: W' = W Q
    if q_out is not None:
        w = q_out.to(w.dtype).T @ w  # rotate_out: W' = Q^T W
    if bias is not None and q_out is not None:
        bias = bias @ q_out.to(bias.dtype)  # b' = b Q
    return canonical(w, transposed), bias


@contextmanager
def substituted(model: torch.nn.Module, values: dict[str, torch.Tensor]):
    """Run `model` with the parameters named in `values` (fqn -> tensor, e.g. a weight computed from
    a rotation being trained) replaced by those tensors, under every name they are tied to; the
    Parameter objects come back, in their order, on exit. A backward pass inside the block (a
    recomputed checkpoint) sees the same tensors."""
    wanted = {id(model.get_parameter(fqn)): value for fqn, value in values.items()}
    swaps = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in wanted:
            path, _, attr = name.rpartition(".")
            swaps.append((model.get_submodule(path), attr, wanted[id(p)]))
    saved = {id(m): (m, dict(m._parameters)) for m, _, _ in swaps}
    try:
        for module, attr, value in swaps:
            del module._parameters[attr]
            object.__setattr__(module, attr, value)
        yield
    finally:
        for module, original in saved.values():
            for attr in original:
                module.__dict__.pop(attr, None)
            module._parameters.clear()
            module._parameters.update(original)


@torch.no_grad()
def scale_in(weight, scale, *, transposed=False, precision=DEFAULT_PRECISION) -> None:
    """The layer's input was multiplied by `scale` per channel, now it is not: W' = W diag(s)."""
    w = canonical(weight, transposed)
    _write(w, w.to(precision) * scale.to(precision))


@torch.no_grad()
def scale_out(weight, bias, scale, *, transposed=False, rows: Span = None, precision=DEFAULT_PRECISION) -> None:
    """Multiply the layer's output channels by `scale` (y' = y diag(s)): W' = diag(s) W, b' = b s.

    `rows` restricts it to one span of output rows (the v rows of a fused qkv projection).
    """
    w = canonical(weight, transposed)
    part = w if rows is None else w[..., rows[0]:rows[1], :]
    _write_canonical(weight, transposed, part, part.to(precision) * scale.to(precision)[:, None])
    if bias is not None:
        b = bias if rows is None else bias[..., rows[0]:rows[1]]
        _write(b, b.to(precision) * scale.to(precision))


@torch.no_grad()
def shift_in(weight, bias, shift, *, transposed=False, precision=DEFAULT_PRECISION) -> None:
    """The layer's input lost a constant `shift` (x = x' + c): b' = b + W c  =>  x' W^T + b' = x W^T + b."""
    w = canonical(weight, transposed)
    _write(bias, bias.to(precision) + w.to(precision) @ shift.to(precision))


@torch.no_grad()
def center_out(weight, bias, *, transposed=False, precision=DEFAULT_PRECISION) -> None:
    """Remove the mean over output channels: W' = C W, b' = C b with C = I - 11^T/n.

    Exact for a model whose every reader of these outputs subtracts the mean itself (LayerNorm).
    """
    w = canonical(weight, transposed)
    wd = w.to(precision)
    _write(w, wd - wd.mean(dim=-2, keepdim=True))
    if bias is not None:
        bd = bias.to(precision)
        _write(bias, bd - bd.mean(dim=-1, keepdim=True))


@torch.no_grad()
def normalize_rows(table, affine: tuple, *, kind: str, eps: float, offset: float = 0.0,
                   precision=DEFAULT_PRECISION) -> None:
    """table[i] <- norm(table[i]): an embedding's own norm folded into its table (norm(E[ids]) ==
    norm(E)[ids]); `kind` "layer" subtracts the row mean first, then rows * rsqrt(mean(x^2) + eps) *
    (offset + weight) + bias with `affine` = (weight, bias) (either None), in `precision`."""
    weight, bias = affine
    x = table.detach().to(precision)
    if kind == "layer":
        x = x - x.mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        x = x * (weight.detach().to(precision) + offset)
    if bias is not None:
        x = x + bias.detach().to(precision)
    _write(table, x)


@torch.no_grad()
def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite a parameter's values in place (fake-quantized weights, folded norm weights)."""
    _write(target, value)


@torch.no_grad()
def assign_quantized(module: torch.nn.Module, name: str, qw, transposed: bool) -> None:
    """Give `module.name` the values of `qw` (a canonical-layout QuantizedWeight), in the parameter's
    storage layout and dtype (fxquant.quant.records keeps the record of its codes)."""
    weight = getattr(module, name)
    _write(weight, canonical(qw.values(weight.dtype), transposed))


def shared_names(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it is reachable under; more than one name is a tie (the one rule
    capture, norm folding and equalization use to find tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def untie(module: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """Give `module.name` its own copy of a tensor it shares with another module (tied embeddings)."""
    shared = getattr(module, name)
    own = torch.nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    setattr(module, name, own)
    return own


def untie_shared(model: torch.nn.Module, path: str, name: str) -> bool:
    """Untie `path.name` from the modules it shares its tensor with (lm_head and the embedding), and
    mark the model's config untied so save / load keep the two apart; False when it shared nothing."""
    module = model.get_submodule(path)
    if len(shared_names(model).get(id(getattr(module, name)), ())) < 2:
        return False
    untie(module, name)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return True


@torch.no_grad()
def add_bias(module: torch.nn.Module, out_features: int, like: torch.Tensor) -> torch.nn.Parameter:
    """Give a bias-free linear a zero bias (a folded LayerNorm bias needs somewhere to go)."""
    bias = torch.nn.Parameter(torch.zeros(out_features, dtype=like.dtype, device=like.device))
    module.bias = bias
    return bias


@torch.no_grad()
def add_parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> torch.nn.Parameter:
    """Give `module` a new frozen parameter `name` holding a copy of `value` (an explicit input scale)."""
    param = torch.nn.Parameter(value.detach().clone(), requires_grad=False)
    module.register_parameter(name, param)
    return param


def set_storage(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Point a whole parameter at `value` (a search trying candidate weights) and return its previous
    storage, which a second call puts back; no copy either way."""
    previous = target.data
    target.data = value
    return previous


def replace_module(model: torch.nn.Module, path: str, new: torch.nn.Module) -> torch.nn.Module:
    """Swap the submodule at `path` for `new` (a LayerNorm that became an RMSNorm); returns the old one."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
