"""Byte-blob stores for KV caches, opened by URL: memory (LRU), files, Redis, Redis Cluster, and a memory
tier in front.

Every store is a cache: a backend failure never raises from get/put/exists/delete. It is logged on the
"kvrag.kvcache" logger, counted in ``errors``, and reads report the keys as missing (None). Counters
(``gets`` = keys asked, ``hits`` + ``misses`` = ``gets``, ``puts``, ``bytes_read``, ``bytes_written``,
``errors``) are kept per store and returned by ``stats()``.

URLs accepted by `open_kv_store`::

    memory://?max_bytes=2G                      in-process LRU (default 1 GiB; K/M/G/T suffixes)
    file:///abs/path                            one file per key under /abs/path
    redis://[:password@]host:port/db?timeout=0.5&ttl=SECONDS&prefix=STR&retry_after=2&max_connections=N
    rediss://...   unix:///path/redis.sock?db=0&...
    memory+file:///abs/path?mem_bytes=512M      memory LRU in front of a file store
    memory+redis://host:port/0?mem_bytes=1G     memory LRU in front of Redis
    redis-cluster://[:password@]host:port[,host:port...]?timeout=0.5&ttl=SECONDS&prefix=STR&retry_after=2
                                                Redis Cluster (any reachable node finds the others)
    memory+redis-cluster://host:port,...?mem_bytes=1G   memory LRU in front of Redis Cluster
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from kvrag.atomic import write_bytes
from kvrag.errors import InvalidInputError

log = logging.getLogger("kvrag.kvcache")

StoreStats = dict[str, Any]
DEFAULT_MEMORY_BYTES = 1 << 30
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_ACCEPTED = (
    "memory://?max_bytes=1G, file:///abs/path, redis://[:password@]host:port/db?ttl=..&prefix=.., "
    "rediss://..., unix:///path.sock, redis-cluster://host:port[,host:port...]?ttl=..&prefix=.., "
    "memory+file:///abs/path, memory+redis://host:port/db?mem_bytes=1G, memory+redis-cluster://host:port,..."
)


def _keys(keys: Sequence[str]) -> list[str]:
    if isinstance(keys, str | bytes):
        raise InvalidInputError("keys must be a sequence of strings, not a single string")
    out = list(keys)
    for k in out:
        if not isinstance(k, str):
            raise InvalidInputError(f"KV store keys must be strings, got {type(k).__name__}")
    return out


def _items(items: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    out = []
    for k, v in items.items():
        if not isinstance(k, str):
            raise InvalidInputError(f"KV store keys must be strings, got {type(k).__name__}")
        if isinstance(v, bytearray | memoryview):
            v = bytes(v)
        elif not isinstance(v, bytes):
            raise InvalidInputError(f"KV store values must be bytes, got {type(v).__name__}")
        out.append((k, v))
    return out


class KVStore(ABC):
    """A store of byte blobs under string keys. Reads return None for keys missing or unavailable."""

    kind: ClassVar[str] = "abstract"
    _COUNTERS: ClassVar[tuple[str, ...]] = (
        "gets",
        "hits",
        "misses",
        "puts",
        "bytes_read",
        "bytes_written",
        "errors",
    )
    _EXTRA_COUNTERS: ClassVar[tuple[str, ...]] = ()

    url: str

    def __init__(self, url: str) -> None:
        self.url = url
        self._stats_lock = threading.Lock()
        self._counters = dict.fromkeys(self._COUNTERS + self._EXTRA_COUNTERS, 0)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                self._counters[name] += delta

    def _count_reads(self, values: Sequence[bytes | None]) -> None:
        hits = [v for v in values if v is not None]
        self._count(
            gets=len(values),
            hits=len(hits),
            misses=len(values) - len(hits),
            bytes_read=sum(len(v) for v in hits),
        )

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values in the order of `keys`; None where a key is missing or the backend is unavailable."""

    @abstractmethod
    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Store (or overwrite) every item; backend failures are logged and counted, not raised."""

    @abstractmethod
    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is present (False where the backend is unavailable)."""

    @abstractmethod
    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove the keys; return how many were present."""

    def delete(self, keys: Sequence[str]) -> int:
        """Alias of `delete_many`."""
        return self.delete_many(keys)

    @abstractmethod
    def ping(self) -> bool:
        """Whether the backend is reachable and healthy."""

    def stats(self) -> StoreStats:
        """Counters plus `kind` and `url`."""
        with self._stats_lock:
            return {"kind": self.kind, "url": self.url, **self._counters}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or handles; the store is not used afterwards."""

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class MemoryStore(KVStore):
    """An in-process LRU bounded by the total size of its values. Thread-safe.

    A get refreshes a key's recency (exists does not); a value larger than `max_bytes` is not stored.
    """

    kind = "memory"
    _EXTRA_COUNTERS = ("evictions",)

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise InvalidInputError(f"max_bytes must be a positive int, got {max_bytes!r}")
        super().__init__(f"memory://?max_bytes={max_bytes}")
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._mu = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = _keys(keys)
        out: list[bytes | None] = []
        with self._mu:
            for k in keys:
                v = self._data.get(k)
                if v is not None:
                    self._data.move_to_end(k)
                out.append(v)
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = _items(items)
        stored = written = evicted = 0
        with self._mu:
            for k, v in pairs:
                old = self._data.pop(k, None)
                if old is not None:
                    self._size -= len(old)
                if len(v) > self.max_bytes:
                    continue
                self._data[k] = v
                self._size += len(v)
                stored += 1
                written += len(v)
                while self._size > self.max_bytes:
                    _, dropped = self._data.popitem(last=False)
                    self._size -= len(dropped)
                    evicted += 1
        self._count(puts=stored, bytes_written=written, evictions=evicted)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        keys = _keys(keys)
        with self._mu:
            return [k in self._data for k in keys]

    def delete_many(self, keys: Sequence[str]) -> int:
        keys = _keys(keys)
        removed = 0
        with self._mu:
            for k in keys:
                v = self._data.pop(k, None)
                if v is not None:
                    self._size -= len(v)
                    removed += 1
        return removed

    def ping(self) -> bool:
        return True

    def stats(self) -> StoreStats:
        out = super().stats()
        with self._mu:
            out.update(entries=len(self._data), bytes_used=self._size, max_bytes=self.max_bytes)
        return out

    def close(self) -> None:
        with self._mu:
            self._data.clear()
            self._size = 0


