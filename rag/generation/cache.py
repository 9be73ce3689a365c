"""KV caches: one piece's cache (`KV`), the joined context the cached modes prefill over
(`JoinedContext`), and the transformers caches built from them.

Layout everywhere: (layers, kv_heads, tokens, head_dim), keys stored after RoPE.

Caches here are plain `DynamicCache`s of full layers, never the sliding-window layers a model config
would ask for: the cached modes address slots by index (a passage's slots, a join of pieces), so no
layer may drop old slots. Sliding-window models still get their window through the attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrag.errors import InvalidInputError
from kvrag.rag.generation.ape import ApeSpec


@dataclass
class KV:
    """One piece's cache: keys and values of shape (layers, kv_heads, tokens, head_dim), keys after RoPE."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.keys.shape[2])


@dataclass(frozen=True)
class JoinedContext:
    """What the cached modes prefill the question over: the prefix and k passages as one cache (prefix
    first, then the passages in order, each encoded after the prefix at shared positions), and the
    passages' token ids (their lengths locate them; `blend` recomputes some of their tokens)."""

    kv: KV
    prefix_tokens: int
    passage_ids: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        ids = tuple(tuple(int(t) for t in p) for p in self.passage_ids)
        object.__setattr__(self, "passage_ids", ids)
        if any(not p for p in ids):
            raise InvalidInputError("a passage has no tokens")
        if self.kv.keys.shape != self.kv.values.shape or self.kv.keys.dim() != 4:
            raise InvalidInputError(
                "the joined cache needs keys and values of one (layers, heads, tokens, dim) shape"
            )
        if self.kv.tokens != self.prefix_tokens + sum(map(len, ids)):
            raise InvalidInputError(
                f"the joined cache holds {self.kv.tokens} tokens but the prefix and passages have "
                f"{self.prefix_tokens + sum(map(len, ids))}"
            )

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.passage_ids]

    @classmethod
    def join(cls, prefix: KV, passages: Sequence[KV], passage_ids: Sequence[Sequence[int]]) -> JoinedContext:
        """The context from separately computed caches of the prefix and each passage (in order)."""
        if len(passages) != len(passage_ids):
            raise InvalidInputError(f"{len(passages)} passage caches for {len(passage_ids)} passages")
        keys = torch.cat([prefix.keys, *(p.keys for p in passages)], dim=2)
        values = torch.cat([prefix.values, *(p.values for p in passages)], dim=2)
        return cls(KV(keys, values), prefix.tokens, tuple(tuple(p) for p in passage_ids))


def full_cache(num_layers: int = 0):
    """An empty `DynamicCache` of full (never trimmed) layers: `num_layers` made now, any others
    added by the first `update` of each layer."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers.extend(DynamicLayer() for _ in range(num_layers))
    return cache


def cache_from(model, pieces: Sequence[KV], batch: int = 1):
    """A cache holding `pieces` one after the other, repeated over `batch` rows (a copy)."""
    layers = int(pieces[0].keys.shape[0])
    cache = full_cache(layers)
    for layer in range(layers):
        k = torch.cat([p.keys[layer] for p in pieces], dim=1).unsqueeze(0).to(model.device, model.dtype)
        v = torch.cat([p.values[layer] for p in pieces], dim=1).unsqueeze(0).to(model.device, model.dtype)
        if batch > 1:
            k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        cache.update(k, v, layer)
    return cache


def cache_over(model, keys: torch.Tensor, values: torch.Tensor):
    """A cache whose layers are views of already joined tensors: no copy before the first new token."""
    cache = full_cache(int(keys.shape[0]))
    for layer, cl in enumerate(cache.layers):
        k = keys[layer].unsqueeze(0).to(model.device, model.dtype)
        v = values[layer].unsqueeze(0).to(model.device, model.dtype)
        cl.lazy_initialization(k, v)
        cl.keys, cl.values = k, v
    return cache


def cache_kv(cache, start: int = 0, end: int | None = None, row: int = 0) -> KV:
    """Slots `[start, end)` of one batch row of a cache, as a contiguous `KV`."""
    keys = torch.stack([layer.keys[row, :, start:end] for layer in cache.layers])
    values = torch.stack([layer.values[row, :, start:end] for layer in cache.layers])
    return KV(keys.contiguous(), values.contiguous())


def truncate_cache(cache, length: int) -> None:
    """Drop every slot from `length` on (undo a forward over the cache)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def positions(model, start: int, n: int, batch: int = 1) -> torch.Tensor:
    """Position ids `start..start+n-1` for `batch` rows."""
    return (torch.arange(n, device=model.device) + start).unsqueeze(0).expand(batch, -1)


def step(
    model, ids: torch.Tensor, position_ids: torch.Tensor, cache, ape: ApeSpec | None, keep: int = 1
) -> torch.Tensor:
    """One forward of new tokens over a cache (which it extends); logits of the last `keep` tokens
    (all with 0). With `ape`, the registered attention function applies APE's split."""
    kwargs = {"ape": ape} if ape is not None else {}
    out = model(
        input_ids=ids,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
        **kwargs,
    )
    return out.logits
