"""APE phases 1 and 2: the shared prefix's cache, and each passage's own cache computed after it.

A passage's cache depends only on (model, prefix tokens, passage tokens), so it is computed once (at
indexing time) and reused for any question and any combination of passages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from kvrag.errors import InvalidInputError
from kvrag.rag.generation.cache import KV, cache_from, cache_kv, full_cache, positions


@torch.inference_mode()
def encode_prefix(model, prefix_ids: Sequence[int]) -> KV:
    """Cache of the shared prefix at positions 0..P-1."""
    cache = full_cache()
    ids = torch.tensor([list(prefix_ids)], device=model.device)
    model.base_model(input_ids=ids, position_ids=positions(model, 0, ids.shape[1]), past_key_values=cache)
    return cache_kv(cache)


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Passage indices sorted by length and grouped so that rows x longest stays within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    i = 0
    while i < len(order):
        longest = lengths[order[i]]
        j = i + 1
        while j < len(order):
            longest = max(longest, lengths[order[j]])
            if (j - i + 1) * longest > batch_tokens:
                break
            j += 1
        out.append(order[i:j])
        i = j
    return out


@torch.inference_mode()
def encode_passages(
    model,
    passages: Sequence[Sequence[int]],
    prefix: KV,
    *,
    pad_id: int = 0,
    batch_tokens: int = 4096,
    progress: bool = False,
) -> list[KV]:
    """Each passage's own cache, computed after the prefix at positions P..P+L-1.

    Passages are sorted by length and batched up to `batch_tokens` (rows x longest). Rows are
    right-padded: under the causal mask real tokens never see the padding, so results are exact.
    """
    if not passages:
        return []
    if any(len(p) == 0 for p in passages):
        raise InvalidInputError("a passage has no tokens")
    p_len = prefix.tokens
    out: list[KV | None] = [None] * len(passages)
    bar = tqdm(total=len(passages), desc="passage KV", unit="passage", disable=not progress)
    for rows in _batches([len(p) for p in passages], batch_tokens):
        width = max(len(passages[r]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for n, r in enumerate(rows):
            ids[n, : len(passages[r])] = torch.tensor(list(passages[r]), dtype=torch.long)
        cache = cache_from(model, [prefix], batch=len(rows))
        model.base_model(
            input_ids=ids.to(model.device),
            position_ids=positions(model, p_len, width, len(rows)),
            past_key_values=cache,
            use_cache=True,
        )
        for n, r in enumerate(rows):
            out[r] = cache_kv(cache, p_len, p_len + len(passages[r]), row=n)
        bar.update(len(rows))
    bar.close()
    return out  # type: ignore[return-value]