class FileStore(KVStore):
    """One file per key: ``root/<sha1(key)[:2]>/<sha256(key)>.kv``, written atomically (temp + rename)."""

    kind = "file"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInputError(f"cannot create the KV store folder {self.root}: {exc}") from None
        super().__init__(self.root.as_uri())

    def path_for(self, key: str) -> Path:
        """The file that holds `key`."""
        raw = key.encode("utf-8", "surrogatepass")
        return self.root / hashlib.sha1(raw).hexdigest()[:2] / f"{hashlib.sha256(raw).hexdigest()}.kv"

    def _error(self, op: str, path: Path, exc: OSError) -> None:
        log.warning("file KV store %s: %s of %s failed: %s", self.url, op, path, exc)
        self._count(errors=1)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for k in _keys(keys):
            path = self.path_for(k)
            try:
                out.append(path.read_bytes())
            except FileNotFoundError:
                out.append(None)
            except OSError as exc:
                self._error("read", path, exc)
                out.append(None)
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        for k, v in _items(items):
            path = self.path_for(k)
            try:
                write_bytes(path, v)
            except OSError as exc:
                self._error("write", path, exc)
                continue
            self._count(puts=1, bytes_written=len(v))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.path_for(k).is_file() for k in _keys(keys)]

    def delete_many(self, keys: Sequence[str]) -> int:
        removed = 0
        for k in _keys(keys):
            path = self.path_for(k)
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error("delete", path, exc)
        return removed

    def ping(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK)


_REDIS_OWN_PARAMS = ("timeout", "ttl", "prefix", "retry_after")
_REDIS_PASS_PARAMS = frozenset(
    {
        "db",
        "username",
        "password",
        "client_name",
        "max_connections",
        "health_check_interval",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_read_size",
        "protocol",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_min_version",
    }
)


def _float_param(name: str, value: str, *, minimum: float, strict: bool) -> float:
    try:
        out = float(value)
    except ValueError:
        out = float("nan")
    if not (out > minimum if strict else out >= minimum):
        sign = ">" if strict else ">="
        raise InvalidInputError(f"Redis URL parameter {name}={value!r} must be a number {sign} {minimum}")
    return out


