"""CacheBlend-style partial recompute (arXiv 2405.16444) of a joined cache in distinct layout.

The passages' caches were computed independently; placed one after the other (keys re-rotated), only
the first passage's cache is what a sequential prefill gives. Blend recomputes a fraction of the later
passages' tokens with attention over everything before them:

1. the later passages' tokens run through layer 0 (their layer-0 cache is rewritten) and layer 1's
   projections, and those whose fresh layer-1 values deviate most from the cached ones are selected;
2. the selected tokens run through the whole model, their slots rewritten at every layer.

Both passes are ordinary forwards of the model over a cache stand-in that writes new keys and values
into given slots of the joined cache, with an explicit mask (each token sees the slots before its
own), so any RoPE causal LM works: the model applies its own embedding scale, rotary module (per
layer type) and norms. The price is that the selected tokens go through layer 0 twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from kvrag.errors import InvalidInputError

DEFAULT_BLEND_RATIO = 0.15


class _Probed(Exception):
    """Raised by the cache stand-in once the probe layer's fresh values are in: the rest of the
    forward is not needed."""


class ScatterCache:
    """Cache stand-in for recomputing some tokens of an already complete cache: `update` writes the
    new keys and values over those tokens' slots and returns the whole layer, so the recomputed tokens
    attend to every slot the mask allows, as in a full prefill. At layer `probe` it keeps the fresh
    values instead and stops the forward."""

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, probe: int | None = None
    ):
        self.keys = keys  # (layers, kv_heads, tokens, head_dim), written in place
        self.values = values
        self.slots = slots
        self.probe = probe
        self.fresh: torch.Tensor | None = None  # (kv_heads, len(slots), head_dim) at the probe layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == self.probe:
            self.fresh = value_states[0]
            raise _Probed
        self.keys[layer_idx][:, self.slots] = key_states[0].to(self.keys.dtype)
        self.values[layer_idx][:, self.slots] = value_states[0].to(self.values.dtype)
        return self.keys[layer_idx].unsqueeze(0), self.values[layer_idx].unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys.shape[2])


def _run(model, ids: torch.Tensor, slots: torch.Tensor, cache: ScatterCache) -> None:
    """Forward `ids` (1, n) at positions `slots`, each token seeing the cache slots up to its own."""
    key_pos = torch.arange(cache.keys.shape[2], device=slots.device)
    mask = (key_pos.unsqueeze(0) <= slots.unsqueeze(1))[None, None]
    with contextlib.suppress(_Probed):
        model.base_model(
            input_ids=ids,
            position_ids=slots.unsqueeze(0),
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
        )


@torch.inference_mode()
def blend(
    model,
    keys: torch.Tensor,
    values: torch.Tensor,
    passage_ids: Sequence[Sequence[int]],
    prefix_tokens: int,
    ratio: float = DEFAULT_BLEND_RATIO,
) -> int:
    """Recompute `ratio` of the context tokens of a joined cache in distinct layout (passages following
    each other, keys already re-rotated), in place. Returns the number of tokens recomputed.

    The first passage follows the prefix exactly as in a sequential prompt, so its cache is kept; the
    selection is among the later passages' tokens."""
    if not 0.0 <= ratio <= 1.0:
        raise InvalidInputError("the blend ratio must be in [0, 1]")
    lengths = [len(p) for p in passage_ids]
    ctx = sum(lengths)
    if keys.shape[2] != prefix_tokens + ctx:
        raise InvalidInputError("the joined cache does not match the passages")
    first = prefix_tokens + (lengths[0] if lengths else 0)
    later = prefix_tokens + ctx - first
    n_select = min(math.ceil(ratio * ctx), later)
    if n_select <= 0 or len(lengths) < 2:
        return 0
    ids = torch.tensor([t for p in passage_ids[1:] for t in p], device=keys.device).unsqueeze(0)
    slots = torch.arange(first, prefix_tokens + ctx, device=keys.device)
    if n_select < later:
        # Pass 1: layer 0 for every later token, then layer 1's fresh values against the cached ones.
        probe = min(1, keys.shape[0] - 1)
        cache = ScatterCache(keys, values, slots, probe)
        _run(model, ids, slots, cache)
        if cache.fresh is None:
            raise RuntimeError("the model never wrote its probe layer's cache")  # pragma: no cover
        cached = values[probe][:, slots].to(cache.fresh.dtype)
        deviation = (cache.fresh - cached).float().pow(2).sum(dim=(0, 2))
        keep = torch.topk(deviation, n_select).indices.sort().values
        ids, slots = ids[:, keep], slots[keep]
    # Pass 2: the selected tokens through every layer.
    _run(model, ids, slots, ScatterCache(keys, values, slots))
    return n_select
