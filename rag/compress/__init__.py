"""Prompt compression: passages shortened by dropping their least useful words before their KV is
computed. Two methods behind one interface (`PromptCompressor.compress(texts, *, rate)`):

- `selfinfo`: words a causal LM finds most surprising are kept (the generator's model by default);
- `classifier`: a token-classification encoder marks each token keep/drop (any checkpoint in a folder).
"""

from __future__ import annotations

from kvrag.errors import InvalidInputError
from kvrag.rag.compress.base import (
    PromptCompressor,
    Word,
    WordScores,
    check_rate,
    join_words,
    select_words,
    split_words,
)
from kvrag.rag.compress.classifier import ClassifierCompressor
from kvrag.rag.compress.selfinfo import SelfInfoCompressor

METHODS = ("selfinfo", "classifier")


def open_compressor(method: str, **options) -> PromptCompressor:
    """A compressor by name. `selfinfo` takes `generator=` or `model=` (+ `tokenizer=`); `classifier`
    takes `path=` (a folder with a token-classification checkpoint). Both take `keep_digits` and
    `force_keep`; see each class for the rest."""
    if method == "selfinfo":
        return SelfInfoCompressor(**options)
    if method == "classifier":
        if "path" not in options:
            raise InvalidInputError(
                "the classifier compressor needs path= (a token-classification checkpoint folder)"
            )
        return ClassifierCompressor(**options)
    raise InvalidInputError(f"unknown compression method {method!r}: choose one of {', '.join(METHODS)}")


__all__ = [
    "METHODS",
    "ClassifierCompressor",
    "PromptCompressor",
    "SelfInfoCompressor",
    "Word",
    "WordScores",
    "check_rate",
    "join_words",
    "open_compressor",
    "select_words",
    "split_words",
]
