"""Decoding settings and picking the next token from logits."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrag.errors import InvalidInputError


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 is greedy; `seed` makes sampling reproducible."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # > 1 discourages tokens already generated (CTRL-style)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidInputError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise InvalidInputError("temperature must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError("top_p must be in (0, 1]")
        if not 1.0 <= self.repetition_penalty <= 10.0:
            raise InvalidInputError("repetition_penalty must be in [1, 10]")


def sampler(sp: SamplingParams) -> torch.Generator | None:
    """The random generator for `sp`: None when greedy, seeded by `sp.seed` or by the OS."""
    if sp.temperature == 0:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(sp.seed if sp.seed is not None else int.from_bytes(os.urandom(4), "little"))
    return gen


def pick_token(
    logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None = None, seen: Sequence[int] = ()
) -> int:
    """The next token from (vocab,) logits: greedy at temperature 0, else sampled from the top-p
    nucleus; tokens in `seen` are demoted by the repetition penalty. `logits` is not modified."""
    if sp.repetition_penalty != 1.0 and seen:
        logits = logits.clone()
        idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
        picked = logits[idx]
        logits[idx] = torch.where(picked > 0, picked / sp.repetition_penalty, picked * sp.repetition_penalty)
    if sp.temperature == 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / sp.temperature, -1)
    if sp.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, -1)
        keep = cum - sorted_p < sp.top_p
        keep[0] = True  # the most likely token, even for a top_p below float32's smallest value
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen).item())
