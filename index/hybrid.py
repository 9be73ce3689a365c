"""Lexical search (BM25) and reciprocal rank fusion with dense results.

Tokenisation is language-neutral by default (lower-cased word characters, no stop words, no
stemming) so the same index serves every language; a Snowball stemmer and stop-word list can be
chosen per collection when its text is in one known language. Texts are tokenised by bm25s.

Incremental updates. bm25s precomputes every (term, passage) score, which depends on the corpus
size, the document frequency of the term and the mean passage length, so it cannot take a passage
without a full rebuild: O(N) for a write of one document. This index keeps term frequencies instead,
in segments (`Segment`): passages indexed together, with postings by term. `update` indexes the new
passages as one small segment and marks the deleted ones dead; a search computes the Lucene BM25
score of bm25s (k1 = 1.5, b = 0.75, idf = log(1 + (N - df + 0.5) / (df + 0.5))) from the live
passages' totals at query time, the same floating-point operations in the same order as bm25s, so
the scores are those a fresh build over the live passages gives, not an approximation. Segments are
merged as they pile up: the newest two while the older is no larger (so there are O(log n) of
them), and all into one (dropping dead passages) once the segments after the first outgrow a
fraction of it (`Merging`), which amortises that O(N) merge over many writes.

On disk (format 3) each segment is an immutable folder `gen.G` (G: the generation that wrote it)
holding `segment.npz`; a segment also lists the ids deleted from the segments before it when it was
made (its tombstones), so a save writes only the new segments and `bm25.json` (the commit point,
replaced atomically), which names the segments in order. Indexes of the earlier layouts (format 2,
one bm25s folder `gen.G`, and the in-place layout before it) still load and search; they cannot be
updated (`incremental` is False: the owner rebuilds them from its passages).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
K1, B = 1.5, 0.75  # bm25s's defaults (its "lucene" method), which earlier versions searched with
META = "bm25.json"
IDS = "ids.npy"
SEGMENT = "segment.npz"
FORMAT_VERSION = 3
BM25S_VERSION = 2  # one bm25s folder per generation
_GENERATION = re.compile(r"gen\.\d+(\.\d+)?")
_TEMP = re.compile(r"\.(gen\.\d+|bm25\.json|bm25_ids\.npy)\..+\.tmp")
_LEGACY_IDS, _LEGACY_BM25S = "bm25_ids.npy", "bm25s"
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


@dataclass(frozen=True)
class Merging:
    """When all segments merge into one: once the passages and tombstones of the segments after the
    first outnumber `fraction` of the first segment's passages (and `min_docs`)."""

    fraction: float = 0.1
    min_docs: int = 256

    def due(self, tail: int, base: int) -> bool:
        return tail > max(self.min_docs, self.fraction * base)


