"""What the app loads once and shares: settings, encoders, generator, KV caches, open collections."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvrag.encoders.encoder import Encoder, load_encoder
from kvrag.errors import CollectionNotFoundError, InvalidInputError
from kvrag.index.collection import Collection, validate_name
from kvrag.rag.compress import PromptCompressor, open_from_source
from kvrag.rag.generation.generator import Generator
from kvrag.rag.kvcache.manager import KVCacheManager
from kvrag.service.errors import ClientGone
from kvrag.service.gate import ModelGate, TrackedLock
from kvrag.service.metrics import Metrics
from kvrag.service.runtime import open_generator, open_kv
from kvrag.service.settings import Settings

log = logging.getLogger("kvrag.service")


class _Entry:
    """An open collection and how many requests hold it; closed once retired and released by all."""

    def __init__(self, collection: Collection, stamp: int):
        self.collection, self.stamp = collection, stamp
        self.refs = 0
        self.retired = False
        self.deleted = False
        self.checked = False  # repaired (or found consistent) since it was opened


class Lease:
    """A request's hold on an open collection: the collection stays open (not closed under the
    request by a delete or a reload) until `release`, which may be called more than once."""

    def __init__(self, state: AppState, name: str, entry: _Entry):
        self._state, self.name, self._entry = state, name, entry
        self._released = False

    @property
    def collection(self) -> Collection:
        return self._entry.collection

    @property
    def deleted(self) -> bool:
        return self._entry.deleted

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._state._unref(self._entry)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AppState:
    """Long-lived objects of one app. Collections are opened on first use and kept open; each has a
    lock so an upsert never runs while its index is searched, and a reference count so a delete or a
    reload never closes it under a request that holds it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.gate = ModelGate(settings.max_concurrency, settings.max_queue, settings.queue_timeout_s)
        self.metrics = Metrics(self)
        self.encoders: dict[str, Encoder] = {}
        self.generator: Generator | None = None
        self.kv: KVCacheManager | None = None
        self.ready = False
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, TrackedLock] = {}
        self._registry_lock = threading.Lock()
        self.recovered: dict[str, dict] = {}  # what opening a collection repaired, by name
        self._compressors: dict[tuple[str, str | None], PromptCompressor] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the default encoder, the generator and the KV store; compute the prefix cache."""
        s = self.settings
        self.encoder(s.encoder)
        self.generator = open_generator(s)
        self.kv = open_kv(s, self.generator)
        self.kv.prefix()
        self.recover_all()
        self.ready = True

    def compressor(self, collection: Collection) -> PromptCompressor | None:
        """The compressor a compressed collection recorded (opened once, shared), so that upserted
        passages get compressed texts as `kvrag index` gives them; None for an uncompressed one."""
        record = collection.store.compression()
        if record is None or self.generator is None:
            return None
        key = (record["method"], record["source"])
        with self._registry_lock:
            found = self._compressors.get(key)
        if found is None:
            s = self.settings
            found = open_from_source(
                record["method"],
                record["source"] or self.generator.spec,
                models_dir=s.models_dir,
                device=s.device,
                generator=self.generator,
            )
            with self._registry_lock:
                found = self._compressors.setdefault(key, found)
        return found

    def recover_all(self) -> None:
        """Open every collection once and repair what an interrupted write (a crash, `kill -9`)
        left behind, before the first request: every stored document is searchable again."""
        for name in Collection.list(self.home):
            try:
                with self.lease(name) as lease, self.locked(lease):
                    pass
            except Exception:  # one unreadable collection must not keep the others from serving
                log.exception("collection %r could not be checked on start", name)

    def close(self) -> None:
        self.ready = False
        with self._registry_lock:
            for e in self._entries.values():
                e.collection.close()
            self._entries.clear()
        if self.kv is not None:
            self.kv.store.close()

    # -- models ---------------------------------------------------------------------------------
    @property
    def allowed_encoders(self) -> list[str]:
        extra = [e.strip() for e in self.settings.encoders.split(",") if e.strip()]
        return list(dict.fromkeys([self.settings.encoder, *extra, self.settings.code_encoder]))

    def encoder(self, spec: str | None = None) -> Encoder:
        spec = spec or self.settings.encoder
        if spec not in self.allowed_encoders:
            raise InvalidInputError(
                f"encoder {spec!r} is not served here: use one of {', '.join(self.allowed_encoders)}"
                " (KVRAG_ENCODER, KVRAG_ENCODERS)"
            )
        with self._registry_lock:
            if spec not in self.encoders:
                self.encoders[spec] = load_encoder(self.settings.encoder_config(spec))
            return self.encoders[spec]

    # -- collections ----------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.settings.root

    def _stamp(self, name: str) -> int:
        return Collection.stamp(self.home, name)

    def lease(self, name: str) -> Lease:
        """Hold the open collection `name` (see `Lease`). It is reopened when its index was saved by
        another process (an indexing job) since it was opened, so searches never run on a stale index;
        the old one closes when its last holder lets go."""
        validate_name(name)
        with self._registry_lock:
            stamp = self._stamp(name)
            entry = self._entries.get(name)
            if entry is not None and entry.stamp != stamp and stamp == entry.collection.saved_stamp:
                entry.stamp = stamp  # saved by this very object (an upsert here): nothing to reload
            elif entry is not None and entry.stamp != stamp:
                self._retire(name)
                entry = None
            if entry is None:
                entry = _Entry(Collection.open(self.home, name, device=self.settings.device), stamp)
                self._entries[name] = entry
                self._locks.setdefault(name, TrackedLock())
            entry.refs += 1
            return Lease(self, name, entry)

    def _retire(self, name: str) -> None:
        """Take an entry out of the registry (registry lock held); it closes when unreferenced."""
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        entry.retired = True
        if entry.refs == 0:
            entry.collection.close()

    def _unref(self, entry: _Entry) -> None:
        with self._registry_lock:
            entry.refs -= 1
            if entry.retired and entry.refs == 0:
                entry.collection.close()

    def lock(self, name: str) -> TrackedLock:
        with self._registry_lock:
            return self._locks.setdefault(name, TrackedLock())

    @contextmanager
    def locked(self, lease: Lease, stop: threading.Event | None = None) -> Iterator[Collection]:
        """The collection under its lock, for work in a worker thread. While waiting for the lock,
        a set `stop` (the client went away) ends the wait; a collection deleted while the request
        waited is reported as not found."""
        lock = self.lock(lease.name)
        while not lock.acquire(timeout=0.1):
            if stop is not None and stop.is_set():
                raise ClientGone()
        try:
            if lease.deleted:
                raise CollectionNotFoundError(
                    f"collection {lease.name!r} was deleted while this request waited for it"
                )
            self._recover(lease)
            yield lease.collection
        finally:
            lock.release()

    def _recover(self, lease: Lease) -> None:
        """Repair what a crash during a write left behind, once per opening (lock held)."""
        entry = lease._entry
        if entry.checked:
            return
        from kvrag.index.job import is_consistent, recover

        c = entry.collection
        if is_consistent(c):  # the usual case: no encoder is loaded for it
            entry.checked = True
            return
        report = recover(c, self.encoder(c.config.encoder))
        if report.get("skipped"):  # another process is writing it: it repairs at its own end
            return
        entry.checked = True
        if report["vectors_added"] or report["vectors_removed"] or report["bm25_rebuilt"]:
            log.warning("collection %r repaired on open: %s", lease.name, report)
            self.recovered[lease.name] = report

    def add_collection(self, collection: Collection) -> None:
        with self._registry_lock:
            self._retire(collection.name)
            entry = _Entry(collection, self._stamp(collection.name))
            entry.checked = True  # new: nothing to repair
            self._entries[collection.name] = entry
            self._locks.setdefault(collection.name, TrackedLock())

    def drop_collection(self, name: str) -> None:
        """Delete a collection. Runs under its lock, so no request is inside it; requests that hold
        it or wait for it then answer 404."""
        validate_name(name)
        with self.lock(name):
            # the registry lock too: no request opens the collection while its folder is renamed
            with self._registry_lock:
                entry = self._entries.get(name)
                if entry is not None:
                    entry.deleted = True
                    self._retire(name)
                if name not in Collection.list(self.home):
                    raise CollectionNotFoundError(f"no collection {name!r}")
                trash = Collection.detach(self.home, name)
            shutil.rmtree(trash, ignore_errors=True)

    # -- health ---------------------------------------------------------------------------------
    def stuck(self) -> dict:
        """Slots and collection locks held longer than `wedged_after_s`: model work that stopped
        moving. Empty when all is well."""
        limit = self.settings.wedged_after_s
        out: dict = {}
        held = self.gate.oldest_hold_s()
        if held > limit:
            out["model_slot_held_s"] = round(held, 1)
        with self._registry_lock:
            locks = dict(self._locks)
        long = {n: round(lk.held_s(), 1) for n, lk in locks.items() if lk.held_s() > limit}
        if long:
            out["collection_locks_held_s"] = long
        return out
