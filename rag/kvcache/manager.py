"""Passage KV caches: fetched from a store in one batch, recomputed and written back when missing
or corrupt, so an answer always comes even when the store is down."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvrag.errors import InvalidInputError
from kvrag.rag.generation.cache import KV, JoinedContext
from kvrag.rag.generation.generator import Generator
from kvrag.rag.kvcache.codec import CODECS, CorruptBlobError, decode_kv, encode_kv
from kvrag.rag.kvcache.keys import PassageKVKey
from kvrag.rag.kvcache.store import KVStore

log = logging.getLogger("kvrag.kvcache")


@dataclass
class FetchReport:
    """What one `get` cost: store round trip plus decoding, and recomputation of what was missing."""

    fetch_ms: float = 0.0  # the store's get (one round trip for a remote store)
    decode_ms: float = 0.0  # blobs -> tensors
    compute_ms: float = 0.0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    bytes: int = 0


class KVCacheManager:
    """Joins a generator, a KV store and a codec."""

    def __init__(
        self, generator: Generator, store: KVStore, codec: str = "fp16", *, batch_tokens: int = 4096
    ):
        if codec not in CODECS:
            raise ValueError(f"unknown KV codec {codec!r}: choose one of {', '.join(CODECS)}")
        self.generator = generator
        self.store = store
        self.codec = codec
        self.batch_tokens = batch_tokens
        self._prefix: KV | None = None
        self._lock = threading.Lock()
        self.counters = {"hits": 0, "misses": 0, "recomputed": 0, "corrupt": 0, "written": 0}

    def key(self, passage_ids: Sequence[int]) -> PassageKVKey:
        return PassageKVKey.of(self.generator.fingerprint, self.codec, self.generator.prefix_ids, passage_ids)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.counters[k] += v

    def _encode(self, key: PassageKVKey, kv: KV) -> bytes:
        return encode_kv(kv.keys, kv.values, codec=self.codec, digest=key.digest)

    def _decode(self, key: PassageKVKey, blob: bytes) -> KV:
        keys, values = decode_kv(blob, expect_digest=key.digest, dtype=self.generator.dtype)
        g = self.generator
        expected = (g.num_layers, g.num_kv_heads, len(key.passage_ids) or len(key.prefix_ids), g.head_dim)
        if tuple(keys.shape) != expected:
            raise CorruptBlobError(f"cached KV has shape {tuple(keys.shape)}, expected {expected}")
        return KV(keys, values)

    def prefix(self) -> KV:
        """The shared prefix's cache: in process memory after the first call."""
        if self._prefix is None:
            key = self.key(())
            blob = self.store.get_many([key.key])[0]
            kv = None
            if blob is not None:
                try:
                    kv = self._decode(key, blob)
                except CorruptBlobError as exc:
                    log.warning("prefix KV blob is corrupt (%s); recomputing", exc)
                    self._count(corrupt=1)
            if kv is None:
                kv = self.generator.encode_prefix()
                self.store.put_many({key.key: self._encode(key, kv)})
                self._count(recomputed=1, written=1)
            self._prefix = kv
        return self._prefix

    def get(self, passages: Sequence[Sequence[int]]) -> tuple[list[KV], FetchReport]:
        """Caches of the given passages (token ids), in order: one store round trip for all of them;
        anything missing or corrupt is recomputed in one batch and written back."""
        joined, report = self.get_joined(passages)
        out, pos = [], joined.prefix_tokens
        for n in joined.lengths:
            k = joined.kv.keys[:, :, pos : pos + n].contiguous()
            v = joined.kv.values[:, :, pos : pos + n].contiguous()
            out.append(KV(k, v))
            pos += n
        return out, report

    def get_joined(self, passages: Sequence[Sequence[int]]) -> tuple[JoinedContext, FetchReport]:
        """Like `get`, but decodes every blob straight into one preallocated cache (prefix first, then
        the passages in order): no per-passage tensors and no concatenation at query time."""
        if any(len(p) == 0 for p in passages):
            raise InvalidInputError("a passage has no tokens")
        import torch

        g = self.generator
        report = FetchReport()
        prefix = self.prefix()
        lengths = [len(p) for p in passages]
        total = prefix.tokens + sum(lengths)
        shape = (g.num_layers, g.num_kv_heads, total, g.head_dim)
        keys_t = torch.empty(shape, dtype=g.dtype)
        values_t = torch.empty(shape, dtype=g.dtype)
        keys_t[:, :, : prefix.tokens] = prefix.keys
        values_t[:, :, : prefix.tokens] = prefix.values
        spans, pos = [], prefix.tokens
        for n in lengths:
            spans.append((pos, pos + n))
            pos += n
        keys = [self.key(p) for p in passages]
        t0 = time.perf_counter()
        blobs = self.store.get_many([k.key for k in keys]) if keys else []
        t_dec = time.perf_counter()
        report.fetch_ms = (t_dec - t0) * 1000
        todo: list[int] = []
        for i, (key, blob) in enumerate(zip(keys, blobs, strict=True)):
            if blob is None:
                todo.append(i)
                continue
            a, b = spans[i]
            try:
                decode_kv(blob, expect_digest=key.digest, out=(keys_t[:, :, a:b], values_t[:, :, a:b]))
                report.bytes += len(blob)
            except CorruptBlobError as exc:
                log.warning("passage KV blob %s is corrupt (%s); recomputing", key.key, exc)
                report.corrupt += 1
                todo.append(i)
        report.decode_ms = (time.perf_counter() - t_dec) * 1000
        report.hits = len(keys) - len(todo)
        report.misses = len(todo) - report.corrupt
        unique: dict[str, int] = {}
        for i in todo:
            unique.setdefault(keys[i].key, i)
        if todo:
            t1 = time.perf_counter()
            first = list(unique.values())
            computed = g.encode_passages([passages[i] for i in first], prefix, batch_tokens=self.batch_tokens)
            by_key = {keys[i].key: kv for i, kv in zip(first, computed, strict=True)}
            self.store.put_many({keys[i].key: self._encode(keys[i], by_key[keys[i].key]) for i in first})
            for i in todo:
                a, b = spans[i]
                kv = by_key[keys[i].key]
                keys_t[:, :, a:b] = kv.keys
                values_t[:, :, a:b] = kv.values
            report.compute_ms = (time.perf_counter() - t1) * 1000
        self._count(
            hits=report.hits,
            misses=report.misses,
            corrupt=report.corrupt,
            recomputed=len(unique),
            written=len(unique),
        )
        return JoinedContext(KV(keys_t, values_t), prefix.tokens, passages), report

    def ensure(self, passages: Sequence[Sequence[int]], *, progress: bool = False, chunk: int = 256) -> dict:
        """Indexing time: compute and store the caches of passages not yet in the store.
        Returns how many were already there and how many were computed, and the bytes written."""
        if any(len(p) == 0 for p in passages):
            raise InvalidInputError("a passage has no tokens")
        self.prefix()
        unique: dict[str, Sequence[int]] = {}
        for p in passages:
            unique.setdefault(self.key(p).key, p)
        items = list(unique.items())
        present = self.store.exists_many([k for k, _ in items]) if items else []
        todo = [p for (_, p), there in zip(items, present, strict=True) if not there]
        written = 0
        t0 = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="passage KV", unit="passage", disable=not progress)
        prefix = self.prefix()
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            kvs = self.generator.encode_passages(part, prefix, batch_tokens=self.batch_tokens)
            blobs = {}
            for p, kv in zip(part, kvs, strict=True):
                key = self.key(p)
                blobs[key.key] = self._encode(key, kv)
            self.store.put_many(blobs)
            written += sum(len(b) for b in blobs.values())
            bar.update(len(part))
        bar.close()
        self._count(recomputed=len(todo), written=len(todo))
        return {
            "kv_present": len(items) - len(todo),
            "kv_computed": len(todo),
            "kv_bytes_written": written,
            "kv_seconds": round(time.perf_counter() - t0, 3),
        }

    def ensure_texts(self, items: Sequence[tuple[str, str | None]], *, progress: bool = False) -> dict:
        """`ensure` for (passage text, document title) pairs: the ingest plan's KV step
        (`kvrag.index.ingest.KVPrecompute`); the text is the one `kvrag.index.ingest.kv_text` picks."""
        if not items:
            return {"kv_present": 0, "kv_computed": 0, "kv_bytes_written": 0, "kv_seconds": 0.0}
        return self.ensure([self.generator.passage_ids(t, title) for t, title in items], progress=progress)

    def stats(self) -> dict:
        with self._lock:
            out = dict(self.counters)
        out["codec"] = self.codec
        out["store"] = self.store.stats()
        return out
