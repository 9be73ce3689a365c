"""KV store connectors: each moves byte blobs to and from one kind of backend, chosen by URL scheme.

`base` holds the `KVStore` interface; `spec` parses URLs into a typed `StoreSpec`; `registry` maps each
scheme to its connector and opens stores (`open_kv_store`); `memory`, `file`, `redis`, `redis_cluster`
are the backends, `tiered` the memory tier in front of them, `backoff` the back-off the Redis ones share.
"""

from kvrag.rag.kvcache.connectors.base import KVStore, StoreStats
from kvrag.rag.kvcache.connectors.registry import (
    Connector,
    connect,
    connectors,
    open_kv_store,
    parse_store_url,
    register,
    unregister,
)
from kvrag.rag.kvcache.connectors.spec import StoreSpec, parse_size, redact_url

__all__ = [
    "Connector",
    "KVStore",
    "StoreSpec",
    "StoreStats",
    "connect",
    "connectors",
    "open_kv_store",
    "parse_size",
    "parse_store_url",
    "redact_url",
    "register",
    "unregister",
]