def _own_params(own: Mapping[str, str]) -> tuple[float, float, int | None, str]:
    """(timeout, retry_after, ttl, prefix) from a Redis URL's store parameters."""
    timeout = _float_param("timeout", own.get("timeout", "0.5"), minimum=0.0, strict=True)
    retry_after = _float_param("retry_after", own.get("retry_after", "2.0"), minimum=0.0, strict=False)
    ttl: int | None = None
    if "ttl" in own:
        try:
            ttl = int(own["ttl"])
        except ValueError:
            ttl = 0
        if ttl <= 0:
            raise InvalidInputError(f"Redis URL parameter ttl={own['ttl']!r} must be a positive integer")
    return timeout, retry_after, ttl, own.get("prefix", "")


class RedisStore(KVStore):
    """Redis via redis-py (hiredis parser). A batch get is one MGET; a batch put one pipeline of SETs.

    On a connection error or timeout the store logs, counts an error and, for `retry_after` seconds,
    answers every call at once as unavailable (counted in ``skipped``) so that a dead server costs one
    timeout, not one per request. ``round_trips`` counts commands and pipelines sent.
    """

    kind = "redis"
    _EXTRA_COUNTERS = ("skipped", "round_trips")

    def __init__(self, url: str) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise InvalidInputError(
                f"not a Redis URL: {redact_url(url)!r} (use redis://, rediss:// or unix://)"
            )
        own: dict[str, str] = {}
        passed: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in _REDIS_OWN_PARAMS:
                own[name] = value
            elif name in _REDIS_PASS_PARAMS:
                passed.append((name, value))
            else:
                allowed = ", ".join(sorted((*_REDIS_OWN_PARAMS, *_REDIS_PASS_PARAMS)))
                raise InvalidInputError(f"unknown Redis URL parameter {name!r}; accepted: {allowed}")
        self.timeout, self.retry_after, self.ttl, self.prefix = _own_params(own)
        super().__init__(redact_url(url))
        client_url = _unsplit(parts._replace(query=urlencode(passed)))
        try:
            self._client = redis.Redis.from_url(
                client_url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise InvalidInputError(f"bad Redis URL {self.url!r}: {exc}") from None
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._down: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
        )
        self._down_until = 0.0

    def _available(self) -> bool:
        if time.monotonic() < self._down_until:
            self._count(skipped=1)
            return False
        return True

    def _failed(self, op: str, exc: BaseException) -> None:
        self._count(errors=1)
        if isinstance(exc, self._down):
            self._down_until = time.monotonic() + self.retry_after
            log.warning(
                "Redis KV store %s unavailable (%s: %s: %s); treating it as a miss for %.1f s",
                self.url,
                op,
                type(exc).__name__,
                exc,
                self.retry_after,
            )
        else:
            log.warning("Redis KV store %s: %s failed: %s: %s", self.url, op, type(exc).__name__, exc)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = _keys(keys)
        if not keys:
            return []
        out: list[bytes | None] = [None] * len(keys)
        if self._available():
            self._count(round_trips=1)
            try:
                out = list(self._client.mget([self.prefix + k for k in keys]))
            except self._errors as exc:
                self._failed("MGET", exc)
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = _items(items)
        if not pairs or not self._available():
            return
        self._count(round_trips=1)
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for k, v in pairs:
                    pipe.set(self.prefix + k, v, ex=self.ttl)
                pipe.execute()
        except self._errors as exc:
            self._failed("SET pipeline", exc)
            return
        self._count(puts=len(pairs), bytes_written=sum(len(v) for _, v in pairs))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        keys = _keys(keys)
        if not keys or not self._available():
            return [False] * len(keys)
        self._count(round_trips=1)
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.exists(self.prefix + k)
                return [bool(n) for n in pipe.execute()]
        except self._errors as exc:
            self._failed("EXISTS pipeline", exc)
            return [False] * len(keys)

    def delete_many(self, keys: Sequence[str]) -> int:
        keys = _keys(keys)
        if not keys or not self._available():
            return 0
        self._count(round_trips=1)
        try:
            return int(self._client.delete(*(self.prefix + k for k in keys)))
        except self._errors as exc:
            self._failed("DEL", exc)
            return 0

    def ping(self) -> bool:
        """Always asks the server (even during a back-off); success ends the back-off."""
        self._count(round_trips=1)
        try:
            ok = bool(self._client.ping())
        except self._errors as exc:
            self._failed("PING", exc)
            return False
        if ok:
            self._down_until = 0.0
        return ok

    def stats(self) -> StoreStats:
        out = super().stats()
        out["available"] = int(time.monotonic() >= self._down_until)
        return out

    def close(self) -> None:
        try:
            self._client.close()
        except self._errors as exc:  # closing a dead connection is not worth an exception
            log.debug("closing Redis KV store %s: %s", self.url, exc)


