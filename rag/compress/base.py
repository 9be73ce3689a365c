"""The prompt-compressor interface and the word-level machinery every method shares.

A compressor scores words, never tokens on their own: a passage is split into words, each word gets a
score (how much it is worth keeping) and a token count (under the compressor's own tokenizer), and the
best-scoring words are kept until the kept tokens reach `rate` times the passage's tokens. Kept words
stay in their original order, joined by the original separators, so no word is ever cut in half.

Word rule (the same for every language, no stop lists and no language-specific tokenisation):

- words are separated by Unicode whitespace (`str.isspace`), so punctuation stays attached to the word
  it touches ("Paris," is one word);
- characters of scripts written without spaces between words (Han, Hiragana, Katakana, CJK
  punctuation, Thai, Lao, Khmer, Myanmar) are each a word of their own, together with any combining
  marks (Unicode category M*) that follow them; a run of other characters next to them ("Python" in
  "我用Python编程") is a separate word.
"""

from __future__ import annotations

import math
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvrag.errors import InvalidInputError

# Code point ranges of scripts written without spaces: every character there is one word.
_NO_SPACE_RANGES = (
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3001, 0x303F),  # CJK symbols and punctuation (U+3000, the ideographic space, is whitespace)
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK unified ideographs, extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF01, 0xFF0F),  # fullwidth punctuation
    (0xFF1A, 0xFF20),
    (0xFF3B, 0xFF40),
    (0xFF5B, 0xFF65),
    (0xFF66, 0xFF9F),  # halfwidth Katakana
    (0x20000, 0x3FFFF),  # CJK unified ideographs, extensions B and later
)