class Segment:
    """Passages indexed together: their ids and token counts, postings by term (CSR: the postings of
    term t are `docs[indptr[t]:indptr[t + 1]]`, positions in the segment, with their term
    frequencies `tf`), and the ids deleted from the segments before this one when it was made
    (`tombstones`). Immutable once made, but for `live`: which of its passages are not deleted."""

    def __init__(
        self,
        ids: np.ndarray,
        lengths: np.ndarray,
        terms: list[str],
        indptr: np.ndarray,
        docs: np.ndarray,
        tf: np.ndarray,
        tombstones: np.ndarray,
        name: str | None = None,
    ):
        self.ids, self.lengths, self.terms = ids, lengths, terms
        self.indptr, self.docs, self.tf, self.tombstones = indptr, docs, tf, tombstones
        self.name = name  # its folder, once saved
        self.live = np.ones(len(ids), dtype=bool)
        self._term_of: dict[str, int] | None = None
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def size(self) -> int:
        """What merging this segment costs: its passages and tombstones."""
        return len(self.ids) + len(self.tombstones)

    @classmethod
    def build(
        cls, ids: np.ndarray, tokens: list[list[int]], vocab: dict[str, int], tombstones: np.ndarray
    ) -> Segment:
        """A segment over passages `ids` whose texts tokenised to `tokens` (term numbers of `vocab`)."""
        n = len(ids)
        lengths = np.fromiter(map(len, tokens), dtype=np.int32, count=n)
        terms = [""] * len(vocab)
        for term, number in vocab.items():
            terms[number] = term
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int64, count=total)
        doc = np.repeat(np.arange(n, dtype=np.int64), lengths)
        # one posting per (term, passage), sorted by term then passage, with its count
        key, tf = np.unique(flat * max(n, 1) + doc, return_counts=True)
        term, pos = np.divmod(key, max(n, 1))
        indptr = np.zeros(len(terms) + 1, dtype=np.int64)
        np.cumsum(np.bincount(term, minlength=len(terms)), out=indptr[1:])
        return cls(ids, lengths, terms, indptr, pos.astype(np.int32), tf.astype(np.int32), tombstones)

    @classmethod
    def merged(cls, segments: Sequence[Segment], *, keep_tombstones: bool) -> Segment:
        """One segment holding the live passages of `segments` (consecutive, in order). Their
        tombstones are kept unless the merge starts at the first segment (nothing is before it)."""
        term_of: dict[str, int] = {}
        ids, lengths, terms, docs, tfs = [], [], [], [], []
        offset = 0
        for s in segments:
            new_pos = np.full(len(s.ids), -1, dtype=np.int64)
            new_pos[s.live] = offset + np.arange(int(s.live.sum()))
            remap = np.fromiter(
                (term_of.setdefault(t, len(term_of)) for t in s.terms), dtype=np.int64, count=len(s.terms)
            )
            pos = new_pos[s.docs]
            keep = pos >= 0
            terms.append(np.repeat(remap, np.diff(s.indptr))[keep])
            docs.append(pos[keep])
            tfs.append(s.tf[keep])
            ids.append(s.ids[s.live])
            lengths.append(s.lengths[s.live])
            offset += int(s.live.sum())
        term = np.concatenate(terms) if terms else np.zeros(0, dtype=np.int64)
        order = np.argsort(term, kind="stable")  # by term; passages stay in order within a term
        counts = np.bincount(term, minlength=len(term_of))
        used = counts > 0  # terms that only dead passages held are dropped (they have no postings)
        vocab = [t for t, u in zip(term_of, used.tolist(), strict=True) if u]
        indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
        np.cumsum(counts[used], out=indptr[1:])
        stones = (
            np.unique(np.concatenate([s.tombstones for s in segments]))
            if keep_tombstones
            else np.zeros(0, dtype=np.int64)
        )
        return cls(
            np.concatenate(ids).astype(np.int64),
            np.concatenate(lengths).astype(np.int32),
            vocab,
            indptr,
            np.concatenate(docs)[order].astype(np.int32),
            np.concatenate(tfs)[order].astype(np.int32),
            stones.astype(np.int64),
        )

    def term(self, term: str) -> int | None:
        """The number of `term` in this segment, None when no passage of it holds the term."""
        if self._term_of is None:
            self._term_of = {t: i for i, t in enumerate(self.terms)}
        return self._term_of.get(term)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of the live passages among `ids` (others are left out)."""
        if self._sorted is None:
            order = np.argsort(self.ids, kind="stable")
            self._sorted = (self.ids[order], order)
        keys, order = self._sorted
        at = np.searchsorted(keys, ids)
        found = at < len(keys)
        found[found] = keys[at[found]] == ids[found]
        pos = order[at[found]]
        return pos[self.live[pos]]

    # -- persistence ----------------------------------------------------------------------------
    def write(self, folder: Path) -> None:
        """Write the segment as `folder/segment.npz` (terms joined by NUL, which no token holds)."""
        blob = "\x00".join(self.terms).encode("utf-8")
        np.savez(
            folder / SEGMENT,
            ids=self.ids,
            lengths=self.lengths,
            indptr=self.indptr,
            docs=self.docs,
            tf=self.tf,
            terms=np.frombuffer(blob, dtype=np.uint8),
            tombstones=self.tombstones,
        )

    @classmethod
    def read(cls, folder: Path, name: str, *, postings: bool = True) -> Segment:
        """The segment saved in `folder/name`; with `postings` False only its ids and tombstones
        (enough to tell which passages are live). ValueError when its arrays disagree."""
        with np.load(folder / name / SEGMENT, allow_pickle=False) as z:
            ids = z["ids"].astype(np.int64, copy=False)
            stones = z["tombstones"].astype(np.int64, copy=False)
            if ids.ndim != 1 or stones.ndim != 1:
                raise ValueError(f"segment {name} has malformed id arrays")
            if not postings:
                empty = np.zeros(0, dtype=np.int32)
                return cls(ids, empty, [], np.zeros(1, np.int64), empty, empty, stones, name)
            lengths, indptr, docs, tf = z["lengths"], z["indptr"].astype(np.int64), z["docs"], z["tf"]
            blob = z["terms"].tobytes().decode("utf-8")
        terms = blob.split("\x00") if len(indptr) > 1 else []
        if (
            len(lengths) != len(ids)
            or len(terms) != len(indptr) - 1
            or indptr[0] != 0
            or (np.diff(indptr) < 0).any()
            or indptr[-1] != len(docs)
            or len(tf) != len(docs)
            or (len(docs) and (docs.min() < 0 or docs.max() >= len(ids)))
        ):
            raise ValueError(f"segment {name} is inconsistent")
        return cls(ids, lengths, terms, indptr, docs, tf, stones, name)


def _apply_tombstones(segments: list[Segment]) -> None:
    """Mark dead, in each segment, the passages a later segment's tombstones name."""
    for k, seg in enumerate(segments):
        if len(seg.tombstones):
            for earlier in segments[:k]:
                earlier.live[earlier.positions(seg.tombstones)] = False


