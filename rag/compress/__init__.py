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
DEFAULT_CLASSIFIER = "bundled:compressor-e5-small"


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


def compression_source(method: str, path: str | None, generator_spec: str) -> str:
    """What a collection records as the source of its compressed texts, from the user's options:
    the compressor model (a bundled spec as is, a folder resolved), or for `selfinfo` without a
    model the generator's spec. `open_from_source` opens a compressor from it anywhere."""
    from pathlib import Path

    if method not in METHODS:
        raise InvalidInputError(f"unknown compression method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "selfinfo" and path is None:
        return generator_spec
    spec = path if path is not None else DEFAULT_CLASSIFIER
    return spec if spec.startswith("bundled:") else str(Path(spec).expanduser().resolve())


def open_from_source(
    method: str, source: str, *, models_dir, device: str = "cpu", generator=None
) -> PromptCompressor:
    """The compressor a collection's recorded (method, source) names: `selfinfo` over `generator`'s
    model when the source is that generator's spec, else over the model folder; `classifier` from
    its (bundled or local) checkpoint folder."""
    if method == "selfinfo":
        if generator is not None and source == generator.spec:
            return open_compressor(method, generator=generator)
        if source.startswith("bundled:"):
            from kvrag.rag.generation.bundled import resolve_generator

            return open_compressor(method, model=str(resolve_generator(source, models_dir)))
        return open_compressor(method, model=source)
    if method == "classifier":
        where = source
        if source.startswith("bundled:"):
            from kvrag.rag.compress.bundled import resolve_compressor

            where = resolve_compressor(source, models_dir)
        return open_compressor(method, path=where, device=device)
    raise InvalidInputError(f"unknown compression method {method!r}: choose one of {', '.join(METHODS)}")


__all__ = [
    "METHODS",
    "DEFAULT_CLASSIFIER",
    "ClassifierCompressor",
    "PromptCompressor",
    "SelfInfoCompressor",
    "Word",
    "WordScores",
    "check_rate",
    "compression_source",
    "join_words",
    "open_compressor",
    "open_from_source",
    "select_words",
    "split_words",
]