_CLUSTER_PASS_PARAMS = ("username", "password", "client_name", "max_connections")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cluster_nodes(url: str, hosts: str) -> list[tuple[str, int]]:
    """[(host, port), ...] from "h1:p1,h2:p2,[::1]:p3" (port 6379 where none is given)."""
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if item.startswith("["):
            host, close, rest = item[1:].partition("]")
            if not close or (rest and not rest.startswith(":")):
                raise InvalidInputError(f"bad node {item!r} in {redact_url(url)!r}")
            port_text = rest[1:]
        else:
            host, sep, port_text = item.rpartition(":")
            if not sep:
                host, port_text = item, ""
        if not host:
            raise InvalidInputError(
                f"Redis Cluster URL {redact_url(url)!r} needs host:port[,host:port...] nodes"
            )
        try:
            port = int(port_text) if port_text else 6379
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise InvalidInputError(f"bad port {port_text!r} for node {host!r} in {redact_url(url)!r}")
        nodes.append((host, port))
    return nodes


class _Plan:
    """One batch routed to nodes: key bytes, their slots, and the key positions per node to ask."""

    __slots__ = ("keys", "slots", "groups")

    def __init__(self, keys: list[bytes], slots: list[int]) -> None:
        self.keys = keys
        self.slots = slots
        self.groups: dict[str, tuple[Any, list[int]]] = {}

    def by_slot(self, positions: Sequence[int]) -> list[list[int]]:
        """`positions` grouped by hash slot (a multi-key command must stay within one slot)."""
        out: dict[int, list[int]] = {}
        for i in positions:
            out.setdefault(self.slots[i], []).append(i)
        return list(out.values())


