"""Simple statistics for plain text.

The functions here count words, split text into sentences and estimate how
long a text takes to read. They use only regular expressions from the
standard library, so the results are approximate: abbreviations such as
"e.g." may be treated as sentence ends.
"""

import math
import re
from collections import Counter
from typing import List, Tuple

_WORD_RE = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])")

DEFAULT_WORDS_PER_MINUTE = 200


def words(text: str) -> List[str]:
    """Return the words of ``text`` in order, lower-cased.

    A word is a run of letters or digits; inner apostrophes and hyphens are
    kept, so "don't" and "well-known" count as single words. Scripts
    written without spaces, such as Chinese, yield one "word" per run of
    characters between punctuation marks.
    """
    return [w.lower() for w in _WORD_RE.findall(text)]


def word_count(text: str) -> int:
    """Return the number of words in ``text``."""
    return len(words(text))


def most_common_words(text: str, n: int = 5) -> List[Tuple[str, int]]:
    """Return the ``n`` most frequent words with their counts.

    Ties are broken by first appearance in the text.
    """
    return Counter(words(text)).most_common(n)


def sentences(text: str) -> List[str]:
    """Split ``text`` into sentences and return them without outer spaces.

    A sentence ends at ".", "!" or "?" followed by whitespace, or at the
    full-width marks used in Chinese and Japanese. Empty pieces are dropped.
    """
    parts = _SENTENCE_END_RE.split(text.strip())
    return [p.strip() for p in parts if p and p.strip()]


def reading_time_minutes(text: str,
                         words_per_minute: int = DEFAULT_WORDS_PER_MINUTE) -> int:
    """Estimate the reading time of ``text`` in whole minutes.

    The estimate is rounded up, and any non-empty text takes at least one
    minute.

    Raises:
        ValueError: if ``words_per_minute`` is not positive.
    """
    if words_per_minute <= 0:
        raise ValueError("words_per_minute must be positive")
    count = word_count(text)
    return math.ceil(count / words_per_minute) if count else 0


def summary(text: str) -> dict:
    """Return a dictionary with the main statistics of ``text``."""
    sents = sentences(text)
    count = word_count(text)
    return {
        "words": count,
        "sentences": len(sents),
        "avg_words_per_sentence": round(count / len(sents), 1) if sents else 0.0,
        "reading_minutes": reading_time_minutes(text),
    }


if __name__ == "__main__":
    sample = ("Caches make programs faster. A hit is cheap! "
              "Is a miss expensive? Usually, yes.")
    print(sentences(sample))
    print(most_common_words(sample, 3))
    print(summary(sample))
