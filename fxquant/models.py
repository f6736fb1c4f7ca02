"""Model sources: tiny random models for tests and demos, and the default real model.

`tiny_model("llama")` builds a 2-layer random model of a known architecture from a config
(`AutoConfig.for_model`), so anyone can try fxquant without a download. Each tiny config keeps the
features that matter to analysis: GQA (4 query heads, 2 KV heads), fused projections (Phi-3, GPT-2),
`1 + w` norms (Gemma), q/k norms (Qwen3), LayerNorm with bias and learned positions (OPT, GPT-2).
"""
from __future__ import annotations

import torch

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "qwen2": dict(_COMMON),  # q/k/v biases
    "qwen3": dict(_COMMON, head_dim=16),  # q_norm / k_norm per head
    "mistral": dict(_COMMON),
    "gemma": dict(_COMMON, head_dim=16),  # (1 + w) RMSNorm, scaled embedding, tied lm_head
    "phi3": dict(_COMMON),  # fused qkv_proj and gate_up_proj
    "opt": dict(  # LayerNorm with bias, ReLU MLP, learned positions, tied lm_head
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, enable_bias=True,
    ),
    "gpt2": dict(  # Conv1D weights [in, out], fused c_attn, GELU(tanh), learned positions, tied
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=1, eos_token_id=2,
    ),
}


def tiny_config(arch: str, **overrides):
    """The transformers config of a tiny random `arch` model (see TINY_CONFIGS)."""
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        from fxquant.errors import ModelLoadError

        raise ModelLoadError(f"no tiny config for architecture {arch!r}; choose one of {sorted(TINY_CONFIGS)}")
    return AutoConfig.for_model(arch, **{**TINY_CONFIGS[arch], **overrides})


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, **overrides) -> torch.nn.Module:
    """A random, eval-mode tiny causal LM of `arch`, with non-trivial norm weights and biases.

    Norm weights and biases are randomised too (HF initialises them to 1 / 0), so tests of folds
    that touch them cannot pass by accident.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()
