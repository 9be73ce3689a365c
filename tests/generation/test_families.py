"""The prefill modes on tiny random models of every supported family (Llama, Qwen2, Gemma2, Gemma3):
APE's exactness case, the full CacheBlend recompute, moving cached keys by rotation, and the APE
attention function being the one each family calls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvrag.errors import InvalidInputError
from kvrag.rag.generation.ape import ATTN_IMPLEMENTATION
from kvrag.rag.generation.cache import cache_kv, full_cache, positions
from kvrag.rag.generation.prefill import PrefillPolicy
from kvrag.rag.generation.rope import layer_inv_freq, shift_keys
from tests.generation.conftest import SLIDING_WINDOW, build_tiny_lm

PASSAGES = [
    ("cats", "the cat sat on the warm mat near the kitchen door"),
    ("dogs", "dogs bark loudly at night in the old city streets and parks"),
    ("birds", "small birds sing"),
]
QUESTION = "where did the cat sit?"


def _pieces(gen):
    return [gen.passage_ids(text, title) for title, text in PASSAGES], gen.question_ids(QUESTION)


def _err(a, b) -> float:
    return (a.logits - b.logits).abs().max().item()


def test_every_family_attends_through_the_registered_function(family_generator, monkeypatch):
    """The model runs the registered attention, and an APE prefill reaches the APE split once per
    layer (a family that bypassed the attention interface would never call it)."""
    import kvrag.rag.generation.ape as ape_mod

    gen = family_generator
    assert gen.model.config._attn_implementation == ATTN_IMPLEMENTATION
    calls = []
    real = ape_mod.ape_attention

    def spy(*a, **k):
        calls.append(k["c_end"] - k["c_start"])
        return real(*a, **k)

    monkeypatch.setattr(ape_mod, "ape_attention", spy)
    passages, q = _pieces(gen)
    gen.prefill("sequential", q, passages)
    assert calls == []  # sequential prefill is plain attention
    gen.prefill(PrefillPolicy("ape", 0.9, 0.9), q, gen.context(passages))
    assert calls == [sum(map(len, passages))] * gen.num_layers


def test_one_passage_ape_and_parallel_equal_sequential(family_generator):
    """APE with T = S = 1 over one passage is ordinary attention over [prefix, passage, question]."""
    gen = family_generator
    passages, q = _pieces(gen)
    seq = gen.prefill("sequential", q, passages[:1])
    context = gen.context(passages[:1])
    ape = gen.prefill(PrefillPolicy("ape", 1.0, 1.0), q, context)
    par = gen.prefill("parallel", q, context)
    assert seq.logits.abs().max() > 1.0  # the model is not flat: a wrong mask or position would show
    assert _err(seq, ape) <= 1e-4 and _err(seq, par) <= 1e-4
    assert ape.next_position == par.next_position == seq.next_position
    # so that the check can fail: T and S below 1 do change the logits
    assert _err(seq, gen.prefill(PrefillPolicy("ape", 0.9, 0.9), q, context)) > 1e-3


def test_blend_recomputing_everything_approaches_sequential(family_generator):
    """Blend with ratio 1 recomputes every later passage token over all that precedes it: a sequential
    prefill, up to float error, far closer than plain parallel encoding (shared or distinct)."""
    gen = family_generator
    passages, q = _pieces(gen)
    seq = gen.prefill("sequential", q, passages)
    context = gen.context(passages)
    full = gen.prefill(PrefillPolicy("blend", blend_ratio=1.0), q, context)
    none = gen.prefill(PrefillPolicy("blend", blend_ratio=0.0), q, context)
    parallel = gen.prefill("parallel", q, context)
    distinct = gen.prefill(PrefillPolicy("parallel", positions="distinct"), q, context)
    assert full.next_position == seq.next_position == distinct.next_position
    assert _err(seq, full) <= 1e-4
    assert _err(seq, parallel) > 1e-1 and _err(seq, distinct) > 1e-1
    assert _err(seq, full) < _err(seq, parallel) / 1000
    assert _err(none, distinct) <= 1e-5  # nothing recomputed: the distinct layout as it is
    # A partial recompute changes the logits, and leaves the caller's context untouched.
    part = gen.prefill(PrefillPolicy("blend", blend_ratio=0.3), q, context)
    assert _err(part, none) > 1e-5 and _err(part, full) > 1e-5
    assert torch.equal(context.kv.keys, gen.context(passages).kv.keys)


def _keys_at(gen, ids: list[int], start: int) -> torch.Tensor:
    """Every layer's cached keys (layers, kv_heads, tokens, head_dim) of `ids` placed at `start`."""
    cache = full_cache()
    with torch.inference_mode():
        gen.model.base_model(
            input_ids=torch.tensor([ids]),
            position_ids=positions(gen.model, start, len(ids)),
            past_key_values=cache,
        )
    return cache_kv(cache).keys


