"""Lexical search (BM25 via bm25s) and reciprocal rank fusion with dense results.

Tokenisation is language-neutral by default (lower-cased word characters, no stop words, no
stemming) so the same index serves every language; a Snowball stemmer and stop-word list can be
chosen per collection when its text is in one known language.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvrag.atomic import fsync_dir, write_json
from kvrag.errors import CorruptIndexError, InvalidInputError

RRF_K = 60
# languages with both a Snowball stemmer and a bm25s stop-word list (bm25s takes these names)
STOPWORD_LANGUAGES = frozenset(
    {"danish", "dutch", "english", "french", "german", "italian", "norwegian", "portuguese"}
    | {"russian", "spanish", "swedish", "turkish"}
)
META = "bm25.json"
IDS = "ids.npy"
FORMAT_VERSION = 2
_GENERATION = re.compile(r"gen\.\d+")
_TEMP = re.compile(r"\.(gen\.\d+|bm25\.json|bm25_ids\.npy)\..+\.tmp")
_LEGACY_IDS, _LEGACY_BM25S = "bm25_ids.npy", "bm25s"


class BM25Index:
    """A bm25s index over passages whose positions map to caller ids."""

    def __init__(self, language: str | None = None):
        self.language = language
        self.ids = np.zeros(0, dtype=np.int64)
        self.generation = 0
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

        stopwords = self.language if self.language in STOPWORD_LANGUAGES else None
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
        """Write a new generation into `folder`, crash-safely: the bm25s files and the id map are
        written to a temporary folder, fsynced and renamed to `gen.G`, then `bm25.json` (the commit
        point) is atomically replaced to name it; a kill at any point leaves the previous generation
        readable. Older generations (and the single-folder layout of earlier versions) are removed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        old = _read_meta(folder)
        gen = max(self.generation, int(old.get("generation", 0)) if old else 0) + 1
        tmp = Path(tempfile.mkdtemp(prefix=f".gen.{gen}.", suffix=".tmp", dir=folder))
        try:
            if self._retriever is not None:
                self._retriever.save(str(tmp / "bm25s"), show_progress=False)
            np.save(tmp / IDS, self.ids, allow_pickle=False)
            _fsync_tree(tmp)
            final = folder / f"gen.{gen}"
            if final.exists():  # left by a save killed before its commit point: nothing refers to it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(folder)
        write_json(
            folder / META,
            {
                "format_version": FORMAT_VERSION,
                "language": self.language,
                "count": len(self.ids),
                "generation": gen,
                "folder": final.name,
            },
        )  # the commit point
        for stale in folder.iterdir():
            if stale.name in (META, final.name):
                continue
            # older generations, saves killed half-way, and the in-place files of earlier versions
            name = stale.name
            if _GENERATION.fullmatch(name) or _TEMP.fullmatch(name) or name in (_LEGACY_IDS, _LEGACY_BM25S):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        fsync_dir(folder)
        self.generation = gen

    @staticmethod
    def saved_ids(folder: str | Path) -> np.ndarray | None:
        """The passage ids of the index saved in `folder`, read without loading bm25s (a cheap check
        against the store); None when there is none or it cannot be read."""
        try:
            meta, ids_path, _ = _committed(Path(folder))
            return _read_ids(ids_path, meta)
        except (CorruptIndexError, OSError):
            return None

    @classmethod
    def load(cls, folder: str | Path) -> BM25Index:
        """Open a saved index; raises CorruptIndexError when its files are unreadable or disagree
        (the count in bm25.json, the id map and the bm25s corpus size): rebuild it from the store."""
        import bm25s

        folder = Path(folder)
        try:
            meta, ids_path, bm25s_path = _committed(folder)
            self = cls(meta.get("language"))
            self.generation = int(meta.get("generation", 0))
            self.ids = _read_ids(ids_path, meta)
            if len(self.ids):
                self._retriever = bm25s.BM25.load(str(bm25s_path), show_progress=False)
                num_docs = self._retriever.scores.get("num_docs")
                if num_docs != len(self.ids):
                    raise ValueError(f"bm25s holds {num_docs} passages, the id map {len(self.ids)}")
        except CorruptIndexError:
            raise
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            raise CorruptIndexError(
                f"BM25 index at {folder} is unreadable ({exc}): re-run `kvrag index`"
            ) from exc
        return self


def _read_meta(folder: Path) -> dict | None:
    """bm25.json, or None when it is absent or unreadable."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _committed(folder: Path) -> tuple[dict, Path, Path]:
    """(bm25.json, the id map and the bm25s folder it names); FileNotFoundError when there is none."""
    meta = _read_meta(folder)
    if meta is None:
        if not (folder / META).exists():
            raise FileNotFoundError(f"no BM25 index at {folder}")
        raise CorruptIndexError(f"{folder / META} is unreadable: re-run `kvrag index`")
    if "generation" not in meta:  # the layout of earlier versions, written in place
        return meta, folder / _LEGACY_IDS, folder / _LEGACY_BM25S
    name = str(meta.get("folder"))
    if meta.get("format_version") != FORMAT_VERSION or not _GENERATION.fullmatch(name):
        raise CorruptIndexError(f"{folder / META} has an unknown format: re-run `kvrag index`")
    return meta, folder / name / IDS, folder / name / "bm25s"


def _read_ids(path: Path, meta: dict) -> np.ndarray:
    """The id map at `path`, checked against the count in bm25.json."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise CorruptIndexError(f"BM25 id map {path} is unreadable ({exc})") from exc
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) != meta.get("count"):
        raise CorruptIndexError(
            f"BM25 id map {path} holds {len(ids)} ids, bm25.json says {meta.get('count')}"
        )
    return ids.astype(np.int64, copy=False)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            fsync_dir(path)
    fsync_dir(folder)


def rrf(rankings: Sequence[Sequence[int]], k: int, *, c: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (c + rank of d), ranks from 1."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, pid in enumerate(ranking, start=1):
            if pid >= 0:
                scores[pid] = scores.get(pid, 0.0) + 1.0 / (c + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]
