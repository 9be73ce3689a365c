"""Token-classification compression (in the manner of LLMLingua-2).

A bidirectional encoder with a token classification head gives every token a probability of "keep"
(softmax over the labels, the `keep_label` column). A word's probability is the mean over its tokens
(tokens are mapped to words through the tokenizer's offset mapping), and the words above the
percentile threshold that meets `rate` are kept. Any checkpoint loadable with
`AutoModelForTokenClassification` from a local folder works, published LLMLingua-2 models included.
Texts longer than the model's positions are cut into windows, each wrapped in the tokenizer's own
special tokens; windows are classified in padded batches.
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
    mean_per_word,
    token_words,
)


class ClassifierCompressor(PromptCompressor):
    """Keeps the words a token classifier marks "keep" with the highest probability."""

    name = "classifier"

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        keep_label: int = 1,
        max_length: int | None = None,
        batch_size: int = 16,
        keep_digits: bool = False,
        force_keep: Iterable[str] = (),
    ):
        super().__init__(keep_digits=keep_digits, force_keep=force_keep)
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ModelNotFoundError(
                f"no token-classification checkpoint at {str(path)!r}: give the folder that holds "
                "config.json, the weights and the tokenizer files"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModelForTokenClassification.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load a token classifier from {str(path)!r}: {exc}") from exc
        if not getattr(self.tokenizer, "is_fast", False):
            raise InvalidInputError("the classifier needs a fast tokenizer (one with offset mappings)")
        labels = int(self.model.config.num_labels)
        if not 0 <= keep_label < labels:
            raise InvalidInputError(f"keep_label must be in [0, {labels - 1}] for this {labels}-label model")
        if batch_size < 1:
            raise InvalidInputError("batch_size must be >= 1")
        self.path = path
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.keep_label = int(keep_label)
        self.batch_size = int(batch_size)
        positions = int(getattr(self.model.config, "max_position_embeddings", 512) or 512)
        if getattr(self.model.config, "model_type", "") in _OFFSET_POSITIONS:
            positions -= 2  # RoBERTa-style position tables start after the padding index
        limit = min(positions, 512)
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_limit, int) and 0 < tok_limit < limit:
            limit = tok_limit
        if max_length is not None:
            limit = min(int(max_length), positions)
        self._prefix, self._suffix = _special_wrapping(self.tokenizer)
        self._lead = len(self._prefix)
        self.max_length = limit
        self._step = limit - len(self._prefix) - len(self._suffix)
        if self._step < 1:
            raise InvalidInputError(f"max_length {limit} leaves no room for text tokens")
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def keep_probabilities(self, texts: Sequence[str]) -> list[tuple[list[tuple[int, int]], list[float]]]:
        """Per text: token offsets and each token's probability of "keep"."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        pieces = []
        for t, ids in enumerate(enc["input_ids"]):
            for s in range(0, len(ids), self._step):
                pieces.append((t, s, list(ids[s : s + self._step])))
        probs = [[0.0] * len(ids) for ids in enc["input_ids"]]
        for b in range(0, len(pieces), self.batch_size):
            batch = pieces[b : b + self.batch_size]
            for (t, s, chunk), values in zip(batch, self._classify(batch), strict=True):
                probs[t][s : s + len(chunk)] = values
        return [([tuple(o) for o in offs], p) for offs, p in zip(enc["offset_mapping"], probs, strict=True)]

    @torch.inference_mode()
    def _classify(self, batch) -> list[list[float]]:
        rows = [[*self._prefix, *chunk, *self._suffix] for _, _, chunk in batch]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        keep = torch.softmax(logits.float(), dim=-1)[..., self.keep_label].cpu()
        return [keep[i, self._lead : self._lead + len(c)].tolist() for i, (_, _, c) in enumerate(batch)]

    def score_words(self, texts: Sequence[str], words: Sequence[Sequence[Word]]) -> list[WordScores]:
        verdicts = []
        for text, ws, (offsets, probs) in zip(texts, words, self.keep_probabilities(texts), strict=True):
            owners = token_words(offsets, char_to_word(text, ws))
            verdicts.append(WordScores(*mean_per_word(owners, probs, len(ws))))
        return verdicts


_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert")


def _special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text ([CLS] ... [SEP],
    <s> ... </s>), found by tokenising a probe with and without them."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for lead in range(len(full) - len(plain) + 1):
        if full[lead : lead + len(plain)] == plain:
            return full[:lead], full[lead + len(plain) :]
    return [], []
