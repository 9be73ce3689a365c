"""Moving cached keys to other positions. RoPE rotates each pair of key dimensions by position x
frequency, so a key cached at position p becomes the key at p + d by one more rotation by d x
frequency, without recomputing anything.

The frequencies come from the model's own rotary module, per layer: Gemma3 gives sliding-window and
global layers different bases. Only rotary types whose frequencies do not depend on the sequence
length can be shifted this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvrag.errors import InvalidInputError

# Rotary types whose inverse frequencies are fixed at load time (`dynamic` and `longrope` rescale
# them with the sequence length, so a shift by rotation would not match a recomputation).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


def rotary_module(model) -> torch.nn.Module:
    """The base model's rotary embedding module (`rotary_emb` in the Llama, Qwen2 and Gemma families,
    else the first child with inverse frequencies)."""
    base = model.base_model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        rotary = next(
            (
                m
                for _, m in base.named_children()
                if any(n.endswith("inv_freq") for n, _ in m.named_buffers())
            ),
            None,
        )
    if rotary is None:
        raise InvalidInputError(
            f"{type(model).__name__} has no rotary embedding module: moving cached keys needs a RoPE model"
        )
    return rotary


def layer_inv_freq(model) -> torch.Tensor:
    """Inverse RoPE frequencies of every layer, (layers, head_dim / 2) in float64.

    Models with one rotary setting give the same row for every layer; models with per-layer-type
    settings (`config.layer_types`, e.g. Gemma3's local and global bases) give each layer its type's.
    """
    rotary = rotary_module(model)
    cfg = model.config.get_text_config(decoder=True)
    layers = int(cfg.num_hidden_layers)
    types: Sequence[str | None] = getattr(cfg, "layer_types", None) or [None] * layers
    kinds = getattr(rotary, "rope_type", "default")
    rows = []
    for layer_type in types[:layers]:
        kind = kinds.get(layer_type) if isinstance(kinds, dict) else kinds
        inv = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
        if inv is None:
            inv = getattr(rotary, "inv_freq", None)
        if inv is None or kind is None:
            raise InvalidInputError(
                f"no rotary frequencies for {layer_type or 'the'} layers of {type(model).__name__}"
            )
        if kind not in STATIC_ROPE_TYPES:
            raise InvalidInputError(
                f"rotary type {kind!r} rescales its frequencies with the sequence length, so cached keys "
                f"cannot be moved by rotation: use positions='shared' (supported: {', '.join(sorted(STATIC_ROPE_TYPES))})"
            )
        rows.append(inv.detach().to(torch.float64))
    freqs = torch.stack(rows)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if 2 * freqs.shape[1] != head_dim:
        raise InvalidInputError("partial rotary embeddings (RoPE on part of each head) cannot be shifted")
    return freqs


def shift_keys(keys: torch.Tensor, offset: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys (layers, kv_heads, tokens, head_dim), cached after RoPE, moved `offset` positions later:
    one more rotation by offset x frequency, in the rotate-half layout transformers uses."""
    if keys.dim() != 4 or keys.shape[0] != inv_freq.shape[0]:
        raise InvalidInputError(
            f"keys of shape {tuple(keys.shape)} do not match {inv_freq.shape[0]} layers of frequencies"
        )
    ang = offset * inv_freq.to(keys.device)  # float64: large offsets keep their precision
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1).to(torch.float32)[:, None, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1).to(torch.float32)[:, None, None, :]
    half = keys.shape[-1] // 2
    k = keys.float()
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * cos + rotated * sin).to(keys.dtype)


def distinct_layout(
    keys: torch.Tensor, prefix_tokens: int, lengths: Sequence[int], inv_freq: torch.Tensor
) -> torch.Tensor:
    """A copy of joined keys with passage i moved from P.. to P + sum of the earlier lengths, so the
    passages follow each other as in a sequential prompt (each still encoded on its own)."""
    keys = keys.clone()
    pos = prefix_tokens + (lengths[0] if lengths else 0)
    for n in lengths[1:]:
        keys[:, :, pos : pos + n] = shift_keys(keys[:, :, pos : pos + n], pos - prefix_tokens, inv_freq)
        pos += n
    return keys
