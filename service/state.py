"""What the app loads once and shares: settings, encoders, generator, KV caches, open collections."""

from __future__ import annotations

import threading
from pathlib import Path

from encoders.encoder import Encoder, load_encoder
from encoders.errors import CollectionNotFoundError, InvalidInputError
from index.collection import Collection, validate_name
from rag.generation.generator import Generator
from rag.kvcache.manager import KVCacheManager
from service.gate import ModelGate
from service.metrics import Metrics
from service.runtime import open_generator, open_kv
from service.settings import Settings


class AppState:
    """Long-lived objects of one app. Collections are opened on first use and kept open; each has a
    lock so an upsert never runs while its index is searched."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.gate = ModelGate(settings.max_concurrency, settings.max_queue, settings.queue_timeout_s)
        self.metrics = Metrics(self)
        self.encoders: dict[str, Encoder] = {}
        self.generator: Generator | None = None
        self.kv: KVCacheManager | None = None
        self.ready = False
        self._collections: dict[str, Collection] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._registry_lock = threading.Lock()
        self._stamps: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the default encoder, the generator and the KV store; compute the prefix cache."""
        s = self.settings
        self.encoder(s.encoder)
        self.generator = open_generator(s)
        self.kv = open_kv(s, self.generator)
        self.kv.prefix()
        self.ready = True

    def close(self) -> None:
        self.ready = False
        with self._registry_lock:
            for c in self._collections.values():
                c.close()
            self._collections.clear()
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
        try:
            return (Collection.folder_for(self.home, name) / "vectors" / "manifest.json").stat().st_mtime_ns
        except OSError:
            return 0

    def collection(self, name: str) -> Collection:
        """The open collection; reopened when its index was saved by another process (an indexing job)
        since it was opened, so searches never run on a stale index."""
        validate_name(name)
        with self._registry_lock:
            stamp = self._stamp(name)
            current = self._collections.get(name)
            if current is not None and self._stamps.get(name) != stamp:
                current = None  # not closed: a request may still use it; its connection closes when freed
            if current is None:
                current = self._collections[name] = Collection.open(
                    self.home, name, device=self.settings.device
                )
                self._stamps[name] = stamp
                self._locks.setdefault(name, threading.Lock())
            return current

    def lock(self, name: str) -> threading.Lock:
        with self._registry_lock:
            return self._locks.setdefault(name, threading.Lock())

    def add_collection(self, collection: Collection) -> None:
        with self._registry_lock:
            self._collections[collection.name] = collection
            self._stamps[collection.name] = self._stamp(collection.name)
            self._locks.setdefault(collection.name, threading.Lock())

    def drop_collection(self, name: str) -> None:
        validate_name(name)
        with self.lock(name):
            with self._registry_lock:
                c = self._collections.pop(name, None)
            if c is not None:
                c.close()
            if name not in Collection.list(self.home):
                raise CollectionNotFoundError(f"no collection {name!r}")
            Collection.delete(self.home, name)