class RedisClusterStore(KVStore):
    """Redis Cluster via redis-py's `RedisCluster` (its slot map and per-node clients).

    A batch is split by the node that owns each key's hash slot; every node gets one pipelined write (an
    MGET per slot for reads, a SET per key for writes) and every node is written to before any reply is
    read, so a batch costs one round trip per node touched, the nodes working at the same time.
    ``round_trips`` counts those per-node pipelines.

    A node that fails (connection refused, timeout, CLUSTERDOWN) costs an error and is skipped for
    `retry_after` seconds: its keys read as missing, its writes are dropped (``skipped`` counts the
    skipped node batches), while keys on the other nodes are served as usual. When a skipped node's
    back-off ends, the slot map is reloaded (``refreshes``) before the node is tried again, so a
    replica promoted in its place is found. A MOVED or ASK reply reads as missing and reloads the map
    before the next call (``redirects``). If no node at all answers for the slot map, the whole store
    answers as unavailable for `retry_after` seconds, like `RedisStore`.
    """

    kind = "redis-cluster"
    _EXTRA_COUNTERS = ("skipped", "round_trips", "refreshes", "redirects")

    def __init__(self, url: str) -> None:
        import redis
        from redis.cluster import ClusterNode

        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise InvalidInputError(f"bad Redis Cluster URL {redact_url(url)!r}: {exc}") from None
        if parts.scheme != "redis-cluster":
            raise InvalidInputError(
                f"not a Redis Cluster URL: {redact_url(url)!r} (use redis-cluster://host:port,...)"
            )
        userinfo, at, hosts = parts.netloc.rpartition("@")
        if parts.path not in ("", "/", "/0"):
            raise InvalidInputError(
                f"Redis Cluster has one database (0); drop the path {parts.path!r} from {redact_url(url)!r}"
            )
        self.nodes = _cluster_nodes(url, hosts)
        own: dict[str, str] = {}
        kwargs: dict[str, Any] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in _REDIS_OWN_PARAMS:
                own[name] = value
            elif name == "max_connections":
                kwargs[name] = int(_float_param(name, value, minimum=1.0, strict=False))
            elif name in _CLUSTER_PASS_PARAMS:
                kwargs[name] = value
            else:
                allowed = ", ".join(sorted((*_REDIS_OWN_PARAMS, *_CLUSTER_PASS_PARAMS)))
                raise InvalidInputError(f"unknown Redis Cluster URL parameter {name!r}; accepted: {allowed}")
        if at:
            user, sep, password = userinfo.partition(":")
            if user:
                kwargs["username"] = unquote(user)
            if sep:
                kwargs["password"] = unquote(password)
        self.timeout, self.retry_after, self.ttl, self.prefix = _own_params(own)
        super().__init__(redact_url(url))
        kwargs.update(socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
        self._client_kwargs = kwargs
        self._startup = [ClusterNode(host, port) for host, port in self.nodes]
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._down_until = 0.0  # no node answered for the slot map: everything is a miss until then
        self._node_down: dict[str, float] = {}  # node name -> end of its back-off
        self._stale = False  # the slot map is to be reloaded before the next batch
        exc = redis.exceptions
        self._errors: tuple[type[BaseException], ...] = (exc.RedisError, exc.RedisClusterException, OSError)
        self._down: tuple[type[BaseException], ...] = (
            exc.ConnectionError,
            exc.TimeoutError,
            exc.ClusterDownError,
            OSError,
        )
        self._redirect: tuple[type[BaseException], ...] = (exc.AskError,)  # MovedError is one too
        self._uncovered: type[BaseException] = exc.SlotNotCoveredError

    # ------------------------------------------------------------------------------------ cluster state

    def _cluster(self, *, force: bool = False) -> Any:
        """The client (built, with its slot map, on first use), or None while the cluster is unreachable."""
        if not force and not self._available():
            return None
        if self._client is not None:
            return self._client
        from redis.backoff import NoBackoff
        from redis.cluster import RedisCluster
        from redis.retry import Retry

        with self._client_lock:
            if self._client is None:
                self._count(refreshes=1)
                try:
                    self._client = RedisCluster(
                        startup_nodes=list(self._startup),
                        require_full_coverage=False,
                        retry=Retry(NoBackoff(), 0),
                        **self._client_kwargs,
                    )
                except self._errors as exc:
                    self._cluster_failed("slot map", exc)
                    return None
        return self._client

    def _available(self) -> bool:
        if time.monotonic() < self._down_until:
            self._count(skipped=1)
            return False
        return True

    def _cluster_failed(self, op: str, exc: BaseException) -> None:
        self._count(errors=1)
        self._down_until = time.monotonic() + self.retry_after
        log.warning(
            "Redis Cluster KV store %s unavailable (%s: %s: %s); treating it as a miss for %.1f s",
            self.url,
            op,
            type(exc).__name__,
            exc,
            self.retry_after,
        )

    def _reload(self, client: Any, failed_node: str | None = None) -> bool:
        """Reload the slot map from any node that answers (a failed one last)."""
        self._count(refreshes=1)
        try:
            client.nodes_manager.initialize(
                disconnect_startup_nodes_pools=False, last_failed_node_name=failed_node
            )
        except self._errors as exc:
            self._stale = True
            self._cluster_failed("slot map reload", exc)
            return False
        return True

    def _node_failed(self, op: str, node: str, exc: BaseException) -> None:
        self._count(errors=1)
        if isinstance(exc, self._down):
            with self._state_lock:
                self._node_down[node] = time.monotonic() + self.retry_after
            log.warning(
                "Redis Cluster KV store %s: node %s unavailable (%s: %s: %s); its keys are misses for %.1f s",
                self.url,
                node,
                op,
                type(exc).__name__,
                exc,
                self.retry_after,
            )
        else:
            log.warning(
                "Redis Cluster KV store %s: %s on node %s failed: %s: %s",
                self.url,
                op,
                node,
                type(exc).__name__,
                exc,
            )

    def _replies(self, op: str, node: str, replies: Sequence[Any]) -> None:
        """Account for the error replies of one node's pipeline: its first failure (one error, and a
        back-off if the node is down or refusing) and every redirect (a slot map reload)."""
        failure = next(
            (r for r in replies if isinstance(r, Exception) and not isinstance(r, self._redirect)), None
        )
        if failure is not None:
            self._node_failed(op, node, failure)
        redirects = sum(isinstance(r, self._redirect) for r in replies)
        if redirects:
            self._count(redirects=redirects)
            self._stale = True
            log.info(
                "Redis Cluster KV store %s: %d redirect(s) from %s; reloading the slot map",
                self.url,
                redirects,
                node,
            )

    def _plan(self, keys: Sequence[str]) -> _Plan | None:
        """Route a batch: None when the cluster is unavailable; nodes in back-off are left out."""
        from redis.crc import key_slot

        client = self._cluster()
        if client is None:
            return None
        now = time.monotonic()
        with self._state_lock:
            expired = [name for name, until in self._node_down.items() if until <= now]
            for name in expired:
                del self._node_down[name]
            stale, self._stale = self._stale or bool(expired), False
            down = set(self._node_down)
        if stale and not self._reload(client, expired[0] if expired else None):
            return None
        raw = [(self.prefix + k).encode("utf-8", "surrogatepass") for k in keys]
        plan = _Plan(raw, [key_slot(k) for k in raw])
        skipped: set[str] = set()
        uncovered = 0
        for i, slot in enumerate(plan.slots):
            try:
                node = client.nodes_manager.get_node_from_slot(slot)
            except self._uncovered:
                uncovered += 1
                continue
            if node.name in down:
                skipped.add(node.name)
                continue
            plan.groups.setdefault(node.name, (node, []))[1].append(i)
        if skipped:
            self._count(skipped=len(skipped))
        if uncovered:
            self._stale = True
            self._count(errors=1)
            log.warning("Redis Cluster KV store %s: %d key(s) in slots no node serves", self.url, uncovered)
        return plan

    def _exchange(
        self, op: str, plan: _Plan, commands_for: Callable[[list[int]], list[tuple[Any, ...]]]
    ) -> list[tuple[str, list[int], list[Any]]]:
        """Send each node of the plan its commands (``commands_for(positions)``) as one pipelined write,
        all nodes first, then read the replies node by node: one round trip per node, the nodes working
        at the same time. Returns ``(node, positions, replies)`` for the nodes that answered; a reply may
        be an error (an exception object). Nodes that failed are logged and counted (and backed off when
        down)."""
        from redis.exceptions import ResponseError

        sent: list[tuple[str, list[int], list[tuple[Any, ...]], Any, Any]] = []
        out: list[tuple[str, list[int], list[Any]]] = []
        try:
            for name, (node, positions) in plan.groups.items():
                client = node.redis_connection
                commands = commands_for(positions)
                self._count(round_trips=1)
                conn = None
                try:
                    conn = client.connection_pool.get_connection()
                    sent.append((name, positions, commands, client, conn))
                    conn.send_packed_command(conn.pack_commands(commands))
                except self._errors as exc:
                    if conn is not None:
                        sent.pop()
                        conn.disconnect()
                        client.connection_pool.release(conn)
                    self._node_failed(op, name, exc)
            while sent:
                name, positions, commands, client, conn = sent[0]
                replies: list[Any] = []
                try:
                    for args in commands:
                        try:
                            replies.append(client.parse_response(conn, args[0]))
                        except ResponseError as exc:
                            replies.append(exc)
                except self._errors as exc:
                    conn.disconnect()
                    self._node_failed(op, name, exc)
                else:
                    self._replies(op, name, replies)
                    out.append((name, positions, replies))
                finally:
                    sent.pop(0)
                    client.connection_pool.release(conn)
        finally:
            for _, _, _, client, conn in sent:  # only after an unexpected exception: unread replies
                conn.disconnect()
                client.connection_pool.release(conn)
        return out

    # ------------------------------------------------------------------------------------------- store

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = _keys(keys)
        if not keys:
            return []
        out: list[bytes | None] = [None] * len(keys)
        plan = self._plan(keys)
        if plan is not None:

            def commands(positions: list[int]) -> list[tuple[Any, ...]]:
                return [("MGET", *(plan.keys[i] for i in group)) for group in plan.by_slot(positions)]

            for _, positions, replies in self._exchange("MGET", plan, commands):
                for group, reply in zip(plan.by_slot(positions), replies, strict=True):
                    if not isinstance(reply, Exception):
                        for i, value in zip(group, reply, strict=True):
                            out[i] = value
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = _items(items)
        plan = self._plan([k for k, _ in pairs]) if pairs else None
        if plan is None:
            return
        expire = ("EX", self.ttl) if self.ttl is not None else ()

        def commands(positions: list[int]) -> list[tuple[Any, ...]]:
            return [("SET", plan.keys[i], pairs[i][1], *expire) for i in positions]

        stored = written = 0
        for _, positions, replies in self._exchange("SET", plan, commands):
            for i, reply in zip(positions, replies, strict=True):
                if not isinstance(reply, Exception):
                    stored += 1
                    written += len(pairs[i][1])
        self._count(puts=stored, bytes_written=written)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        keys = _keys(keys)
        out = [False] * len(keys)
        plan = self._plan(keys) if keys else None
        if plan is not None:
            exchanged = self._exchange("EXISTS", plan, lambda pos: [("EXISTS", plan.keys[i]) for i in pos])
            for _, positions, replies in exchanged:
                for i, reply in zip(positions, replies, strict=True):
                    out[i] = not isinstance(reply, Exception) and bool(reply)
        return out

    def delete_many(self, keys: Sequence[str]) -> int:
        keys = _keys(keys)
        plan = self._plan(keys) if keys else None
        if plan is None:
            return 0

        def commands(positions: list[int]) -> list[tuple[Any, ...]]:
            return [("DEL", *(plan.keys[i] for i in group)) for group in plan.by_slot(positions)]

        removed = 0
        for _, _, replies in self._exchange("DEL", plan, commands):
            removed += sum(int(n) for n in replies if not isinstance(n, Exception))
        return removed

    def ping(self) -> bool:
        """Whether every master in the slot map answers and reports ``cluster_state:ok``. Always asks
        (even during a back-off): it reloads the slot map first, and ends the back-off of each node
        that answers well (and the store's, when they all do)."""
        client = self._cluster(force=True)
        if client is None or not self._reload(client):
            return False
        plan = _Plan([], [])
        plan.groups = {node.name: (node, []) for node in client.get_primaries()}
        healthy = 0
        for name, _, replies in self._exchange("CLUSTER INFO", plan, lambda _: [("CLUSTER", "INFO")]):
            info = replies[0]
            if isinstance(info, Mapping):
                info = f"cluster_state:{_text(info.get('cluster_state', info.get(b'cluster_state')))}"
            if not isinstance(info, Exception) and "cluster_state:ok" in _text(info):
                healthy += 1
                with self._state_lock:
                    self._node_down.pop(name, None)
        if plan.groups and healthy == len(plan.groups):
            self._down_until = 0.0
            return True
        return False

    def stats(self) -> StoreStats:
        out = super().stats()
        now = time.monotonic()
        out["available"] = int(now >= self._down_until)
        with self._state_lock:
            out["nodes_down"] = sorted(name for name, until in self._node_down.items() if until > now)
        client = self._client
        out["nodes"] = len(client.get_primaries()) if client is not None else 0
        return out

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except self._errors as exc:
                log.debug("closing Redis Cluster KV store %s: %s", self.url, exc)


class TieredStore(KVStore):
    """A fast `front` (usually memory) over a shared `back` (files or Redis).

    Reads try the front, then fetch the rest from the back in one batch and copy back hits into the
    front. Writes go to the back first, then the front.
    """

    kind = "tiered"
    _EXTRA_COUNTERS = ("promotions",)

    def __init__(self, front: KVStore, back: KVStore) -> None:
        super().__init__(f"{front.url}+{back.url}")
        self.front = front
        self.back = back

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = _keys(keys)
        out = self.front.get_many(keys)
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            fill: dict[str, bytes] = {}
            for i, v in zip(missing, self.back.get_many([keys[i] for i in missing]), strict=True):
                if v is not None:
                    out[i] = v
                    fill[keys[i]] = v
            if fill:
                self.front.put_many(fill)
                self._count(promotions=len(fill))
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = dict(_items(items))
        if not pairs:
            return
        self.back.put_many(pairs)
        self.front.put_many(pairs)
        self._count(puts=len(pairs), bytes_written=sum(len(v) for v in pairs.values()))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        keys = _keys(keys)
        out = self.front.exists_many(keys)
        missing = [i for i, present in enumerate(out) if not present]
        if missing:
            for i, present in zip(missing, self.back.exists_many([keys[i] for i in missing]), strict=True):
                out[i] = present
        return out

    def delete_many(self, keys: Sequence[str]) -> int:
        keys = _keys(keys)
        if not keys:
            return 0
        present = self.exists_many(keys)
        self.back.delete_many(keys)
        self.front.delete_many(keys)
        return sum(present)

    def ping(self) -> bool:
        return self.front.ping() and self.back.ping()

    def stats(self) -> StoreStats:
        """The tier's own counters, with `errors` summed over both tiers (so an outage of the back
        shows at the top level) and each tier's counters under `front` and `back`."""
        out = super().stats()
        out["front"] = self.front.stats()
        out["back"] = self.back.stats()
        out["errors"] = out.get("errors", 0) + out["front"].get("errors", 0) + out["back"].get("errors", 0)
        return out

    def close(self) -> None:
        try:
            self.front.close()
        finally:
            self.back.close()


# ------------------------------------------------------------------------------------------------- URLs


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "512M", "2G", "1.5GiB" (binary units)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidInputError(f"bad size {text!r}; write e.g. 1073741824, 512M or 2G")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if n <= 0:
        raise InvalidInputError(f"size {text!r} must be positive")
    return n


def _unsplit(parts: Any) -> str:
    """urlunsplit that keeps "scheme://" even when the netloc is empty (memory://?.., unix:///..)."""
    out = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if parts.query:
        out += f"?{parts.query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out


def redact_url(url: str) -> str:
    """`url` with any password (in the user info or a ``password=`` parameter) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(://[^/@:]*:)[^@]*@", r"\1***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        if sep:
            netloc = f"{user}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe=":/*")
    parts = parts._replace(netloc=netloc, query=query)
    return _unsplit(parts) if "://" in url else urlunsplit(parts)


def _split_query(url: str) -> tuple[Any, dict[str, str]]:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidInputError(f"bad KV store URL {redact_url(url)!r}: {exc}") from None
    params: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in params:
            raise InvalidInputError(f"parameter {k!r} given twice in {redact_url(url)!r}")
        params[k] = v
    return parts, params


def _no_params(url: str, params: Mapping[str, str], allowed: Sequence[str]) -> None:
    extra = sorted(set(params) - set(allowed))
    if extra:
        accepted = ", ".join(allowed) or "none"
        raise InvalidInputError(f"unknown parameter(s) {extra} in {redact_url(url)!r}; accepted: {accepted}")


def open_kv_store(url: str) -> KVStore:
    """Open a store from a URL (see the module docstring for the accepted forms)."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidInputError(f"bad KV store URL {url!r}; accepted forms: {_ACCEPTED}")
    url = url.strip()
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()

    if "+" in scheme:
        front_kind, _, back_scheme = scheme.partition("+")
        if front_kind != "memory" or back_scheme not in ("file", "redis", "rediss", "unix", "redis-cluster"):
            raise InvalidInputError(
                f"bad tiered KV store URL {redact_url(url)!r}: write memory+file://..., memory+redis://... "
                "or memory+redis-cluster://..."
            )
        back_url = f"{back_scheme}://{rest}"
        parts, params = _split_query(back_url)
        mem = params.pop("mem_bytes", None)
        kept = [p for p in parts.query.split("&") if p and unquote(p.partition("=")[0]) != "mem_bytes"]
        back_url = _unsplit(parts._replace(query="&".join(kept)))
        front = MemoryStore(parse_size(mem) if mem is not None else DEFAULT_MEMORY_BYTES)
        return TieredStore(front, open_kv_store(back_url))

    if scheme == "memory":
        parts, params = _split_query(url)
        if parts.netloc or parts.path not in ("", "/"):
            raise InvalidInputError(f"bad memory KV store URL {url!r}; write memory://?max_bytes=1G")
        _no_params(url, params, ["max_bytes"])
        size = parse_size(params["max_bytes"]) if "max_bytes" in params else DEFAULT_MEMORY_BYTES
        return MemoryStore(size)

    if scheme == "file":
        parts, params = _split_query(url)
        _no_params(url, params, [])
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise InvalidInputError(
                f"file KV store URLs need an absolute path, like file:///var/cache/kvrag; got {url!r}"
            )
        return FileStore(Path(path))

    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url)

    if scheme == "redis-cluster":
        return RedisClusterStore(url)

    raise InvalidInputError(
        f"unknown KV store URL scheme {scheme!r} in {redact_url(url)!r}; accepted: {_ACCEPTED}"
    )
