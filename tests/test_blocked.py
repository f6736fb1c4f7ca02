"""What analysis cannot prove is reported as Blocked with the module and the reason, never dropped."""
from __future__ import annotations

import pytest
import torch

from fxquant.analysis import analyse
from fxquant.capture import capture
from fxquant.models import tiny_model


class _RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _ToyDecoder(torch.nn.Module):
    """emb -> [x + W(norm(x))] -> (optional barrier) -> norm -> head: a two-module decoder."""

    def __init__(self, barrier=None):
        super().__init__()
        self.emb, self.norm1, self.proj = torch.nn.Embedding(32, 16), _RMSNorm(16), torch.nn.Linear(16, 16)
        self.norm2, self.head, self.barrier = _RMSNorm(16), torch.nn.Linear(16, 32), barrier

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.proj(self.norm1(x))
        if self.barrier is not None:
            x = self.barrier(x)
        return self.head(self.norm2(x))


def _analyse(model):
    return analyse(capture(model, (torch.randint(0, 32, (1, 6)),)))


def test_toy_decoder_structure():
    s = _analyse(_ToyDecoder())
    assert [(g.norm.module, [r.module for r in g.readers]) for g in s.stream.groups] == [("norm1", ["proj"]), ("norm2", ["head"])]
    assert [w.module for w in s.stream.writers] == ["proj"] and s.blocked == ()


class _Cumsum(torch.nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1)


def test_unknown_op_on_the_stream_is_blocked_with_its_module():
    s = _analyse(_ToyDecoder(barrier=_Cumsum()))
    assert [b.module for b in s.blocked] == ["barrier", "head"]
    assert "cumsum" in s.blocked[0].reason and "residual stream" in s.blocked[0].reason
    # past the barrier nothing is proven: the head's input space is reported, not guessed
    assert "neither a reader of the residual stream" in s.blocked[1].reason
    assert [g.norm.module for g in s.stream.groups] == ["norm1"]


@pytest.mark.parametrize("arch,extra", [("olmo2", {}), ("gemma2", {"head_dim": 16})])
def test_post_norm_blocks_name_the_norm(arch, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    s = analyse(capture(AutoModelForCausalLM.from_config(cfg).eval()))
    post = [b for b in s.blocked if "post-norm" in b.reason]
    assert {b.module for b in post} == {"model.layers.0.post_attention_layernorm", "model.layers.0.post_feedforward_layernorm"}
    assert s.stream.writers == ()  # nothing unproven is presented as a writer


def test_opt_post_norm_variant_is_blocked_not_misread():
    s = analyse(capture(tiny_model("opt", do_layer_norm_before=False)))
    assert s.blocked, "a post-LayerNorm OPT must not yield a clean structure"
    first = s.blocked[0]
    assert first.node == "add_5" and "norm 'model.decoder.layers.0.self_attn_layer_norm'" in first.reason
