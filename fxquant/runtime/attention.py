"""Transforms inside attention that no weight can absorb: R3 (Hadamard on q and k after RoPE) and
KV-cache fake-quant.

Entry points: `AttentionTransform` (what one attention module does), `install(model, module, t)`
and `ATTENTION_IMPLEMENTATION`. The one idea: transformers 5 dispatches every attention call
through `AttentionInterface`; `install` registers one implementation (explicitly, the first time a
pass or `fxquant.load` needs it; importing fxquant touches no global registry) that looks up the
calling module's `AttentionTransform`, applies it to the post-RoPE queries and keys, then runs SDPA.
So `generate()` and the KV cache work unchanged, and a re-capture shows the `fxquant.hadamard` nodes.

    (q H)(k H)^T = q H H^T k^T = q k^T      for an orthogonal H per head (R3 cancels in the scores)
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fxquant.runtime.library import fake_quant, hadamard

ATTENTION_IMPLEMENTATION = "fxquant_sdpa"
ATTR = "fxquant_attention"  # the attribute an attention module carries its AttentionTransform under
_SEEN = threading.local()  # module ids the implementation ran for, while a probe is recording


def quantize_kv(x: torch.Tensor, quant, t: "AttentionTransform", start: int = 0) -> torch.Tensor:
    """x [batch, heads, tokens, head_dim] through the KV quantizer `quant` (fxquant::fake_quant or its
    fast twin, one scale per row of the last dim) as `t` says: rows of `kv_group_size` channels, the
    first `kv_sink_tokens` positions left float; `start`: the cache row of x's first token.

        per (token, head, group):  quant over x.unflatten(-1, (d / g, g))  ==  fake_quantize with
                                   QuantFormat(group_size=g)  (numerics: scales per group of the last dim)
        sinks:  x_hat[..., :n, :] = x[..., :n, :]   (rows round alone, so the others are as without sinks)

    Read from the cache (start 0), the token axis holds every position the cache has seen; written
    into it (`apply_transform`), only the new rows from `start`. Each row quantizes alone, so both give
    row p of the sequence the same codes."""
    n = max(t.kv_sink_tokens - start, 0)
    if n >= x.shape[-2]:
        return x
    tail = x[..., n:, :] if n else x
    if t.kv_group_size is None:
        out = quant(tail, t.kv_bits, t.kv_symmetric, t.kv_clip_ratio)
    else:
        out = quant(tail.unflatten(-1, (-1, t.kv_group_size)), t.kv_bits, t.kv_symmetric, t.kv_clip_ratio)
        out = out.flatten(-2)
    return torch.cat((x[..., :n, :], out), dim=-2) if n else out


@dataclass(frozen=True)
class AttentionTransform:
    """R3: rotate queries and keys per head by a normalized Hadamard (fxquant::hadamard); KV cache:
    fake-quantize keys (after R3) and values per (token, head) or per (token, head, group of
    `kv_group_size` channels), `kv_bits` None = float, the first `kv_sink_tokens` positions float."""

    rotate_qk: bool = False
    kv_bits: int | None = None
    kv_symmetric: bool = False
    kv_clip_ratio: float = 1.0
    kv_group_size: int | None = None
    kv_sink_tokens: int = 0

    @property
    def acts_on_kv(self) -> bool:
        """Whether keys or values change: then the cache can hold them changed (`apply_transform`)."""
        return self.rotate_qk or self.kv_bits is not None

    def numerics(self) -> tuple:
        """The fields that decide what a cached row holds (equal for a transform and its fast twin)."""
        return dataclasses.astuple(self)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """R3 on q or k: the reference op (a lowered transform overrides it, and `write`)."""
        return hadamard(x)

    def write(self, key: torch.Tensor, value: torch.Tensor, start: int = 0) -> tuple:
        """(k, v) rows as the cache keeps them: k rotated (R3) then quantized, v quantized; `start`:
        the cache row of the first one (sinks stay float)."""
        if self.rotate_qk:
            key = self.rotate(key)
        if self.kv_bits is not None:  # [batch, heads, tokens, head_dim]
            key, value = quantize_kv(key, fake_quant, self, start), quantize_kv(value, fake_quant, self, start)
        return key, value

    def apply(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, written: bool = False) -> tuple:
        """(q, k, v) after R3 and the KV quantizer; `written`: k and v come from a cache that holds
        them transformed already (only q is rotated)."""
        if self.rotate_qk:
            query = self.rotate(query)
        return (query, key, value) if written else (query, *self.write(key, value))


def apply_transform(module: torch.nn.Module, query, key, value) -> tuple:
    """(q, k, v) after the module's AttentionTransform, if it has one (recorded for a probe).

    Where k and v are a DynamicLayer's own tensors, the cache keeps them transformed: this call's new
    rows are transformed in place in the cache and the older rows were in earlier calls, so a decode
    step rotates and quantizes one row per head, not the whole cache again. Each row transforms
    alone, so this is what transforming every row on every call gives."""
    transform = getattr(module, ATTR, None)
    start = None if transform is None else _cached_rows(module, transform, key, value)
    if transform is None:
        return query, key, value
    seen = getattr(_SEEN, "ids", None)
    if seen is not None:
        seen.add(id(module))
    if start is None:
        return transform.apply(query, key, value)
    new_key, new_value = transform.write(key[..., start:, :], value[..., start:, :], start)
    key[..., start:, :], value[..., start:, :] = new_key, new_value
    return transform.apply(query, key, value, written=True)


def fxquant_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA with the calling module's AttentionTransform applied to the post-RoPE q and k."""
    query, key, value = apply_transform(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class GraphAttention(torch.nn.Module):
    """One SDPA call as a module at its attention module's path, for a graph that inlined the
    attention (a raised dynamo graph): the module's AttentionTransform, then SDPA with the call's
    arguments. Keys and values may arrive repeated for GQA; per-(token, head) rows quantize and
    rotate the same either way."""

    def forward(self, query, key, value, *args, **kwargs):
        query, key, value = apply_transform(self, query, key, value)
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, *args, **kwargs)