def is_no_space_char(ch: str) -> bool:
    """True for a character of a script written without spaces between words."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _NO_SPACE_RANGES)


@dataclass(frozen=True)
class Word:
    """A word as a span of its text: `text[start:end]`. `cluster` marks a no-space-script character."""

    start: int
    end: int
    cluster: bool = False


def split_words(text: str) -> list[Word]:
    """Split `text` into words by the rule in the module docstring."""
    words: list[Word] = []
    start = -1  # start of the open run of spaced-script characters, -1 when none is open
    for i, ch in enumerate(text):
        if ch.isspace():
            if start >= 0:
                words.append(Word(start, i))
                start = -1
        elif (
            start < 0
            and words
            and words[-1].cluster
            and words[-1].end == i
            and unicodedata.category(ch).startswith("M")
        ):
            last = words[-1]
            words[-1] = Word(last.start, i + 1, cluster=True)  # a combining mark stays with its base
        elif is_no_space_char(ch):
            if start >= 0:
                words.append(Word(start, i))
                start = -1
            words.append(Word(i, i + 1, cluster=True))
        elif start < 0:
            start = i
    if start >= 0:
        words.append(Word(start, len(text)))
    return words


def check_rate(rate: object) -> float:
    """The kept fraction of tokens, validated: a finite number in (0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise InvalidInputError(
            f"rate must be a number in (0, 1] (the fraction of tokens to keep), got {rate!r}"
        )
    value = float(rate)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise InvalidInputError(
            f"rate must be in (0, 1] (the fraction of tokens to keep, e.g. 0.5 keeps half), got {rate!r}"
        )
    return value


def select_words(
    scores: Sequence[float],
    token_counts: Sequence[int],
    rate: float,
    forced: Sequence[bool] | None = None,
) -> list[bool]:
    """Which words to keep: forced words always, then the highest-scoring others until the kept tokens
    reach `rate` x the total. The word that crosses the target is kept when that lands closer to the
    target than stopping short, so the kept count is within one word's tokens of the target. At least
    one word is kept. Ties go to the earlier word."""
    n = len(scores)
    if len(token_counts) != n or (forced is not None and len(forced) != n):
        raise ValueError("scores, token_counts and forced must have one entry per word")
    if n == 0:
        return []
    keep = [bool(f) for f in forced] if forced is not None else [False] * n
    total = sum(token_counts)
    target = rate * total
    kept = sum(c for c, k in zip(token_counts, keep, strict=True) if k)
    order = sorted((i for i in range(n) if not keep[i]), key=lambda i: (-scores[i], i))
    for i in order:
        if kept >= target and any(keep):
            break
        count = token_counts[i]
        if kept + count > target and any(keep) and (kept + count - target) > (target - kept):
            break
        keep[i] = True
        kept += count
    return keep


def join_words(text: str, words: Sequence[Word], keep: Sequence[bool]) -> str:
    """The kept words in their original order with the original separators.

    Between two kept words that were neighbours the original separator is used as is. Where words were
    dropped between them, the separator with the most line breaks among the dropped stretch is used
    (so paragraph breaks survive), the last one on a tie; two spaced-script words never end up glued
    together even when the words that separated them had no spaces (dropped CJK characters)."""
    if not words:
        return text
    if all(keep):
        return text
    out = [text[: words[0].start]]
    prev = -1
    for j, word in enumerate(words):
        if not keep[j]:
            continue
        if prev >= 0:
            seps = [text[words[m - 1].end : words[m].start] for m in range(prev + 1, j + 1)]
            sep = seps[-1]
            for s in seps:
                if s.count("\n") > sep.count("\n"):
                    sep = s
            if sep == "" and not words[prev].cluster and not word.cluster:
                sep = " "
            out.append(sep)
        out.append(text[word.start : word.end])
        prev = j
    out.append(text[words[-1].end :])
    return "".join(out)


def _strip_punctuation(word: str) -> str:
    start, end = 0, len(word)
    while start < end and unicodedata.category(word[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(word[end - 1]).startswith("P"):
        end -= 1
    return word[start:end]


@dataclass
class WordScores:
    """A compressor's verdict on one text: a score and a token count per word (same order as the words)."""

    scores: list[float]
    token_counts: list[int]


def char_to_word(text: str, words: Sequence[Word]) -> list[int]:
    """For each character of `text`, the index of the word it belongs to, -1 for whitespace."""
    index = [-1] * len(text)
    for w, word in enumerate(words):
        for c in range(word.start, word.end):
            index[c] = w
    return index


def token_words(offsets: Sequence[tuple[int, int]], index: Sequence[int]) -> list[int]:
    """Map tokens to words through a tokenizer's offset mapping: a token belongs to the word of its
    first non-whitespace character (a token that spans two words is counted in the first); -1 for
    tokens with no characters (special tokens) or only whitespace."""
    out = []
    for start, end in offsets:
        word = -1
        for c in range(start, min(end, len(index))):
            if index[c] >= 0:
                word = index[c]
                break
        out.append(word)
    return out


class PromptCompressor(ABC):
    """Shortens passages by dropping their least useful words.

    `compress(texts, *, rate)` returns one string per text keeping about `rate` of its tokens (under the
    compressor's tokenizer). Options, fixed per compressor and overridable per call:

    - `keep_digits`: always keep any word that contains a digit (numbers, dates, codes);
    - `force_keep`: words that are always kept, compared case-insensitively after stripping leading
      and trailing punctuation (an entry with several words force-keeps each of them).

    Empty or whitespace-only texts, and every text at rate 1, come back unchanged.
    """

    name: str = "base"

    def __init__(self, *, keep_digits: bool = False, force_keep: Iterable[str] = ()):
        self.keep_digits = bool(keep_digits)
        self.force_keep = _normalise_force_keep(force_keep)

    @abstractmethod
    def score_words(self, texts: Sequence[str], words: Sequence[Sequence[Word]]) -> list[WordScores]:
        """Scores and token counts for the words of each text (texts are non-empty, batched by the caller)."""

    def compress(
        self,
        texts: Sequence[str],
        *,
        rate: float,
        keep_digits: bool | None = None,
        force_keep: Iterable[str] | None = None,
    ) -> list[str]:
        rate = check_rate(rate)
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise InvalidInputError(f"texts must be strings, got {type(t).__name__}")
        results = list(texts)
        todo = [i for i, t in enumerate(texts) if t.strip()]
        if rate >= 1.0 or not todo:
            return results
        digits = self.keep_digits if keep_digits is None else bool(keep_digits)
        listed = self.force_keep if force_keep is None else _normalise_force_keep(force_keep)
        words = [split_words(texts[i]) for i in todo]
        verdicts = self.score_words([texts[i] for i in todo], words)
        for i, ws, verdict in zip(todo, words, verdicts, strict=True):
            text = texts[i]
            forced = [_is_forced(text[w.start : w.end], digits, listed) for w in ws]
            keep = select_words(verdict.scores, verdict.token_counts, rate, forced)
            results[i] = join_words(text, ws, keep)
        return results


def _normalise_force_keep(entries: Iterable[str]) -> frozenset[str]:
    if isinstance(entries, str):
        entries = [entries]
    out = set()
    for entry in entries:
        for w in split_words(str(entry)):
            key = _strip_punctuation(entry[w.start : w.end]).casefold()
            if key:
                out.add(key)
    return frozenset(out)


def _is_forced(word: str, digits: bool, listed: frozenset[str]) -> bool:
    if digits and any(ch.isdigit() for ch in word):
        return True
    return bool(listed) and _strip_punctuation(word).casefold() in listed


def mean_per_word(
    owners: Sequence[int], values: Sequence[float], n_words: int
) -> tuple[list[float], list[int]]:
    """Per word, the mean of its tokens' values (words without a token get the mean of the others) and
    its token count; `owners` maps each token to its word (-1: none)."""
    sums = [0.0] * n_words
    counts = [0] * n_words
    for w, v in zip(owners, values, strict=True):
        if w >= 0:
            sums[w] += v
            counts[w] += 1
    means: list[float | None] = [s / c if c else None for s, c in zip(sums, counts, strict=True)]
    return fill_missing(means), counts


def fill_missing(scores: list[float | None]) -> list[float]:
    """Words the tokenizer gave no token get the mean score of the others (0 when there are none)."""
    known = [s for s in scores if s is not None]
    mean = sum(known) / len(known) if known else 0.0
    return [mean if s is None else s for s in scores]
