"""The generator: a causal LM loaded once, with reusable prefix and passage KV caches, the prefill
modes and a streaming decoder.

This is a thin facade over flat modules, each one step of the path:

- `prompt`: how the prefix, passages and question are written and tokenised;
- `loading`: resolve and load the model, its shape and fingerprint;
- `encoding`: the prefix's and each passage's cache (APE phases 1 and 2);
- `cache`: `KV`, `JoinedContext` and the transformers caches built from them;
- `prefill`: `sequential` from token ids, the cached modes from a `JoinedContext` and a
  `PrefillPolicy` (with `rope` for moving cached keys and `blend` for the partial recompute);
- `sampling` and `streaming`: picking tokens and decoding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch

from kvrag.errors import InvalidInputError
from kvrag.rag.generation import blend, encoding, rope, streaming
from kvrag.rag.generation import prompt as _prompt
from kvrag.rag.generation.blend import DEFAULT_BLEND_RATIO
from kvrag.rag.generation.cache import KV, JoinedContext
from kvrag.rag.generation.loading import load_causal_lm, model_shape
from kvrag.rag.generation.prefill import MODES, PrefillPolicy, Session, prefill_cached, prefill_sequential
from kvrag.rag.generation.prompt import PromptFormat, prompt_format, prompt_pieces
from kvrag.rag.generation.sampling import SamplingParams
from kvrag.rag.generation.streaming import TokenEvent

DEFAULT_GENERATOR = "bundled:qwen2.5-coder-0.5b-instruct"

__all__ = [
    "DEFAULT_BLEND_RATIO",
    "DEFAULT_GENERATOR",
    "KV",
    "MODES",
    "Generator",
    "JoinedContext",
    "PrefillPolicy",
    "SamplingParams",
    "Session",
    "TokenEvent",
]


class Generator:
    """A causal LM loaded once, with the prefill modes and a streaming decoder."""

    def __init__(
        self,
        spec: str = DEFAULT_GENERATOR,
        *,
        models_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        prompt: str | PromptFormat | None = None,
        max_passage_tokens: int = 1024,
    ):
        self.spec = spec
        self.prompt = prompt_format(prompt)
        self.max_passage_tokens = max_passage_tokens
        self.device = torch.device(device)
        loaded = load_causal_lm(spec, models_dir=models_dir, device=self.device, dtype=dtype)
        self.model, self.tokenizer, self.path = loaded.model, loaded.tokenizer, loaded.path
        self.dtype, self.fingerprint = loaded.dtype, loaded.fingerprint
        self.shape = model_shape(self.model.config)
        self.num_layers = self.shape.num_layers
        self.num_kv_heads = self.shape.num_kv_heads
        self.head_dim = self.shape.head_dim
        self.max_positions = self.shape.max_positions
        pieces = prompt_pieces(self.tokenizer, self.prompt, self.model.generation_config)
        self.prefix_ids: list[int] = pieces.prefix_ids
        self.stop_ids = pieces.stop_ids
        self._tail = pieces.tail

    # ------------------------------------------------------------------ prompt pieces

    def _encode(self, text: str) -> list[int]:
        """Token ids of a piece of text, without special tokens."""
        return _prompt.encode(self.tokenizer, text)

    def passage_ids(self, text: str, title: str | None = None) -> list[int]:
        """Token ids of one passage piece (truncated to `max_passage_tokens`)."""
        return _prompt.passage_ids(self.tokenizer, self.prompt, text, title, self.max_passage_tokens)

    def question_ids(self, question: str) -> list[int]:
        """Token ids of the question piece (question, chat template tail, reply start)."""
        return _prompt.question_ids(self.tokenizer, self.prompt, self._tail, question)

    # ------------------------------------------------------------------ caches

    def encode_prefix(self) -> KV:
        """Cache of the shared prefix at positions 0..P-1."""
        return encoding.encode_prefix(self.model, self.prefix_ids)

    def encode_passages(
        self,
        passages: Sequence[Sequence[int]],
        prefix: KV | None = None,
        *,
        batch_tokens: int = 4096,
        progress: bool = False,
    ) -> list[KV]:
        """Each passage's own cache, computed after the prefix at positions P..P+L-1 (batched)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if passages and prefix is None:
            prefix = self.encode_prefix()
        return encoding.encode_passages(
            self.model, passages, prefix, pad_id=pad, batch_tokens=batch_tokens, progress=progress
        )

    def context(
        self,
        passage_ids: Sequence[Sequence[int]],
        *,
        prefix: KV | None = None,
        passages: Sequence[KV] | None = None,
    ) -> JoinedContext:
        """The joined context of the given passages for the cached modes, computing the prefix's and
        the passages' caches unless given (the RAG pipeline fetches stored ones instead)."""
        prefix = prefix if prefix is not None else self.encode_prefix()
        if passages is None:
            passages = self.encode_passages(passage_ids, prefix)
        return JoinedContext.join(prefix, passages, passage_ids)

    def shift_keys(self, keys: torch.Tensor, offset: int) -> torch.Tensor:
        """Cached keys (layers, kv_heads, tokens, head_dim) moved `offset` positions later."""
        return rope.shift_keys(keys, offset, rope.layer_inv_freq(self.model))

    def blend(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        passage_ids: Sequence[Sequence[int]],
        prefix_tokens: int,
        ratio: float = DEFAULT_BLEND_RATIO,
    ) -> int:
        """Recompute `ratio` of the passage tokens of a joined cache in distinct layout, in place."""
        return blend.blend(self.model, keys, values, passage_ids, prefix_tokens, ratio)

    # ------------------------------------------------------------------ prefill and decoding

    def prefill(
        self,
        policy: PrefillPolicy | str,
        question_ids: Sequence[int],
        context: JoinedContext | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 0,
    ) -> Session:
        """Prefill the question, ready to decode. `policy` is a `PrefillPolicy` or a mode name (with
        the policy's defaults). `context` is the passages' token ids in `sequential` mode and a
        `JoinedContext` (see `context`) in the cached modes. `max_new_tokens` is checked against the
        model's positions."""
        policy = PrefillPolicy(policy) if isinstance(policy, str) else policy
        if policy.mode == "sequential":
            if isinstance(context, JoinedContext):
                raise InvalidInputError(
                    "sequential prefill takes the passages' token ids, not a JoinedContext"
                )
            return prefill_sequential(
                self.model, self.shape, self.prefix_ids, context, question_ids, max_new_tokens=max_new_tokens
            )
        if not isinstance(context, JoinedContext):
            raise InvalidInputError(
                f"mode {policy.mode!r} prefills over cached passages: pass a JoinedContext (Generator.context)"
            )
        return prefill_cached(
            self.model, self.shape, context, question_ids, policy, max_new_tokens=max_new_tokens
        )

    def answer_logprobs(self, session: Session, answer_ids: Sequence[int]) -> list[float]:
        """Log-probability of each answer token given the prefilled prompt (teacher forcing)."""
        return streaming.answer_logprobs(self.model, session, answer_ids)

    def stream(self, session: Session, sampling: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Decode from a prefilled session, yielding text deltas; the last event has finish_reason
        and stats (tokens, decode time)."""
        return streaming.stream(self.model, self.tokenizer, self.stop_ids, session, sampling)

    def generate(self, session: Session, sampling: SamplingParams | None = None) -> tuple[str, dict]:
        """Decode to the end; returns the text and the stats of the last event."""
        return streaming.generate(self.stream(session, sampling))

    def answer(
        self,
        question: str,
        passages: Sequence[str | tuple[str | None, str]],
        *,
        mode: str = "ape",
        stream: bool = False,
        sampling: SamplingParams | None = None,
        temperature: float | Sequence[float] = 0.9,
        scale: float | Sequence[float] = 1.0,
    ) -> str | Iterator[TokenEvent]:
        """Answer from passages given as text or (title, text), computing their caches here (the RAG
        pipeline fetches stored ones instead). Returns the text, or the token events with `stream`."""
        policy = PrefillPolicy(mode, temperature, scale)
        pieces = [(None, p) if isinstance(p, str) else p for p in passages]
        ids = [self.passage_ids(text, title) for title, text in pieces]
        sp = sampling or SamplingParams()
        context = ids if policy.mode == "sequential" else self.context(ids)
        session = self.prefill(policy, self.question_ids(question), context, max_new_tokens=sp.max_new_tokens)
        if stream:
            return self.stream(session, sp)
        return self.generate(session, sp)[0]
