"""The generator: a causal LM with reusable prefix and passage KV caches.

A prompt is built from separately tokenised pieces, so a passage's tokens (and therefore its cache)
never depend on its neighbours:

    [prefix: chat header + system text + context header] [passage 1] ... [passage k] [question + tail]

Three ways to get from those pieces to the first answer token:

- `sequential`: one ordinary prefill of all the pieces concatenated (the quality reference);
- `parallel`: prefix and passage caches computed independently (each passage after the prefix, at
  positions P..P+L-1), joined, and only the question prefilled at position P + max L, with plain
  attention over everything (APE with T = S = 1);
- `ape`: the same with the passage group's temperature T and scaling factor S (see `ape.py`);
- `blend`: CacheBlend-style: the passage caches re-rotated to follow each other as in a sequential
  prompt, a small fraction of passage tokens (those whose layer-1 values deviate most from what a
  sequential prefill gives) recomputed with attention over all earlier passages, then the question
  prefilled with plain attention over everything.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvrag.encoders.models import model_fingerprint
from kvrag.errors import InvalidInputError, ModelNotFoundError
from kvrag.rag.generation.ape import ApeSpec, register
from kvrag.rag.generation.bundled import resolve_generator

MODES = ("sequential", "parallel", "ape", "blend")
DEFAULT_BLEND_RATIO = 0.15
DEFAULT_GENERATOR = "bundled:smollm2-135m-instruct"
DEFAULT_SYSTEM = (
    "You answer questions using only the passages given by the user. "
    "Reply with the shortest exact phrase from the passages that answers the question, not a full sentence."
)
_SENTINEL = "\u2063KVRAG-USER-CONTENT\u2063"


@dataclass(frozen=True)
class PromptFormat:
    """How pieces are written. Any change changes token ids, and so every cache key."""

    system: str = DEFAULT_SYSTEM
    context_header: str = "Passages:\n\n"
    passage_template: str = "{title}\n{text}\n\n"
    passage_template_untitled: str = "{text}\n\n"
    question_template: str = "Question: {question}"
    # Text that starts the assistant's reply (part of the question piece), e.g. "Answer:".
    response_prefix: str = ""
    # Worked examples as earlier chat turns (user text, assistant reply), part of the cached prefix.
    examples: tuple[tuple[str, str], ...] = ()


PROMPTS: dict[str, PromptFormat] = {
    # General answers for people: a sentence or two, from the passages.
    "chat": PromptFormat(
        system="You answer questions using only the passages given by the user. Answer briefly and say so "
        "when the passages do not contain the answer."
    ),
    # Extractive QA (evaluation): the reply is primed so that the model continues with the span itself.
    "extractive": PromptFormat(
        system="You are an extractive question answering system. Reply with only the exact words from the "
        "passages that answer the question.",
        response_prefix="The answer is",
    ),
}


def prompt_format(prompt: str | PromptFormat | None) -> PromptFormat:
    if prompt is None:
        return PROMPTS["chat"]
    if isinstance(prompt, PromptFormat):
        return prompt
    if prompt not in PROMPTS:
        raise InvalidInputError(f"unknown prompt {prompt!r}: choose one of {', '.join(PROMPTS)}")
    return PROMPTS[prompt]


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


@dataclass
class KV:
    """One piece's cache: keys and values of shape (layers, kv_heads, tokens, head_dim), keys after RoPE."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.keys.shape[2])


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


@dataclass
class TokenEvent:
    """One streamed step: the new text (may be empty while a multi-byte or stop prefix is held back)."""

    text: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" | "length" on the last event
    stats: dict = field(default_factory=dict)


