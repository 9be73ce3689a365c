"""Lexical search (BM25 via bm25s) and reciprocal rank fusion with dense results.

Tokenisation is language-neutral by default (lower-cased word characters, no stop words, no
stemming) so the same index serves every language; a Snowball stemmer and stop-word list can be
chosen per collection when its text is in one known language.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from encoders.errors import CorruptIndexError, InvalidInputError
from index.atomic import write_json, write_npy

RRF_K = 60


class BM25Index:
    """A bm25s index over passages whose positions map to caller ids."""

    def __init__(self, language: str | None = None):
        self.language = language
        self.ids = np.zeros(0, dtype=np.int64)
        self._retriever = None

    def _stemmer(self):
        if not self.language:
            return None
        try:
            import Stemmer
        except ImportError as exc:
            raise InvalidInputError("BM25 stemming needs PyStemmer: pip install 'kvrag[stem]'") from exc
        return Stemmer.Stemmer(self.language)

    def _tokenize(self, texts: Sequence[str]):
        import bm25s

        stopwords = (
            self.language[:2]
            if self.language
            in {"english", "german", "french", "spanish", "italian", "portuguese", "dutch", "swedish"}
            else None
        )
        return bm25s.tokenize(list(texts), stopwords=stopwords, stemmer=self._stemmer(), show_progress=False)

    def build(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        """(Re)build over the given passages; bm25s has no incremental add, and a rebuild is fast."""
        import bm25s

        self.ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            self._retriever = None
            return
        self._retriever = bm25s.BM25()
        self._retriever.index(self._tokenize(texts), show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; -1 ids where fewer than k passages match any query word."""
        n = len(queries)
        out_s, out_i = np.zeros((n, k), np.float32), np.full((n, k), -1, np.int64)
        if self._retriever is None or n == 0:
            return out_s, out_i
        kk = min(k, len(self.ids))
        docs, scores = self._retriever.retrieve(
            self._tokenize(queries), k=kk, show_progress=False, n_threads=1
        )
        for i in range(n):
            hit = scores[i] > 0
            m = int(hit.sum())
            out_i[i, :m] = self.ids[docs[i][hit]]
            out_s[i, :m] = scores[i][hit]
        return out_s, out_i

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self._retriever is not None:
            self._retriever.save(str(folder / "bm25s"))
        write_npy(folder / "bm25_ids.npy", self.ids)
        write_json(folder / "bm25.json", {"language": self.language, "count": len(self.ids)})

    @classmethod
    def load(cls, folder: str | Path) -> BM25Index:
        import bm25s

        folder = Path(folder)
        try:
            meta = json.loads((folder / "bm25.json").read_text())
            self = cls(meta.get("language"))
            self.ids = np.load(folder / "bm25_ids.npy", allow_pickle=False)
            if len(self.ids):
                self._retriever = bm25s.BM25.load(str(folder / "bm25s"))
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptIndexError(
                f"BM25 index at {folder} is unreadable ({exc}): re-run `kvrag index`"
            ) from exc
        return self


def rrf(rankings: Sequence[Sequence[int]], k: int, *, c: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (c + rank of d), ranks from 1."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, pid in enumerate(ranking, start=1):
            if pid >= 0:
                scores[pid] = scores.get(pid, 0.0) + 1.0 / (c + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]
