"""Tiny random causal LMs of the supported families (Llama, Qwen2, Gemma2, Gemma3), built once per
session the way `tests/conftest.py` builds the tiny Llama: a few layers, random weights scaled up so
attention is peaked, the MiniLM tokenizer and a small chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import save_tiny_tokenizer

FAMILIES = ("llama", "qwen2", "gemma2", "gemma3")
# Larger than any test prompt: within it a sliding-window layer sees everything, as the cached modes
# require (they refuse prompts longer than the window).
SLIDING_WINDOW = 256


def build_tiny_lm(folder: Path, family: str, *, seed: int = 0, **overrides) -> Path:
    """Save a 2-layer model of `family` (6 query heads over 2 KV heads, head size 8) with the tokenizer.
    Gemma2 and Gemma3 get one sliding-window and one global layer (Gemma3's with different rotary
    bases); `overrides` go to the config."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=30522,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    gemma = dict(
        sliding_window=SLIDING_WINDOW,
        query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    if family == "llama":
        config, cls = tf.LlamaConfig(**{**common, **overrides}), tf.LlamaForCausalLM
    elif family == "qwen2":
        config, cls = tf.Qwen2Config(**{**common, **overrides}), tf.Qwen2ForCausalLM
    elif family == "gemma2":
        kwargs = {**common, **gemma, "attn_logit_softcapping": None, **overrides}
        config, cls = tf.Gemma2Config(**kwargs), tf.Gemma2ForCausalLM
    elif family == "gemma3":
        config, cls = tf.Gemma3TextConfig(**{**common, **gemma, **overrides}), tf.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    cls(config).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def generators(tmp_path_factory):
    """Family -> a `Generator` over its tiny model, each built on first use."""
    from kvrag.rag.generation.generator import Generator

    made: dict = {}

    def get(family: str):
        if family not in made:
            folder = build_tiny_lm(tmp_path_factory.mktemp(f"tiny-{family}"), family)
            made[family] = Generator(str(folder), models_dir=tmp_path_factory.mktemp("models"))
        return made[family]

    return get


@pytest.fixture(params=FAMILIES)
def family_generator(request, generators):
    """Each family's tiny generator in turn."""
    return generators(request.param)
