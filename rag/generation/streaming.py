"""Decoding from a prefilled session: streamed text deltas, the whole answer, and teacher-forced
log-probabilities of a given answer."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvrag.rag.generation.cache import positions, step, truncate_cache
from kvrag.rag.generation.prefill import Session
from kvrag.rag.generation.sampling import SamplingParams, pick_token, sampler


@dataclass
class TokenEvent:
    """One streamed step: the new text (may be empty while a multi-byte or stop prefix is held back)."""

    text: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" | "length" on the last event
    stats: dict = field(default_factory=dict)


@torch.inference_mode()
def answer_logprobs(model, session: Session, answer_ids: Sequence[int]) -> list[float]:
    """Log-probability of each answer token given the prefilled prompt (teacher forcing).
    The session's cache is restored afterwards, so decoding can follow."""
    if not answer_ids:
        return []
    first = torch.log_softmax(session.logits, -1)[answer_ids[0]].item()
    if len(answer_ids) == 1:
        return [first]
    length = session.cache.get_seq_length()
    x = torch.tensor([list(answer_ids[:-1])], device=model.device)
    logits = step(
        model, x, positions(model, session.next_position, x.shape[1]), session.cache, session.ape, 0
    )
    truncate_cache(session.cache, length)
    logp = torch.log_softmax(logits[0].float(), -1)
    rest = logp[torch.arange(len(answer_ids) - 1), torch.tensor(list(answer_ids[1:]))]
    return [first, *rest.tolist()]


@torch.inference_mode()
def stream(
    model,
    tokenizer,
    stop_ids: frozenset[int],
    session: Session,
    sampling: SamplingParams | None = None,
) -> Iterator[TokenEvent]:
    """Decode from a prefilled session, yielding text deltas; the last event has finish_reason
    and stats (tokens, decode time, the whole text)."""
    sp = sampling or SamplingParams()
    gen = sampler(sp)
    stops = [s for s in sp.stop if s]
    hold = max((len(s) for s in stops), default=1) - 1  # text held back while it may start a stop string
    ids: list[int] = []
    emitted = ""
    logits = session.logits
    position = session.next_position
    t0 = time.perf_counter()
    finish = "length"
    forwards = 0
    for n in range(sp.max_new_tokens):
        tok = pick_token(logits, sp, gen, ids)
        if tok in stop_ids:
            finish = "stop"
            break
        ids.append(tok)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            if cut > len(emitted):
                yield TokenEvent(text[len(emitted) : cut], tok)
            emitted = text[:cut]
            finish = "stop"
            break
        ready = text.rstrip("\ufffd")  # an unfinished multi-byte character waits for its next token
        if stops:
            ready = ready[: max(len(emitted), len(ready) - hold)]
        if len(ready) > len(emitted):
            yield TokenEvent(ready[len(emitted) :], tok)
            emitted = ready
        else:
            yield TokenEvent("", tok)
        if n + 1 == sp.max_new_tokens:
            break
        x = torch.tensor([[tok]], device=model.device)
        logits = step(model, x, positions(model, position, 1), session.cache, session.ape)[0, -1].float()
        position += 1
        forwards += 1
    if finish != "stop":
        text = tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        if len(text) > len(emitted):
            yield TokenEvent(text[len(emitted) :], None)
            emitted = text
    elapsed = time.perf_counter() - t0
    stats = {
        "completion_tokens": len(ids),
        "decode_s": elapsed,
        "decode_tok_s": forwards / elapsed if forwards and elapsed > 0 else 0.0,
        "text": emitted,
    }
    yield TokenEvent("", None, finish, stats)


def generate(events: Iterator[TokenEvent]) -> tuple[str, dict]:
    """Drain a token stream; returns the text and the stats of the last event."""
    for event in events:
        if event.finish_reason is not None:
            return event.stats["text"], {**event.stats, "finish_reason": event.finish_reason}
    raise RuntimeError("decoder ended without a final event")  # pragma: no cover
