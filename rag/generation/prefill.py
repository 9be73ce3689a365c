"""Prefill: from the prompt pieces to the logits of the first answer token.

- `sequential`: one ordinary prefill of all the pieces concatenated (the quality reference); it
  takes token ids only.
- The cached modes take a `JoinedContext` (prefix and passage caches already joined) and prefill the
  question only:
  - `parallel`: passages at shared positions P..P+L-1, question at P + max L, plain attention over
    everything (APE with T = S = 1);
  - `ape`: the same with the passage group's temperature T and scaling factor S (see `ape.py`);
  - `blend`: passages re-rotated to follow each other as in a sequential prompt, a fraction of their
    tokens recomputed (see `blend.py`), then the question with plain attention.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrag.errors import InvalidInputError
from kvrag.rag.generation.ape import ApeSpec
from kvrag.rag.generation.blend import DEFAULT_BLEND_RATIO, blend
from kvrag.rag.generation.cache import JoinedContext, cache_over, full_cache, positions, step
from kvrag.rag.generation.loading import ModelShape
from kvrag.rag.generation.rope import distinct_layout, layer_inv_freq

MODES = ("sequential", "parallel", "ape", "blend")
POSITIONS = ("shared", "distinct")


def _weights(name: str, value: float | Sequence[float]) -> float | tuple[float, ...]:
    """One positive finite weight, or one per layer (as a tuple)."""
    out = float(value) if isinstance(value, int | float) else tuple(float(v) for v in value)
    for v in out if isinstance(out, tuple) else (out,):
        if not (math.isfinite(v) and v > 0):
            raise InvalidInputError(f"APE {name} must be finite and > 0, got {v}")
    return out


@dataclass(frozen=True)
class PrefillPolicy:
    """How the question is prefilled: the mode, APE's temperature T and scaling factor S (one value
    or one per layer; used by `ape` only), where the passages sit (`shared` positions as in APE, or
    `distinct`: re-rotated to follow each other) and the fraction of context tokens `blend`
    recomputes. Checked once, here; `blend` always uses distinct positions."""

    mode: str = "ape"
    temperature: float | Sequence[float] = 0.9
    scale: float | Sequence[float] = 1.0
    positions: str = "shared"
    blend_ratio: float = DEFAULT_BLEND_RATIO

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.positions not in POSITIONS:
            raise InvalidInputError("positions must be 'shared' or 'distinct'")
        if not 0.0 <= self.blend_ratio <= 1.0:
            raise InvalidInputError("the blend ratio must be in [0, 1]")
        object.__setattr__(self, "temperature", _weights("temperature", self.temperature))
        object.__setattr__(self, "scale", _weights("scale", self.scale))

    @property
    def distinct(self) -> bool:
        """Whether passages are moved to follow each other (always for `blend`)."""
        return self.positions == "distinct" or self.mode == "blend"

    def ape_spec(self, c_start: int, c_end: int, num_layers: int) -> ApeSpec:
        """The attention split for passage slots `[c_start, c_end)`: T and S for `ape`, 1 otherwise."""
        if self.mode != "ape":
            return ApeSpec(c_start, c_end, 1.0, 1.0)
        for name, v in (("temperature", self.temperature), ("scale", self.scale)):
            if isinstance(v, tuple) and len(v) != num_layers:
                raise InvalidInputError(
                    f"{len(v)} per-layer APE {name} values for a {num_layers}-layer model"
                )
        return ApeSpec(c_start, c_end, self.temperature, self.scale)


@dataclass
class Session:
    """A prefilled prompt, ready to decode: the cache, the next position and the APE split."""

    cache: object
    logits: torch.Tensor  # (vocab,) float32, for the first answer token
    next_position: int
    ape: ApeSpec | None
    mode: str
    context_tokens: int
    prefill_ms: float


def check_length(shape: ModelShape, positions_needed: int, slots_needed: int, cached: bool) -> None:
    """Refuse prompts the model cannot place. In the cached modes slots are not positions, and the
    APE attention has no window, so the whole cache must fit in the smallest sliding window."""
    if positions_needed > shape.max_positions:
        raise InvalidInputError(
            f"the prompt needs {positions_needed} positions but the model has {shape.max_positions}: "
            "use fewer passages (k)"
        )
    if cached and shape.sliding_window is not None and slots_needed > shape.sliding_window:
        raise InvalidInputError(
            f"the prompt needs {slots_needed} cache slots but the model's sliding window is "
            f"{shape.sliding_window} tokens: use fewer passages (k) or mode 'sequential'"
        )


@torch.inference_mode()
def prefill_sequential(
    model,
    shape: ModelShape,
    prefix_ids: Sequence[int],
    passage_ids: Sequence[Sequence[int]],
    question_ids: Sequence[int],
    *,
    max_new_tokens: int = 0,
) -> Session:
    """One ordinary prefill of `[prefix, p_1, ..., p_k, question]` from token ids."""
    if not question_ids:
        raise InvalidInputError("the question has no tokens")
    t0 = time.perf_counter()
    ids = list(prefix_ids) + [t for p in passage_ids for t in p] + list(question_ids)
    check_length(shape, len(ids) + max_new_tokens, len(ids) + max_new_tokens, cached=False)
    cache = full_cache(shape.num_layers)
    x = torch.tensor([ids], device=model.device)
    logits = step(model, x, positions(model, 0, len(ids)), cache, None)
    context = len(ids) - len(question_ids)
    ms = (time.perf_counter() - t0) * 1000
    return Session(cache, logits[0, -1].float(), len(ids), None, "sequential", context, ms)


@torch.inference_mode()
def prefill_cached(
    model,
    shape: ModelShape,
    context: JoinedContext,
    question_ids: Sequence[int],
    policy: PrefillPolicy,
    *,
    max_new_tokens: int = 0,
) -> Session:
    """Prefill the question over a joined context of prefix and passage caches, as `policy` says."""
    if policy.mode == "sequential":
        raise InvalidInputError("sequential prefill takes the passages' token ids, not their caches")
    if not question_ids:
        raise InvalidInputError("the question has no tokens")
    t0 = time.perf_counter()
    p_len, lengths = context.prefix_tokens, context.lengths
    ctx = sum(lengths)
    start = p_len + (ctx if policy.distinct else max(lengths, default=0))
    n_q = len(question_ids)
    check_length(shape, start + n_q + max_new_tokens, p_len + ctx + n_q + max_new_tokens, cached=True)
    ape = policy.ape_spec(p_len, p_len + ctx, shape.num_layers)
    keys = context.kv.keys.to(model.device, model.dtype)
    values = context.kv.values.to(model.device, model.dtype)
    if policy.distinct and len(lengths) > 1:
        keys = distinct_layout(keys, p_len, lengths, layer_inv_freq(model))
    if policy.mode == "blend" and len(lengths) > 1:
        values = values.clone()  # keys are a copy already (distinct layout)
        blend(model, keys, values, context.passage_ids, p_len, policy.blend_ratio)
    cache = cache_over(model, keys, values)
    q = torch.tensor([list(question_ids)], device=model.device)
    logits = step(model, q, positions(model, start, n_q), cache, ape)
    ms = (time.perf_counter() - t0) * 1000
    return Session(cache, logits[0, -1].float(), start + n_q, ape, policy.mode, p_len + ctx, ms)