def test_shift_keys_equals_the_keys_computed_at_the_shifted_position(family_generator):
    """Attention under RoPE depends on relative positions only, so the same tokens placed `offset`
    later have the same hidden states and keys rotated by offset: what `shift_keys` computes."""
    gen = family_generator
    ids = gen.passage_ids(*reversed(PASSAGES[1]))
    offset = 41
    early, late = _keys_at(gen, ids, 3), _keys_at(gen, ids, 3 + offset)
    shifted = gen.shift_keys(early, offset)
    scale = late.abs().max().item()
    assert (shifted - late).abs().max().item() <= 1e-5 * max(scale, 1.0)
    assert (early - late).abs().max().item() > 1e-2 * scale  # the shift is not a no-op


def test_gemma3_layers_shift_with_their_own_rotary_base(generators):
    """Gemma3's sliding-window and global layers rotate with different bases; one base for all would
    move the global layer's keys wrongly."""
    gen = generators("gemma3")
    freqs = layer_inv_freq(gen.model)
    assert not torch.allclose(freqs[0], freqs[1])
    ids = gen.passage_ids(*reversed(PASSAGES[0]))
    early, late = _keys_at(gen, ids, 0), _keys_at(gen, ids, 29)
    one_base = shift_keys(early, 29, freqs[:1].expand_as(freqs))
    assert (one_base[1] - late[1]).abs().max().item() > 1e-2
    assert (shift_keys(early, 29, freqs) - late).abs().max().item() <= 1e-4


def test_llama3_rotary_scaling_shifts_like_the_default(tmp_path):
    """`llama3` scales its frequencies once, at load, so shifting by rotation stays exact."""
    from kvrag.rag.generation.generator import Generator

    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    folder = build_tiny_lm(tmp_path / "llama3", "llama", rope_parameters=rope)
    gen = Generator(str(folder), models_dir=tmp_path / "models")
    ids = gen.passage_ids(*reversed(PASSAGES[1]))
    early, late = _keys_at(gen, ids, 0), _keys_at(gen, ids, 100)
    assert (gen.shift_keys(early, 100) - late).abs().max().item() <= 1e-5 * max(late.abs().max().item(), 1.0)


def test_length_dependent_rotary_is_refused_for_distinct_positions(family_generator, monkeypatch):
    gen = family_generator
    passages, q = _pieces(gen)
    rotary = gen.model.base_model.rotary_emb
    kinds = rotary.rope_type
    monkeypatch.setattr(
        rotary, "rope_type", {k: "dynamic" for k in kinds} if isinstance(kinds, dict) else "dynamic"
    )
    context = gen.context(passages)
    with pytest.raises(InvalidInputError, match="dynamic"):
        gen.prefill(PrefillPolicy("parallel", positions="distinct"), q, context)
    with pytest.raises(InvalidInputError, match="dynamic"):
        gen.prefill(PrefillPolicy("blend", blend_ratio=0.5), q, context)
    gen.prefill("ape", q, context)  # shared positions never move keys


def test_cached_modes_refuse_prompts_longer_than_the_sliding_window(family_generator, monkeypatch):
    gen = family_generator
    passages, q = _pieces(gen)
    windowed = gen.model.config.model_type.startswith("gemma")
    assert gen.shape.sliding_window == (SLIDING_WINDOW if windowed else None)
    monkeypatch.setattr(gen, "shape", dataclasses.replace(gen.shape, sliding_window=16))
    with pytest.raises(InvalidInputError, match="sliding window"):
        gen.prefill("ape", q, gen.context(passages))
    gen.prefill("sequential", q, passages)  # the mask keeps the window there


def test_attention_soft_capping_is_refused_at_load(tmp_path):
    from kvrag.rag.generation.generator import Generator

    folder = build_tiny_lm(tmp_path / "capped", "gemma2", attn_logit_softcapping=50.0)
    with pytest.raises(InvalidInputError, match="soft-caps"):
        Generator(str(folder), models_dir=tmp_path / "models")
