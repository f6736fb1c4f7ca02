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
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fxquant.runtime.library import fake_quant, hadamard

ATTENTION_IMPLEMENTATION = "fxquant_sdpa"
ATTR = "fxquant_attention"  # the attribute an attention module carries its AttentionTransform under
_SEEN = threading.local()  # module ids the implementation ran for, while a probe is recording


def quantize_kv(x: torch.Tensor, quant, t: "AttentionTransform") -> torch.Tensor:
    """x [batch, heads, tokens, head_dim] through the KV quantizer `quant` (fxquant::fake_quant or its
    fast twin, one scale per row of the last dim) as `t` says: rows of `kv_group_size` channels, the
    first `kv_sink_tokens` positions left float.

        per (token, head, group):  quant over x.unflatten(-1, (d / g, g))  ==  fake_quantize with
                                   QuantFormat(group_size=g)  (numerics: scales per group of the last dim)
        sinks:  x_hat[..., :n, :] = x[..., :n, :]   (rows round alone, so the others are as without sinks)

    The token axis holds every position the cache has seen (transformers passes the updated cache),
    so position p of the sequence is row p in prefill and in every decode step alike."""
    n = t.kv_sink_tokens
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

    def apply(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple:
        """(q, k, v) after R3 and the KV quantizer: the reference ops (a lowered transform overrides)."""
        if self.rotate_qk:
            query, key = hadamard(query), hadamard(key)
        if self.kv_bits is not None:  # [batch, heads, tokens, head_dim]
            key, value = quantize_kv(key, fake_quant, self), quantize_kv(value, fake_quant, self)
        return query, key, value


def apply_transform(module: torch.nn.Module, query, key, value) -> tuple:
    """(q, k, v) after the module's AttentionTransform, if it has one (recorded for a probe)."""
    transform = getattr(module, ATTR, None)
    if transform is None:
        return query, key, value
    seen = getattr(_SEEN, "ids", None)
    if seen is not None:
        seen.add(id(module))
    return transform.apply(query, key, value)


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


def register() -> None:
    """Make `ATTENTION_IMPLEMENTATION` known to transformers' AttentionInterface (idempotent)."""
    if ATTENTION_IMPLEMENTATION not in AttentionInterface():
        AttentionInterface.register(ATTENTION_IMPLEMENTATION, fxquant_sdpa)


def install(model: torch.nn.Module, module: torch.nn.Module, **fields) -> AttentionTransform:
    """Set `fields` of one attention module's transform and route the model's attention through fxquant."""
    register()
    transform = dataclasses.replace(getattr(module, ATTR, None) or AttentionTransform(), **fields)
    setattr(module, ATTR, transform)
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
