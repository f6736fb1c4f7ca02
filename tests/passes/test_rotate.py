"""R1 + R2 with norm fusion: the float model computes the same function, on every architecture.

Invariance: logits within 2e-4 * max|logit| and greedy generate() (KV cache) gives the same tokens.
Non-vacuity: every weight the structure names did change, and the rotation is not the identity.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, SANDWICH, captured
from fxquant import quantize
from fxquant.analysis import analyse
from fxquant.capture import capture
from fxquant.config import ROTATION_KINDS
from fxquant.models import tiny_model

REL_TOL = 2e-4


def _ids(seed=0, batch=2, seq=12):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _greedy(model, ids):
    return model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _structure_weights(arch):
    """Every weight the structure says R1 or R2 must edit: sources, writers, readers, v and o."""
    s = captured(arch)[1]
    refs = [src.weight for src in s.stream.sources] + [w.weight for w in s.stream.writers]
    refs += [r.weight for g in s.stream.groups for r in g.readers]
    refs += [m for c in s.vo_chains for m in (c.v.weight, c.o.weight)]
    return {r.fqn for r in refs}


@pytest.mark.parametrize("kind", ROTATION_KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_rotations_keep_the_function_and_change_the_weights(arch, kind):
    model, ids = tiny_model(arch), _ids()
    ref_logits, ref_tokens, before = _logits(model, ids), _greedy(model, ids[:1]), _params(model)
    assert quantize(model, {"preset": "rotate-r1r2", "rotation": kind, "seed": 1}) is model
    err = (_logits(model, ids) - ref_logits).abs().max().item()
    assert err <= REL_TOL * ref_logits.abs().max().item(), f"{arch}/{kind}: max |diff| {err:.3g}"
    assert torch.equal(_greedy(model, ids[:1]), ref_tokens)
    after = dict(model.named_parameters(remove_duplicate=False))
    unchanged = sorted(n for n in _structure_weights(arch) if n in after and torch.equal(after[n], before[n]))
    assert unchanged == (_embeddings_and_writers(arch) if arch in SANDWICH else [])  # R1 online: stream as it was


def _embeddings_and_writers(arch):
    s = captured(arch)[1]
    return sorted({r.weight.fqn for r in (*s.stream.sources, *s.stream.writers)})


def test_rotated_stream_has_no_outlier_channel_left():
    """Non-vacuity of R1 itself: a planted outlier channel of the embedding is spread by the rotation."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 40.0
    quantize(model, "rotate-r1r2")
    table = model.model.embed_tokens.weight.detach()
    per_channel = table.abs().amax(dim=0)
    assert per_channel.max() / per_channel.median() < 4.0


def test_tied_embeddings_are_untied_when_the_final_norm_is_folded(tmp_path):
    from transformers import AutoModelForCausalLM

    model, ids = tiny_model("llama", tie_word_embeddings=True), _ids()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = _logits(model, ids)
    quantize(model, "rotate-r1r2")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert (_logits(reloaded, ids) - ref).abs().max() <= REL_TOL * ref.abs().max()


def test_rotation_alone_keeps_the_tie_and_rotates_the_shared_tensor_once():
    from fxquant.pipeline import Pipeline, Step
    from fxquant.passes.rotate_residual import rotate_residual

    model, ids = tiny_model("llama", tie_word_embeddings=True), _ids()
    with torch.no_grad():  # weightless norms: R1 needs no fold, so the tie can stay
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    ref = _logits(model, ids)
    result = Pipeline([Step(rotate_residual)]).run(capture(model), facts={"norms_folded", "weights_float"})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(c.kind == "shared" for c in result.results["rotate_residual"].changes) == 1
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=REL_TOL * ref.abs().max().item())


def test_layernorm_models_become_rmsnorm_on_a_mean_free_stream():
    model = tiny_model("opt")
    quantize(model, "rotate-r1r2")
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert norms and all(isinstance(m, torch.nn.RMSNorm) and m.weight is None for m in norms)
    s = analyse(capture(model))
    assert {g.norm.kind for g in s.stream.groups} == {"rms"} and s.blocked == ()


def test_exact_change_counts_on_tiny_llama():
    from fxquant import apply_recipe

    result = apply_recipe(tiny_model("llama"), "rotate-r1r2")
    counts = {name: r.summary() for name, r in result.results.items()}
    # 2 layers: 5 norms (2 per layer + final); readers q,k,v,gate,up per layer + lm_head = 11
    assert counts["fold_norms"] == "11 scaled, 5 folded, 0 blocked"
    assert counts["layernorms_to_rms"] == "no changes, 0 blocked"
    # 1 embedding + 4 writers (o, down per layer) + 11 readers
    assert counts["rotate_residual"] == "16 rotated, 0 blocked"
    assert counts["rotate_vo"] == "2 rotated, 0 blocked"


def test_r2_rotates_each_value_head_and_every_query_head_that_reads_it():
    """GQA: kv head k's rows of v and the o columns of its query heads change together, nothing else."""
    from fxquant.pipeline import Pipeline, Step
    from fxquant.passes.rotate_vo import rotate_vo

    model, ids = tiny_model("llama"), _ids()
    ref, v0 = _logits(model, ids), model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    Pipeline([Step(rotate_vo)]).run(capture(model), facts={"weights_float"})
    v1 = model.model.layers[0].self_attn.v_proj.weight.detach()
    rows_changed = (v1 != v0).any(dim=1)
    assert rows_changed.all()  # 2 kv heads x 16 rows, all rotated
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=REL_TOL * ref.abs().max().item())


def test_layernorms_to_rms_refuses_an_unfolded_or_uncentred_model():
    from fxquant.errors import UnsupportedPatternError
    from fxquant.passes.fold_norms import layernorms_to_rms
    from fxquant.pipeline import Pipeline, Step

    model = tiny_model("opt")
    with pytest.raises(UnsupportedPatternError, match="'model.decoder.embed_tokens' writes to the residual stream "
                                                      "values that are not mean-free"):
        Pipeline([Step(layernorms_to_rms)]).run(capture(model), facts={"norms_folded", "weights_float"})
    assert isinstance(model.model.decoder.final_layer_norm, torch.nn.LayerNorm)


def test_r1_refuses_a_norm_that_still_has_its_weight():
    from fxquant.errors import UnsupportedPatternError
    from fxquant.passes.rotate_residual import rotate_residual
    from fxquant.pipeline import Pipeline, Step

    model = tiny_model("llama")
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(UnsupportedPatternError, match="norm 'model.layers.0.input_layernorm' still has a weight"):
        Pipeline([Step(rotate_residual)]).run(capture(model), facts={"norms_folded", "weights_float"})
    assert torch.equal(model.model.embed_tokens.weight, before)


@pytest.mark.slow
def test_smollm2_rotated_keeps_logits_and_greedy_tokens():
    """The real model (opt in: -m slow): tied embeddings, GQA 9/3, hidden 576 = 36 * 16."""
    from fxquant.models import load_model

    model, tokenizer = load_model("smollm2")
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    ref, tokens = _logits(model, ids), model.generate(ids, max_new_tokens=8, do_sample=False)
    quantize(model, "rotate-r1r2")
    assert (_logits(model, ids) - ref).abs().max() <= REL_TOL * ref.abs().max()
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
