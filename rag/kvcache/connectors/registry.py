"""The connector registry: URL scheme -> connector (a URL parser and a factory).

`open_kv_store` parses a URL once into a `StoreSpec` (the scheme's parser checks and types every part)
and hands the spec to the factory of its scheme; a ``memory+<scheme>://...?mem_bytes=1G`` URL puts an
in-process LRU of that size in front of the store. `register` adds a connector for a new scheme.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache.connectors.base import KVStore
from kvrag.rag.kvcache.connectors.file import FileStore
from kvrag.rag.kvcache.connectors.memory import MemoryStore
from kvrag.rag.kvcache.connectors.redis import RedisStore
from kvrag.rag.kvcache.connectors.redis_cluster import RedisClusterStore
from kvrag.rag.kvcache.connectors.spec import (
    StoreSpec,
    UrlParts,
    cluster_spec,
    file_spec,
    memory_spec,
    redact_url,
    redis_spec,
    split_tier,
)
from kvrag.rag.kvcache.connectors.tiered import TieredStore


@dataclass(frozen=True)
class Connector:
    """How to open the stores of one URL scheme.

    `parse` checks a URL of the scheme and returns its spec (raising `InvalidInputError`); `build` opens
    the store of a spec; `form` is the URL form shown when a URL is refused; `tierable`: whether a
    ``memory+<scheme>://`` URL may put the memory tier in front.
    """

    scheme: str
    parse: Callable[[UrlParts], StoreSpec]
    build: Callable[[StoreSpec], KVStore]
    form: str
    tierable: bool = True


_CONNECTORS: dict[str, Connector] = {}


def register(connector: Connector) -> Connector | None:
    """Add the connector of a scheme (lower case); returns the one it replaces, if any."""
    scheme = connector.scheme.lower()
    if not scheme or "+" in scheme or "://" in scheme:
        raise InvalidInputError(f"bad KV store scheme {connector.scheme!r}")
    previous = _CONNECTORS.get(scheme)
    _CONNECTORS[scheme] = dataclasses.replace(connector, scheme=scheme)
    return previous


def unregister(scheme: str) -> Connector | None:
    """Remove the connector of a scheme; returns it, if there was one."""
    return _CONNECTORS.pop(scheme.lower(), None)


def connectors() -> dict[str, Connector]:
    """The registered connectors by scheme, in registration order."""
    return dict(_CONNECTORS)


def accepted_forms() -> str:
    """The URL forms accepted, for error messages."""
    tierable = ", ".join(c.scheme for c in _CONNECTORS.values() if c.tierable)
    forms = [c.form for c in _CONNECTORS.values()]
    return ", ".join([*forms, f"memory+<{tierable}>://...?mem_bytes=1G"])


def parse_store_url(url: str) -> StoreSpec:
    """The spec of a KV store URL (see `kvrag.rag.kvcache.store` for the forms accepted)."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidInputError(f"bad KV store URL {url!r}; accepted forms: {accepted_forms()}")
    url = url.strip()
    scheme = url.partition("://")[0].lower()
    if "+" in scheme:
        parts, front_bytes = split_tier(url, [c.scheme for c in _CONNECTORS.values() if c.tierable])
        spec = _CONNECTORS[parts.parts.scheme].parse(parts)
        return dataclasses.replace(spec, front_bytes=front_bytes)
    connector = _CONNECTORS.get(scheme)
    if connector is None:
        raise InvalidInputError(
            f"unknown KV store URL scheme {scheme!r} in {redact_url(url)!r}; accepted: {accepted_forms()}"
        )
    return connector.parse(UrlParts.split(url))


def connect(spec: StoreSpec) -> KVStore:
    """Open the store of a spec: its scheme's factory, behind the memory tier when the spec has one."""
    connector = _CONNECTORS.get(spec.scheme)
    if connector is None:
        raise InvalidInputError(f"no KV store connector for the scheme {spec.scheme!r}")
    if spec.front_bytes is None:
        return connector.build(spec)
    front = MemoryStore(spec.front_bytes)
    return TieredStore(front, connector.build(dataclasses.replace(spec, front_bytes=None)))


def open_kv_store(url: str | StoreSpec) -> KVStore:
    """Open a store from a URL (parsed once, see `parse_store_url`) or from a spec."""
    return connect(url if isinstance(url, StoreSpec) else parse_store_url(url))


for _connector in (
    Connector("memory", memory_spec, MemoryStore.from_spec, "memory://?max_bytes=1G", tierable=False),
    Connector("file", file_spec, FileStore.from_spec, "file:///abs/path[?max_bytes=20G]"),
    Connector("redis", redis_spec, RedisStore.from_spec, "redis://[:password@]host:port/db?ttl=..&prefix=.."),
    Connector("rediss", redis_spec, RedisStore.from_spec, "rediss://..."),
    Connector("unix", redis_spec, RedisStore.from_spec, "unix:///path.sock?db=0"),
    Connector(
        "redis-cluster",
        cluster_spec,
        RedisClusterStore.from_spec,
        "redis-cluster://host:port[,host:port...]?ttl=..&prefix=..",
    ),
):
    register(_connector)
del _connector