class BM25Index:
    """BM25 over passages whose positions map to caller ids, updated in place (see module docstring)."""

    def __init__(self, language: str | None = None):
        self.language = language
        self.generation = 0
        self.merging = Merging()
        self._segments: list[Segment] = []
        self._folder: Path | None = None  # where the named segments are saved
        self._legacy = None  # a bm25s retriever of an earlier layout (with `_legacy_ids`), read-only
        self._legacy_ids = np.zeros(0, dtype=np.int64)
        self._live = 0  # running totals over the live passages: how many, and their tokens
        self._tokens = 0
        self.max_id = -1  # the largest id this index has held (live or not); -1 when none
        self._ids: np.ndarray | None = None  # cached: the live ids
        self._layout: tuple[np.ndarray, np.ndarray] | None = None  # cached: every id, segment offsets

    # -- state ----------------------------------------------------------------------------------
    @property
    def ids(self) -> np.ndarray:
        """The ids of the live passages (in the order they were added, oldest segment first)."""
        if self._legacy is not None:
            return self._legacy_ids
        if self._ids is None:
            live = [s.ids[s.live] for s in self._segments]
            self._ids = np.concatenate(live) if live else np.zeros(0, dtype=np.int64)
        return self._ids

    @property
    def count(self) -> int:
        return len(self._legacy_ids) if self._legacy is not None else self._live

    @property
    def incremental(self) -> bool:
        """Whether `update` works (False for an index of an earlier layout: rebuild it)."""
        return self._legacy is None

    @property
    def segments(self) -> int:
        return len(self._segments)

    def _recount(self) -> None:
        """The running totals, from scratch (after a build or a load)."""
        self._live = sum(int(s.live.sum()) for s in self._segments)
        self._tokens = sum(int(s.lengths[s.live].sum()) for s in self._segments)
        self.max_id = max((int(s.ids.max()) for s in self._segments if len(s.ids)), default=-1)
        self._changed()

    def _changed(self) -> None:
        self._ids = self._layout = None

    # -- tokens ---------------------------------------------------------------------------------
    def _stemmer(self):
        if not self.language:
            return None
        try:
            import Stemmer
        except ImportError as exc:
            raise InvalidInputError("BM25 stemming needs PyStemmer: pip install 'kvrag[stem]'") from exc
        return Stemmer.Stemmer(self.language)

    def _tokenize(self, texts: Sequence[str], *, ids: bool = True):
        """bm25s tokens: (token numbers per text, vocabulary) with `ids`, else the token strings."""
        import bm25s

        stopwords = self.language if self.language in STOPWORD_LANGUAGES else None
        return bm25s.tokenize(
            list(texts), stopwords=stopwords, stemmer=self._stemmer(), return_ids=ids, show_progress=False
        )

    # -- writing --------------------------------------------------------------------------------
    def build(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        """(Re)build over the given passages, as one segment."""
        ids = _id_array(ids, len(texts))
        self._segments, self._legacy, self._legacy_ids = [], None, np.zeros(0, dtype=np.int64)
        self._folder = None
        if len(ids):
            tokens = self._tokenize(texts)
            self._segments = [Segment.build(ids, tokens.ids, tokens.vocab, np.zeros(0, np.int64))]
        self._recount()

    def update(
        self, added_ids: Sequence[int], added_texts: Sequence[str], removed_ids: Sequence[int]
    ) -> None:
        """Delete the passages `removed_ids` (ids not live here are ignored), then add the passages
        `added_ids` with their texts (none may be live after the deletions), as a new segment."""
        if self._legacy is not None:
            raise InvalidInputError("a BM25 index of an earlier layout cannot be updated: rebuild it")
        added = _id_array(added_ids, len(added_texts))
        removed = np.unique(np.asarray(removed_ids, dtype=np.int64).reshape(-1))
        doomed = [(s, s.positions(removed)) for s in self._segments]
        live_added = set(self.live_among(added).tolist()) - set(removed.tolist())
        if live_added:
            raise InvalidInputError(f"ids already present (e.g. {sorted(live_added)[:3]}): remove them first")
        tokens = self._tokenize(added_texts) if len(added) else None
        dead = [s.ids[pos] for s, pos in doomed if len(pos)]
        stones = np.unique(np.concatenate(dead)) if dead else np.zeros(0, dtype=np.int64)
        if not len(added) and not len(stones):
            return
        for s, pos in doomed:
            s.live[pos] = False
            self._live -= len(pos)
            self._tokens -= int(s.lengths[pos].sum())
        if tokens is not None:
            self._segments.append(Segment.build(added, tokens.ids, tokens.vocab, stones))
        else:
            self._segments.append(Segment.build(added, [], {}, stones))
        self._live += len(added)
        self._tokens += int(self._segments[-1].lengths.sum())
        self.max_id = max(self.max_id, int(added.max()) if len(added) else -1)
        self._changed()
        self._merge()

    def live_among(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` are live passages of this index."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._legacy is not None:
            return ids[np.isin(ids, self._legacy_ids)]
        found = [s.ids[s.positions(ids)] for s in self._segments]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def _merge(self) -> None:
        """Merge the newest segments while the older of the two is no larger, then everything once
        the segments after the first outgrow `merging` (see module docstring)."""
        segs = self._segments
        while len(segs) > 2 and segs[-2].size <= segs[-1].size:
            segs[-2:] = [Segment.merged(segs[-2:], keep_tombstones=True)]
            self._changed()
        if len(segs) > 1 and self.merging.due(sum(s.size for s in segs[1:]), len(segs[0].ids)):
            self.compact()

    def compact(self) -> None:
        """Merge every segment into one, dropping the deleted passages and all tombstones."""
        if self._legacy is None and (
            len(self._segments) > 1 or any(not s.live.all() for s in self._segments)
        ):
            self._segments = [Segment.merged(self._segments, keep_tombstones=False)]
            self._changed()

    # -- search ---------------------------------------------------------------------------------
    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query; -1 ids where fewer than k passages match any query word.
        Ties are ranked by age (the passage added first comes first)."""
        n = len(queries)
        out_s, out_i = np.zeros((n, k), np.float32), np.full((n, k), -1, np.int64)
        if n == 0 or self.count == 0:
            return out_s, out_i
        if self._legacy is not None:
            return self._search_legacy(queries, k, out_s, out_i)
        if self._layout is None:
            sizes = [len(s.ids) for s in self._segments]
            self._layout = (np.concatenate([s.ids for s in self._segments]), np.cumsum([0, *sizes[:-1]]))
        all_ids, offsets = self._layout
        for i, tokens in enumerate(self._tokenize(queries, ids=False)):
            scores = self._scores(tokens, len(all_ids), offsets)
            hit = np.flatnonzero(scores > 0)
            best = hit[np.argsort(-scores[hit], kind="stable")[:k]]
            out_i[i, : len(best)], out_s[i, : len(best)] = all_ids[best], scores[best]
        return out_s, out_i

    def _scores(self, tokens: list[str], size: int, offsets: np.ndarray) -> np.ndarray:
        """BM25 of every passage position for one query's tokens (each occurrence counts, as in
        bm25s), computed from the live passages' totals."""
        n, avgdl = self._live, self._tokens / self._live
        scores = np.zeros(size, dtype=np.float32)
        seen: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        for token in tokens:
            if token not in seen:
                seen[token] = self._term_scores(token, n, avgdl, offsets)
            part = seen[token]
            if part is not None:
                scores[part[0]] += part[1]
        return scores

    def _term_scores(
        self, token: str, n: int, avgdl: float, offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(positions, float32 scores) of the live passages holding `token`: the operations of bm25s's
        scoring (float32 idf times float64 tf component, rounded to float32)."""
        pos, tf, dl = [], [], []
        for off, s in zip(offsets.tolist(), self._segments, strict=True):
            t = s.term(token)
            if t is None:
                continue
            docs = s.docs[s.indptr[t] : s.indptr[t + 1]]
            live = s.live[docs]
            docs = docs[live]
            pos.append(docs.astype(np.int64) + off)
            tf.append(s.tf[s.indptr[t] : s.indptr[t + 1]][live])
            dl.append(s.lengths[docs])
        df = sum(len(p) for p in pos)
        if df == 0:
            return None
        idf = np.float32(math.log(1 + (n - df + 0.5) / (df + 0.5)))
        tf_ = np.concatenate(tf).astype(np.float64)
        dl_ = np.concatenate(dl).astype(np.float64)
        tfc = tf_ / (K1 * ((1 - B) + B * dl_ / avgdl) + tf_)
        return np.concatenate(pos), (np.float64(idf) * tfc).astype(np.float32)

    def _search_legacy(self, queries, k, out_s, out_i):
        kk = min(k, len(self._legacy_ids))
        docs, scores = self._legacy.retrieve(self._tokenize(queries), k=kk, show_progress=False, n_threads=1)
        for i in range(len(queries)):
            hit = scores[i] > 0
            m = int(hit.sum())
            out_i[i, :m] = self._legacy_ids[docs[i][hit]]
            out_s[i, :m] = scores[i][hit]
        return out_s, out_i

    # -- persistence ----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write a new generation into `folder`, crash-safely: each segment not saved there yet is
        written to a temporary folder, fsynced and renamed to `gen.G` (`gen.G.i` for a second one),
        then `bm25.json` (the commit point) is atomically replaced to name the segments; a kill at
        any point leaves the previous generation readable. Segments no generation names any more
        (and the layouts of earlier versions) are removed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        old = _read_meta(folder)
        gen = max(self.generation, int(old.get("generation", 0)) if old else 0) + 1
        if self._legacy is not None:
            meta = self._save_legacy(folder, gen)
            keep = {meta["folder"]}
        else:
            same = self._folder is not None and self._folder.resolve() == folder.resolve()
            todo = [s for s in self._segments if not (same and s.name)]
            names = [f"gen.{gen}" if i == 0 else f"gen.{gen}.{i}" for i in range(len(todo))]
            for s, name in zip(todo, names, strict=True):
                _write_folder(folder, name, s.write)
            if todo:
                fsync_dir(folder)
            named = dict(zip(map(id, todo), names, strict=True))
            entries = [
                {"folder": named.get(id(s), s.name), "docs": len(s.ids), "tombstones": len(s.tombstones)}
                for s in self._segments
            ]
            meta = {"format_version": FORMAT_VERSION, "language": self.language, "count": self.count}
            write_json(folder / META, {**meta, "generation": gen, "segments": entries})  # the commit point
            for s, name in zip(todo, names, strict=True):
                s.name = name
            keep = {e["folder"] for e in entries}
        self._folder, self.generation = folder, gen
        _remove_unnamed(folder, keep)

    def _save_legacy(self, folder: Path, gen: int) -> dict:
        """Save an index of the earlier bm25s layout as it was (format 2)."""
        name = f"gen.{gen}"

        def write(tmp: Path) -> None:
            if self._legacy is not None and len(self._legacy_ids):
                self._legacy.save(str(tmp / "bm25s"), show_progress=False)
            np.save(tmp / IDS, self._legacy_ids, allow_pickle=False)

        _write_folder(folder, name, write)
        fsync_dir(folder)
        meta = {"format_version": BM25S_VERSION, "language": self.language, "count": self.count}
        write_json(folder / META, {**meta, "generation": gen, "folder": name})  # the commit point
        return {**meta, "folder": name}

    @staticmethod
    def saved_ids(folder: str | Path) -> np.ndarray | None:
        """The passage ids of the index saved in `folder`, read without loading postings (a cheap
        check against the store); None when there is none or it cannot be read."""
        folder = Path(folder)
        try:
            meta = _committed(folder)
            if meta.get("format_version") == FORMAT_VERSION and "generation" in meta:
                return _live_ids(_read_segments(folder, meta, postings=False), meta)
            return _read_ids(_legacy_paths(folder, meta)[0], meta)
        except (CorruptIndexError, *_READ_ERRORS):
            return None

    @classmethod
    def load(cls, folder: str | Path) -> BM25Index:
        """Open a saved index; raises CorruptIndexError when its files are unreadable or disagree
        (the counts in bm25.json, the id maps and the postings): rebuild it from the store."""
        folder = Path(folder)
        try:
            meta = _committed(folder)
            self = cls(meta.get("language"))
            self.generation = int(meta.get("generation", 0))
            if meta.get("format_version") == FORMAT_VERSION and "generation" in meta:
                self._segments = _read_segments(folder, meta, postings=True)
                _live_ids(self._segments, meta)
                self._folder = folder
                self._recount()
            else:
                self._load_legacy(folder, meta)
        except CorruptIndexError:
            raise
        except _READ_ERRORS as exc:
            raise CorruptIndexError(
                f"BM25 index at {folder} is unreadable ({exc}): re-run `kvrag index`"
            ) from exc
        return self

    def _load_legacy(self, folder: Path, meta: dict) -> None:
        import bm25s

        ids_path, bm25s_path = _legacy_paths(folder, meta)
        self._legacy_ids = _read_ids(ids_path, meta)
        self._legacy = bm25s.BM25()  # never searched while empty
        if len(self._legacy_ids):
            self._legacy = bm25s.BM25.load(str(bm25s_path), show_progress=False)
            num_docs = self._legacy.scores.get("num_docs")
            if num_docs != len(self._legacy_ids):
                raise ValueError(f"bm25s holds {num_docs} passages, the id map {len(self._legacy_ids)}")
        self.max_id = int(self._legacy_ids.max()) if len(self._legacy_ids) else -1


def _id_array(ids: Sequence[int], n_texts: int) -> np.ndarray:
    out = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(out) != n_texts:
        raise InvalidInputError(f"{len(out)} ids for {n_texts} texts")
    if len(np.unique(out)) != len(out):
        raise InvalidInputError("passage ids must be unique")
    return out


def _write_folder(folder: Path, name: str, write: Callable[[Path], None]) -> None:
    """Have `write(tmp)` fill a temporary folder, fsync it and rename it to `folder/name` (which
    nothing names: a folder left there by a save killed before its commit point is replaced)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder))
    try:
        write(tmp)
        _fsync_tree(tmp)
        final = folder / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_unnamed(folder: Path, keep: set[str]) -> None:
    """Remove older generations, saves killed half-way, and the in-place files of earlier versions."""
    removed = False
    for stale in folder.iterdir():
        name = stale.name
        if name == META or name in keep:
            continue
        if _GENERATION.fullmatch(name) or _TEMP.fullmatch(name) or name in (_LEGACY_IDS, _LEGACY_BM25S):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed = True
    if removed:
        fsync_dir(folder)


def _read_meta(folder: Path) -> dict | None:
    """bm25.json, or None when it is absent or unreadable."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _committed(folder: Path) -> dict:
    """bm25.json; FileNotFoundError when there is none, CorruptIndexError when it is unreadable or of
    an unknown format."""
    meta = _read_meta(folder)
    if meta is None:
        if not (folder / META).exists():
            raise FileNotFoundError(f"no BM25 index at {folder}")
        raise CorruptIndexError(f"{folder / META} is unreadable: re-run `kvrag index`")
    if "generation" in meta and meta.get("format_version") not in (FORMAT_VERSION, BM25S_VERSION):
        raise CorruptIndexError(f"{folder / META} has an unknown format: re-run `kvrag index`")
    return meta


def _read_segments(folder: Path, meta: dict, *, postings: bool) -> list[Segment]:
    """The segments bm25.json names, in order, their sizes checked against it."""
    segments = []
    for entry in meta["segments"]:
        name = str(entry["folder"])
        if not _GENERATION.fullmatch(name):
            raise CorruptIndexError(
                f"{folder / META} names an unknown segment {name!r}: re-run `kvrag index`"
            )
        seg = Segment.read(folder, name, postings=postings)
        if len(seg.ids) != entry["docs"] or len(seg.tombstones) != entry["tombstones"]:
            raise CorruptIndexError(f"BM25 segment {folder / name} does not hold what {META} says")
        segments.append(seg)
    return segments


def _live_ids(segments: list[Segment], meta: dict) -> np.ndarray:
    """The live ids of `segments` once their tombstones are applied, checked against the count."""
    _apply_tombstones(segments)
    ids = np.concatenate([s.ids[s.live] for s in segments]) if segments else np.zeros(0, np.int64)
    if len(ids) != meta.get("count") or len(np.unique(ids)) != len(ids):
        raise CorruptIndexError(
            f"the BM25 segments hold {len(ids)} live passages, bm25.json says {meta.get('count')}"
        )
    return ids


def _legacy_paths(folder: Path, meta: dict) -> tuple[Path, Path]:
    """(the id map, the bm25s folder) of an index of an earlier layout."""
    if "generation" not in meta:  # the layout of earlier versions, written in place
        return folder / _LEGACY_IDS, folder / _LEGACY_BM25S
    name = str(meta.get("folder"))
    if not _GENERATION.fullmatch(name):
        raise CorruptIndexError(f"{folder / META} has an unknown format: re-run `kvrag index`")
    return folder / name / IDS, folder / name / "bm25s"


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
