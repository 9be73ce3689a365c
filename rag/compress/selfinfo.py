"""Self-information compression (in the manner of LLMLingua-1).

A word is worth keeping when a causal LM finds it hard to predict: its score is the sum of the
surprisals -log p(token | previous tokens) of its tokens. Texts are tokenised without special tokens;
long texts are cut into windows of at most `window` tokens, each scored on its own. When the
tokenizer has a BOS token it is put before each window, so every token has a context; otherwise a
window's first token (which has none) gets the mean surprisal of the window's other tokens.
Windows are scored in right-padded batches of at most `batch_tokens` tokens, longest first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from kvrag.errors import InvalidInputError, ModelNotFoundError
from kvrag.rag.compress.base import (
    PromptCompressor,
    Word,
    WordScores,
    char_to_word,
    fill_missing,
    token_words,
)


class SelfInfoCompressor(PromptCompressor):
    """Keeps the words a causal LM finds most surprising.

    Give a `generator` (its `.model`, `.tokenizer` and `.device` are used), or a `model` (a loaded HF
    causal LM or a local path / model id) with an optional `tokenizer`. `use_bos` forces the BOS choice
    (None: prepend BOS when the tokenizer has one)."""

    name = "selfinfo"

    def __init__(
        self,
        model=None,
        tokenizer=None,
        *,
        generator=None,
        device: str | torch.device | None = None,
        window: int = 512,
        batch_tokens: int = 4096,
        use_bos: bool | None = None,
        keep_digits: bool = False,
        force_keep: Iterable[str] = (),
    ):
        super().__init__(keep_digits=keep_digits, force_keep=force_keep)
        if generator is not None:
            model = generator.model if model is None else model
            tokenizer = generator.tokenizer if tokenizer is None else tokenizer
            device = generator.device if device is None else device
        if model is None:
            raise InvalidInputError("selfinfo needs a generator or a causal LM (model=...)")
        if isinstance(model, str | Path):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
                model = AutoModelForCausalLM.from_pretrained(str(model))
            except OSError as exc:
                raise ModelNotFoundError(f"cannot load causal LM {str(model)!r}: {exc}") from exc
            model.eval()
        if tokenizer is None:
            raise InvalidInputError("selfinfo needs the model's tokenizer (tokenizer=...)")
        if not getattr(tokenizer, "is_fast", False):
            raise InvalidInputError("selfinfo needs a fast tokenizer (one with offset mappings)")
        if window < 2:
            raise InvalidInputError("window must be at least 2 tokens")
        if batch_tokens < window:
            raise InvalidInputError("batch_tokens must be at least window")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.window = int(window)
        self.batch_tokens = int(batch_tokens)
        bos = tokenizer.bos_token_id
        if use_bos is None:
            use_bos = bos is not None
        if use_bos and bos is None:
            raise InvalidInputError("use_bos=True but the tokenizer has no BOS token")
        self.bos_id = bos if use_bos else None
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)

    def token_surprisals(
        self, texts: Sequence[str]
    ) -> list[tuple[list[int], list[tuple[int, int]], list[float]]]:
        """Per text: token ids, offsets and the surprisal (nats) of each token."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        step = self.window - (1 if self.bos_id is not None else 0)
        pieces = []  # (text index, first token, ids with BOS if any)
        for t, ids in enumerate(enc["input_ids"]):
            for s in range(0, len(ids), step):
                chunk = list(ids[s : s + step])
                if self.bos_id is not None:
                    chunk = [self.bos_id, *chunk]
                pieces.append((t, s, chunk))
        surprisal = [[0.0] * len(ids) for ids in enc["input_ids"]]
        for batch in self._batches(pieces):
            for (t, s, _chunk), values in zip(batch, self._score(batch), strict=True):
                if self.bos_id is not None:
                    values = values[1:]  # surprisal of each real token given the BOS and what precedes
                else:
                    rest = values[1:]
                    values = [sum(rest) / len(rest) if rest else 0.0, *rest]
                surprisal[t][s : s + len(values)] = values
        return [
            (list(ids), [tuple(o) for o in offs], sur)
            for ids, offs, sur in zip(enc["input_ids"], enc["offset_mapping"], surprisal, strict=True)
        ]

    def _batches(self, pieces):
        ordered = sorted(pieces, key=lambda p: -len(p[2]))
        batch: list = []
        for piece in ordered:
            if batch and len(batch[0][2]) * (len(batch) + 1) > self.batch_tokens:
                yield batch
                batch = []
            batch.append(piece)
        if batch:
            yield batch

    @torch.inference_mode()
    def _score(self, batch) -> list[list[float]]:
        """Surprisal of each position of each chunk (position 0 gets 0: it has no context)."""
        longest = max(len(c) for _, _, c in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, (_, _, chunk) in enumerate(batch):
            ids[row, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            mask[row, : len(chunk)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        out = []
        for row, (_, _, chunk) in enumerate(batch):
            n = len(chunk)
            if n < 2:
                out.append([0.0] * n)
                continue
            logp = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)
            picked = -logp.gather(1, ids[row, 1:n].unsqueeze(1)).squeeze(1)
            out.append([0.0, *picked.cpu().tolist()])
        return out

    def score_words(self, texts: Sequence[str], words: Sequence[Sequence[Word]]) -> list[WordScores]:
        verdicts = []
        for text, ws, (_ids, offsets, sur) in zip(texts, words, self.token_surprisals(texts), strict=True):
            owners = token_words(offsets, char_to_word(text, ws))
            scores: list[float | None] = [None] * len(ws)
            counts = [0] * len(ws)
            for w, value in zip(owners, sur, strict=True):
                if w < 0:
                    continue
                scores[w] = (scores[w] or 0.0) + value
                counts[w] += 1
            verdicts.append(WordScores(fill_missing(scores), counts))
        return verdicts