_CALLS = threading.local()  # id(attention module) -> (cache, layer index, rows before this call)
CACHE_KWARGS = ("cache", "past_key_values")  # the cache's keyword: transformers >= 5.24, and before
TAG = "_fxquant_kv"  # a cache layer whose rows are transformed carries the transform's numerics() here


def _calls() -> dict:
    if not hasattr(_CALLS, "by_module"):
        _CALLS.by_module = {}
    return _CALLS.by_module


def _appending_layer(cache, index: int):
    """The cache layer `index` when it is transformers' DynamicLayer (it appends whole rows with
    torch.cat and returns its own tensors), "new" when it will be one, else None: sliding windows,
    static and quantized caches keep raw rows, and the transform runs on every row each call."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or getattr(cache, "offloading", False):
        return None
    if index < len(layers):
        return layers[index] if type(layers[index]) is DynamicLayer else None
    return "new" if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer else None


def write_kv_hook(module: torch.nn.Module, args, kwargs):
    """Forward pre-hook of an attention module: note its cache and how many rows the layer holds
    before this call, for `_cached_rows` to find once the module has updated the cache."""
    _calls().pop(id(module), None)
    transform = getattr(module, ATTR, None)
    cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    index = getattr(module, "layer_idx", None)
    if transform is None or cache is None or index is None or not transform.acts_on_kv:
        return None
    layer = _appending_layer(cache, index)
    if layer is None:
        return None
    if torch.compiler.is_compiling():
        if layer != "new" and getattr(layer, TAG, None) is not None:
            raise RuntimeError(f"fxquant: cache layer {index} holds keys and values the eager model rotated "
                               "and quantized; a compiled model reads raw rows. Start a new cache (or run "
                               "both steps eager, or both compiled).")
        return None
    _calls()[id(module)] = (cache, index, 0 if layer == "new" else layer.get_seq_length())
    return None


def _cached_rows(module: torch.nn.Module, transform, key, value) -> int | None:
    """Where this call's new rows start when `key` and `value` are the cache layer's own tensors and
    its older rows are transformed already (or there are none), else None: the cache holds something
    else (MLA caches latents), rows a model without the transform wrote raw, or rows autograd needs
    as they are (training with a cache: the cache stays raw)."""
    call = _calls().pop(id(module), None)
    if call is None:
        return None
    cache, index, start = call
    layer = cache.layers[index] if index < len(cache.layers) else None
    if layer is None or key is not getattr(layer, "keys", None) or value is not getattr(layer, "values", None):
        return None
    tag = getattr(layer, TAG, None)
    if key.requires_grad or value.requires_grad:  # autograd saves the rows an in-place write would change
        if tag is not None:
            raise RuntimeError(f"fxquant: cache layer {index} holds rotated and quantized rows, and this call "
                               "needs gradients through its keys and values; start a new cache.")
        return None
    if tag is None:
        if start:
            return None
        setattr(layer, TAG, transform.numerics())  # the caller transforms every row of it now
        return 0
    if tag != transform.numerics():
        raise ValueError(f"fxquant: cache layer {index} holds rows transformed as {tag}, but "
                         f"{type(module).__name__} transforms them as {transform.numerics()}; start a new cache.")
    return start


def register() -> None:
    """Make `ATTENTION_IMPLEMENTATION` known to transformers' AttentionInterface (idempotent)."""
    if ATTENTION_IMPLEMENTATION not in AttentionInterface():
        AttentionInterface.register(ATTENTION_IMPLEMENTATION, fxquant_sdpa)


def install(model: torch.nn.Module, module: torch.nn.Module, **fields) -> AttentionTransform:
    """Set `fields` of one attention module's transform and route the model's attention through fxquant."""
    register()
    transform = dataclasses.replace(getattr(module, ATTR, None) or AttentionTransform(), **fields)
    setattr(module, ATTR, transform)
    if write_kv_hook not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(write_kv_hook, with_kwargs=True)
    for config in {id(c): c for c in (getattr(model, "config", None), getattr(module, "config", None)) if c}.values():
        config._attn_implementation = ATTENTION_IMPLEMENTATION
    return transform


class record_calls:
    """Context manager: the ids of the attention modules whose transform actually ran."""

    def __enter__(self) -> set[int]:
        _SEEN.ids = set()
        return _SEEN.ids

    def __exit__(self, *exc) -> None:
        _SEEN.ids = None
