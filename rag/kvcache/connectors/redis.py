"""The Redis connector: ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs, through redis-py (hiredis
parser). A batch get is one MGET; a batch put one pipeline of SETs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache.connectors.backoff import Backoff, redis_errors
from kvrag.rag.kvcache.connectors.base import KVStore, StoreStats, check_items, check_keys, log
from kvrag.rag.kvcache.connectors.spec import StoreSpec, UrlParts, redis_spec


def redis_client(spec: StoreSpec) -> Any:
    """A `redis.Redis` for a ``redis``/``rediss``/``unix`` spec: `timeout` for connecting and for every
    reply, no retries (the store's back-off decides when to ask again), `options` passed through."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kwargs: dict[str, Any] = {
        "db": spec.db,
        "username": spec.username,
        "password": spec.password,
        "socket_timeout": spec.timeout,
        "socket_connect_timeout": spec.timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    options = dict(spec.options)
    max_connections = options.pop("max_connections", None)
    kwargs.update(options)  # an explicit socket_timeout= or socket_connect_timeout= wins over timeout=
    if spec.scheme == "unix":
        kwargs["path"] = spec.path
        connection_class: type = redis.UnixDomainSocketConnection
    else:
        kwargs["host"], kwargs["port"] = spec.hosts[0]
        connection_class = redis.SSLConnection if spec.scheme == "rediss" else redis.Connection
    pool = redis.ConnectionPool(connection_class=connection_class, max_connections=max_connections, **kwargs)
    return redis.Redis.from_pool(pool)


class RedisStore(KVStore):
    """Redis via redis-py (hiredis parser). A batch get is one MGET; a batch put one pipeline of SETs.

    On a connection error or timeout the store logs, counts an error and, for `retry_after` seconds,
    answers every call at once as unavailable (counted in ``skipped``) so that a dead server costs one
    timeout, not one per request. ``round_trips`` counts commands and pipelines sent.

    Takes a spec from `parse_store_url` (or a ``redis://``, ``rediss://`` or ``unix://`` URL, parsed here).
    """

    kind = "redis"
    _EXTRA_COUNTERS = ("skipped", "round_trips")

    def __init__(self, spec: StoreSpec | str) -> None:
        if isinstance(spec, str):
            spec = redis_spec(UrlParts.split(spec.strip()))
        if spec.scheme not in ("redis", "rediss", "unix") or spec.front_bytes is not None:
            raise InvalidInputError(f"not a Redis URL: {spec.url!r} (use redis://, rediss:// or unix://)")
        super().__init__(spec.url)
        self.spec = spec
        self.timeout, self.retry_after, self.ttl, self.prefix = (
            spec.timeout,
            spec.retry_after,
            spec.ttl,
            spec.prefix,
        )
        self._errors, down = redis_errors()
        self._backoff = Backoff(self, "Redis", spec.retry_after, down)
        self._client = redis_client(spec)

    @classmethod
    def from_spec(cls, spec: StoreSpec) -> RedisStore:
        return cls(spec)

    def _failed(self, op: str, exc: BaseException) -> None:
        self._backoff.failed(op, exc)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        keys = check_keys(keys)
        if not keys:
            return []
        out: list[bytes | None] = [None] * len(keys)
        if self._backoff.allow():
            self._count(round_trips=1)
            try:
                out = list(self._client.mget([self.prefix + k for k in keys]))
            except self._errors as exc:
                self._failed("MGET", exc)
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = check_items(items)
        if not pairs or not self._backoff.allow():
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
        keys = check_keys(keys)
        if not keys or not self._backoff.allow():
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
        keys = check_keys(keys)
        if not keys or not self._backoff.allow():
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
            self._backoff.succeeded()
        return ok

    def stats(self) -> StoreStats:
        out = super().stats()
        out["available"] = int(not self._backoff.blocked())
        return out

    def close(self) -> None:
        try:
            self._client.close()
        except self._errors as exc:  # closing a dead connection is not worth an exception
            log.debug("closing Redis KV store %s: %s", self.url, exc)