class _ScatterCache:
    """Cache stand-in for recomputing some tokens of an already complete cache: `update` writes the
    new keys and values over those tokens' slots and returns the whole layer, so the recomputed tokens
    attend to every slot the mask allows, as in a full prefill."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys = keys  # (layers, kv_heads, tokens, head_dim), written in place
        self.values = values
        self.slots: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx][:, self.slots] = key_states[0].to(self.keys.dtype)
        self.values[layer_idx][:, self.slots] = value_states[0].to(self.values.dtype)
        return self.keys[layer_idx].unsqueeze(0), self.values[layer_idx].unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys.shape[2])


def _weights_digest(folder: Path) -> str:
    """Cheap content hash of the weight files: sizes plus their first and last 4 MiB."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(4 << 20))
            if size > 8 << 20:
                fh.seek(-(4 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


class Generator:
    """A causal LM loaded once, with the three prefill modes and a streaming decoder."""

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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        impl = register()
        self.spec = spec
        self.prompt = prompt_format(prompt)
        self.max_passage_tokens = max_passage_tokens
        self.device = torch.device(device)
        path = resolve_generator(spec, models_dir or Path.home() / ".local/share/kvrag/models")
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a local load takes a second; its bar is noise
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl)
        except OSError as exc:
            raise ModelNotFoundError(f"cannot load generator {spec!r}: {exc}") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model.to(self.device).eval()
        self.path = path
        cfg = self.model.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 4096))
        self.dtype = dtype
        local = Path(path)
        digest = _weights_digest(local) if local.is_dir() else hashlib.sha256(path.encode()).hexdigest()[:16]
        self.fingerprint = f"{model_fingerprint(path)}-{digest}-{str(dtype).removeprefix('torch.')}"
        self._build_pieces()

    # ------------------------------------------------------------------ prompt pieces

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _build_pieces(self) -> None:
        tok = self.tokenizer
        head, tail = "", ""
        if getattr(tok, "chat_template", None):
            messages = [{"role": "system", "content": self.prompt.system}] if self.prompt.system else []
            for user, assistant in self.prompt.examples:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            messages.append({"role": "user", "content": _SENTINEL})
            rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if _SENTINEL in rendered:
                head, tail = rendered.split(_SENTINEL, 1)
        if not head and not tail:
            head = (self.prompt.system + "\n\n") if self.prompt.system else ""
            tail = "\nAnswer: "
        bos = tok.bos_token if tok.bos_token and getattr(tok, "add_bos_token", False) else ""
        if bos and not head.startswith(bos):
            head = bos + head
        self.prefix_ids: list[int] = self._encode(head + self.prompt.context_header)
        self._tail = tail
        stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            stop.add(eos)
        elif eos:
            stop.update(eos)
        for special in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            tid = tok.convert_tokens_to_ids(special)
            if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
                stop.add(tid)
        self.stop_ids = frozenset(i for i in stop if i is not None)

    def passage_ids(self, text: str, title: str | None = None) -> list[int]:
        """Token ids of one passage piece (truncated to `max_passage_tokens`)."""
        if title:
            piece = self.prompt.passage_template.format(title=title.strip(), text=text.strip())
        else:
            piece = self.prompt.passage_template_untitled.format(text=text.strip())
        return self._encode(piece)[: self.max_passage_tokens]

    def question_ids(self, question: str) -> list[int]:
        question = question.strip()
        if not question:
            raise InvalidInputError("the question is empty")
        return self._encode(
            self.prompt.question_template.format(question=question) + self._tail + self.prompt.response_prefix
        )

    # ------------------------------------------------------------------ cache helpers

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _cache_from(self, pieces: Sequence[KV], batch: int = 1):
        cache = self._new_cache()
        for layer in range(self.num_layers):
            k = torch.cat([p.keys[layer] for p in pieces], dim=1).unsqueeze(0)
            v = torch.cat([p.values[layer] for p in pieces], dim=1).unsqueeze(0)
            k = k.to(self.device, self.dtype)
            v = v.to(self.device, self.dtype)
            if batch > 1:
                k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
            cache.update(k, v, layer)
        return cache

    def _cache_over(self, keys: torch.Tensor, values: torch.Tensor):
        """A cache whose layers are views of already joined tensors (layers, kv_heads, tokens, head_dim):
        no copy before the first new token."""
        cache = self._new_cache()
        for layer in range(self.num_layers):
            k = keys[layer].unsqueeze(0).to(self.device, self.dtype)
            v = values[layer].unsqueeze(0).to(self.device, self.dtype)
            cl = cache.layers[layer]
            cl.lazy_initialization(k, v)
            cl.keys, cl.values = k, v
        return cache

    def shift_keys(self, keys: torch.Tensor, offset: int) -> torch.Tensor:
        """Move cached keys (..., tokens, head_dim), stored after RoPE, `offset` positions later: RoPE
        is a rotation, so this is one more rotation by offset * frequency (default rotary layout:
        halves, as `rotate_half`)."""
        rotary = getattr(self.model.model, "rotary_emb", None)
        if rotary is None or getattr(rotary, "rope_type", "default") != "default":
            raise InvalidInputError("shifting cached keys needs a model with default rotary embeddings")
        ang = offset * rotary.inv_freq.to(keys.device, torch.float64)
        cos = torch.cat([ang.cos(), ang.cos()]).to(torch.float32)
        sin = torch.cat([ang.sin(), ang.sin()]).to(torch.float32)
        half = keys.shape[-1] // 2
        k = keys.float()
        rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
        return (k * cos + rotated * sin).to(keys.dtype)

    @torch.inference_mode()
    def blend(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        passage_ids: Sequence[Sequence[int]],
        prefix_tokens: int,
        ratio: float = DEFAULT_BLEND_RATIO,
    ) -> int:
        """Recompute a fraction of the passage tokens of a joined cache in distinct layout (passages
        following each other, keys already re-rotated), in place, as CacheBlend (arXiv 2405.16444) does.

        The first passage follows the prefix exactly as in a sequential prompt, so its cache is already
        exact; the later passages' tokens run through layer 0 with attention over everything before
        them, the `ratio * context` tokens whose layer-1 values deviate most from their cached values
        are selected, and only those run through the remaining layers. Returns the number selected."""
        if not 0.0 <= ratio <= 1.0:
            raise InvalidInputError("the blend ratio must be in [0, 1]")
        lengths = [len(p) for p in passage_ids]
        ctx = sum(lengths)
        if keys.shape[2] != prefix_tokens + ctx:
            raise InvalidInputError("the joined cache does not match the passages")
        first = prefix_tokens + (lengths[0] if lengths else 0)
        n_select = min(math.ceil(ratio * ctx), prefix_tokens + ctx - first)
        if n_select <= 0 or len(lengths) < 2:
            return 0
        ids = torch.tensor([t for p in passage_ids[1:] for t in p], device=self.device).unsqueeze(0)
        slots = torch.arange(first, prefix_tokens + ctx, device=self.device)
        model = self.model.model
        cache = _ScatterCache(keys, values)
        hidden = model.embed_tokens(ids)
        key_pos = torch.arange(keys.shape[2], device=self.device)
        for li, layer in enumerate(model.layers):
            if li == 1:
                # Select by how far the cached layer-1 values are from what this context gives.
                attn = layer.self_attn
                fresh = attn.v_proj(layer.input_layernorm(hidden))[0]
                fresh = fresh.view(fresh.shape[0], -1, attn.head_dim).transpose(0, 1)
                cached = values[1][:, slots].to(fresh.dtype)
                deviation = (fresh - cached).float().pow(2).sum(dim=(0, 2))
                keep = torch.topk(deviation, n_select).indices.sort().values
                slots, hidden = slots[keep], hidden[:, keep]
            cache.slots = slots
            positions = slots.unsqueeze(0)
            mask = (key_pos.unsqueeze(0) <= slots.unsqueeze(1))[None, None]
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                position_embeddings=model.rotary_emb(hidden, positions),
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return n_select

    @staticmethod
    def _truncate(cache, length: int) -> None:
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]

    def _positions(self, start: int, n: int, batch: int = 1) -> torch.Tensor:
        return (torch.arange(n, device=self.device) + start).unsqueeze(0).expand(batch, -1)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache, ape: ApeSpec | None, keep: int = 1):
        kwargs = {"ape": ape} if ape is not None else {}
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
            **kwargs,
        )
        return out.logits

    # ------------------------------------------------------------------ prefix and passages

    @torch.inference_mode()
    def encode_prefix(self) -> KV:
        """Cache of the shared prefix at positions 0..P-1."""
        cache = self._new_cache()
        ids = torch.tensor([self.prefix_ids], device=self.device)
        self.model.model(input_ids=ids, position_ids=self._positions(0, ids.shape[1]), past_key_values=cache)
        keys = torch.stack([cache.layers[i].keys[0] for i in range(self.num_layers)])
        values = torch.stack([cache.layers[i].values[0] for i in range(self.num_layers)])
        return KV(keys.contiguous(), values.contiguous())

    @torch.inference_mode()
    def encode_passages(
        self,
        passages: Sequence[Sequence[int]],
        prefix: KV | None = None,
        *,
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
        prefix = prefix or self.encode_prefix()
        p_len = prefix.tokens
        order = sorted(range(len(passages)), key=lambda i: len(passages[i]))
        out: list[KV | None] = [None] * len(passages)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        bar = tqdm(total=len(passages), desc="passage KV", unit="passage", disable=not progress)
        i = 0
        while i < len(order):
            longest = len(passages[order[i]])
            j = i + 1
            while j < len(order):
                longest = max(longest, len(passages[order[j]]))
                if (j - i + 1) * longest > batch_tokens:
                    break
                j += 1
            rows = order[i:j]
            width = max(len(passages[r]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            for n, r in enumerate(rows):
                ids[n, : len(passages[r])] = torch.tensor(list(passages[r]), dtype=torch.long)
            cache = self._cache_from([prefix], batch=len(rows))
            self.model.model(
                input_ids=ids.to(self.device),
                position_ids=self._positions(p_len, width, len(rows)),
                past_key_values=cache,
                use_cache=True,
            )
            for n, r in enumerate(rows):
                length = len(passages[r])
                keys = torch.stack(
                    [cache.layers[li].keys[n, :, p_len : p_len + length] for li in range(self.num_layers)]
                )
                values = torch.stack(
                    [cache.layers[li].values[n, :, p_len : p_len + length] for li in range(self.num_layers)]
                )
                out[r] = KV(keys.contiguous(), values.contiguous())
            bar.update(len(rows))
            i = j
        bar.close()
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ prefill

    def _check_length(self, total: int) -> None:
        if total > self.max_positions:
            raise InvalidInputError(
                f"the prompt needs {total} positions but the model has {self.max_positions}: use fewer passages (k)"
            )

    @torch.inference_mode()
    def prefill(
        self,
        mode: str,
        question_ids: Sequence[int],
        *,
        passage_ids: Sequence[Sequence[int]] = (),
        prefix: KV | None = None,
        passages: Sequence[KV] | None = None,
        joined: tuple[KV, int, Sequence[int]] | None = None,
        temperature: float | Sequence[float] = 0.9,
        scale: float | Sequence[float] = 1.0,
        max_new_tokens: int = 0,
        positions: str = "shared",
        blend_ratio: float = DEFAULT_BLEND_RATIO,
    ) -> Session:
        """Prefill the question (and, in sequential mode, everything before it).

        The cached modes take the prefix and passage caches either as `prefix` + `passages`, or already
        joined as `joined=(kv, prefix_tokens, passage_lengths)`; missing ones are computed.

        `positions="shared"` (APE) puts every passage at P..P+L-1 and the question at P + max L;
        `"distinct"` re-rotates each passage's cached keys so the passages follow each other as in a
        sequential prompt (question at P + sum L), still encoded independently. `blend` implies distinct
        positions and T = S = 1, and needs `passage_ids` to recompute `blend_ratio` of the passage tokens."""
        if positions not in ("shared", "distinct"):
            raise InvalidInputError("positions must be 'shared' or 'distinct'")
        if mode not in MODES:
            raise InvalidInputError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if not question_ids:
            raise InvalidInputError("the question has no tokens")
        t0 = time.perf_counter()
        q = torch.tensor([list(question_ids)], device=self.device)
        if mode == "sequential":
            ids = list(self.prefix_ids) + [t for p in passage_ids for t in p] + list(question_ids)
            self._check_length(len(ids) + max_new_tokens)
            cache = self._new_cache()
            x = torch.tensor([ids], device=self.device)
            logits = self._forward(x, self._positions(0, len(ids)), cache, None)
            session = Session(
                cache, logits[0, -1].float(), len(ids), None, mode, len(ids) - len(question_ids), 0.0
            )
        else:
            if joined is None:
                prefix = prefix if prefix is not None else self.encode_prefix()
                if passages is None:
                    passages = self.encode_passages(passage_ids, prefix) if passage_ids else []
                lengths = [p.tokens for p in passages]
                joined_keys = torch.cat([prefix.keys, *(p.keys for p in passages)], dim=2)
                joined_values = torch.cat([prefix.values, *(p.values for p in passages)], dim=2)
                joined = (KV(joined_keys, joined_values), prefix.tokens, lengths)
            kv, p_len, lengths = joined
            ctx = sum(lengths)
            start = p_len + max(lengths, default=0)
            keys, values = kv.keys, kv.values
            if mode == "blend":
                positions = "distinct"
                if [len(p) for p in passage_ids] != list(lengths):
                    raise InvalidInputError("blend mode needs the passages' token ids")
            if positions == "distinct" and len(lengths) > 1:
                keys = keys.clone()
                pos = p_len + lengths[0]
                for n in lengths[1:]:
                    keys[:, :, pos : pos + n] = self.shift_keys(keys[:, :, pos : pos + n], pos - p_len)
                    pos += n
                start = p_len + ctx
            if mode == "blend":
                values = values.clone()
                self.blend(keys, values, passage_ids, p_len, blend_ratio)
            cache = self._cache_over(keys, values)
            self._check_length(start + len(question_ids) + max_new_tokens)
            t, s = (temperature, scale) if mode == "ape" else (1.0, 1.0)
            ape = ApeSpec(p_len, p_len + ctx, t, s)
            logits = self._forward(q, self._positions(start, q.shape[1]), cache, ape)
            session = Session(cache, logits[0, -1].float(), start + q.shape[1], ape, mode, p_len + ctx, 0.0)
        session.prefill_ms = (time.perf_counter() - t0) * 1000
        return session

    # ------------------------------------------------------------------ scoring and decoding

    @torch.inference_mode()
    def answer_logprobs(self, session: Session, answer_ids: Sequence[int]) -> list[float]:
        """Log-probability of each answer token given the prefilled prompt (teacher forcing).
        The session's cache is restored afterwards, so decoding can follow."""
        if not answer_ids:
            return []
        first = torch.log_softmax(session.logits, -1)[answer_ids[0]].item()
        if len(answer_ids) == 1:
            return [first]
        length = session.cache.get_seq_length()
        x = torch.tensor([list(answer_ids[:-1])], device=self.device)
        logits = self._forward(
            x, self._positions(session.next_position, x.shape[1]), session.cache, session.ape, 0
        )
        self._truncate(session.cache, length)
        logp = torch.log_softmax(logits[0].float(), -1)
        rest = logp[torch.arange(len(answer_ids) - 1), torch.tensor(list(answer_ids[1:]))]
        return [first, *rest.tolist()]

    def _pick(
        self, logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None, seen: Sequence[int] = ()
    ) -> int:
        if sp.repetition_penalty != 1.0 and seen:
            logits = logits.clone()
            idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
            picked = logits[idx]
            logits[idx] = torch.where(
                picked > 0, picked / sp.repetition_penalty, picked * sp.repetition_penalty
            )
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

    @torch.inference_mode()
    def stream(self, session: Session, sampling: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Decode from a prefilled session, yielding text deltas; the last event has finish_reason
        and stats (tokens, decode time)."""
        sp = sampling or SamplingParams()
        gen = None
        if sp.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(sp.seed if sp.seed is not None else int.from_bytes(os.urandom(4), "little"))
        stops = [s for s in sp.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        ids: list[int] = []
        emitted = ""
        logits = session.logits
        position = session.next_position
        t0 = time.perf_counter()
        finish = "length"
        forwards = 0
        for step in range(sp.max_new_tokens):
            tok = self._pick(logits, sp, gen, ids)
            if tok in self.stop_ids:
                finish = "stop"
                break
            ids.append(tok)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                if cut > len(emitted):
                    yield TokenEvent(text[len(emitted) : cut], tok)
                emitted = text[:cut]
                finish = "stop"
                break
            ready = text
            if ready.endswith("\ufffd"):  # an unfinished multi-byte character
                ready = ready.rstrip("\ufffd")
            if stops:
                ready = ready[: max(len(emitted), len(ready) - hold)]
            if len(ready) > len(emitted):
                yield TokenEvent(ready[len(emitted) :], tok)
                emitted = ready
            else:
                yield TokenEvent("", tok)
            if step + 1 == sp.max_new_tokens:
                break
            x = torch.tensor([[tok]], device=self.device)
            logits = self._forward(x, self._positions(position, 1), session.cache, session.ape)[0, -1].float()
            position += 1
            forwards += 1
        if finish != "stop":
            text = self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
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
        pieces = [(None, p) if isinstance(p, str) else p for p in passages]
        ids = [self.passage_ids(text, title) for title, text in pieces]
        sp = sampling or SamplingParams()
        session = self.prefill(
            mode,
            self.question_ids(question),
            passage_ids=ids,
            temperature=temperature,
            scale=scale,
            max_new_tokens=sp.max_new_tokens,
        )
        if stream:
            return self.stream(session, sp)
        return self.generate(session, sp)[0]

    def generate(self, session: Session, sampling: SamplingParams | None = None) -> tuple[str, dict]:
        """Decode to the end; returns the text and the stats of the last event."""
        for event in self.stream(session, sampling):
            if event.finish_reason is not None:
                return event.stats["text"], {**event.stats, "finish_reason": event.finish_reason}
        raise RuntimeError("decoder ended without a final event")  # pragma: no cover
