"""Adaptive Parallel Encoding (APE) as a transformers attention function.

The model is loaded with `attn_implementation="kvrag_ape"`. Without the `ape` keyword argument the
function is plain SDPA attention (sequential prefill, passage encoding, ordinary decoding). With
`ape=ApeSpec(...)` passed to `model(...)`, transformers forwards it to every attention layer, and
the query/decoding attention is split into two groups:

- C: the passage keys, cache slots `[c_start, c_end)`: all visible, scores divided by temperature T;
- O: the prefix keys (before `c_start`) and the query and generated keys (from `c_end`), causal.

Both groups keep their log-sum-exps in float32 and are merged with the scaling factor S:
`[w_C, w_O] = softmax([S*T*LSE_C, LSE_O])`. With T = S = 1 this is exactly ordinary attention over
`[prefix, passages, query]`.

The mask builder must know the implementation name too: the SDPA mask function is registered under
the same name, otherwise a prefill on top of a cache would run without an explicit mask and torch's
`is_causal` would align the causal triangle top-left (wrong for cached keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvrag.kernels.ape_attention import ape_attention

ATTN_IMPLEMENTATION = "kvrag_ape"


@dataclass(frozen=True)
class ApeSpec:
    """Where the passage keys sit in the cache and how to weigh them.

    `temperature` and `scale` are either one float for all layers or one float per layer.
    `c_valid` optionally marks valid passage slots per batch row (shape (batch, c_end - c_start));
    padded slots are masked out of the passage group.
    """

    c_start: int
    c_end: int
    temperature: float | Sequence[float] = 1.0
    scale: float | Sequence[float] = 1.0
    c_valid: torch.Tensor | None = None

    def t_s(self, layer_idx: int) -> tuple[float, float]:
        t = self.temperature if isinstance(self.temperature, (int, float)) else self.temperature[layer_idx]
        s = self.scale if isinstance(self.scale, (int, float)) else self.scale[layer_idx]
        return float(t), float(s)


def kvrag_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    ape: ApeSpec | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as `kvrag_ape`: SDPA, or APE when `ape` is given."""
    if ape is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    t, s = ape.t_s(module.layer_idx)
    out = ape_attention(
        query,
        key,
        value,
        c_start=ape.c_start,
        c_end=ape.c_end,
        temperature=t,
        scale=s,
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        c_valid=ape.c_valid,
    )
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register() -> str:
    """Register the attention and mask functions (idempotent); returns the implementation name."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_IMPLEMENTATION, kvrag_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ATTN_IMPLEMENTATION
