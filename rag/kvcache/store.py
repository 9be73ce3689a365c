"""Byte-blob stores for KV caches, opened by URL: memory (LRU), files, Redis, Redis Cluster, and a memory
tier in front. Each backend is a connector (`kvrag.rag.kvcache.connectors`); this module names them.

Every store is a cache: a backend failure never raises from get/put/exists/delete. It is logged on the
"kvrag.kvcache" logger, counted in ``errors``, and reads report the keys as missing (None). Counters
(``gets`` = keys asked, ``hits`` + ``misses`` = ``gets``, ``puts``, ``bytes_read``, ``bytes_written``,
``errors``) are kept per store and returned by ``stats()``.

URLs accepted by `open_kv_store` (parsed once into a `StoreSpec` by `parse_store_url`)::

    memory://?max_bytes=2G                      in-process LRU (default 1 GiB; K/M/G/T suffixes)
    file:///abs/path                            one file per key under /abs/path
    file:///abs/path?max_bytes=20G              the same within a byte budget (least recently used go)
    redis://[:password@]host:port/db?timeout=0.5&ttl=SECONDS&prefix=STR&retry_after=2&max_connections=N
    rediss://...   unix:///path/redis.sock?db=0&...
    memory+file:///abs/path?mem_bytes=512M      memory LRU in front of a file store
    memory+redis://host:port/0?mem_bytes=1G     memory LRU in front of Redis
    redis-cluster://[:password@]host:port[,host:port...]?timeout=0.5&ttl=SECONDS&prefix=STR&retry_after=2
                                                Redis Cluster (any reachable node finds the others)
    memory+redis-cluster://host:port,...?mem_bytes=1G   memory LRU in front of Redis Cluster
"""

from kvrag.rag.kvcache.connectors.base import KVStore, StoreStats
from kvrag.rag.kvcache.connectors.file import FileStore
from kvrag.rag.kvcache.connectors.memory import MemoryStore
from kvrag.rag.kvcache.connectors.redis import RedisStore
from kvrag.rag.kvcache.connectors.redis_cluster import RedisClusterStore
from kvrag.rag.kvcache.connectors.registry import Connector, connect, open_kv_store, parse_store_url, register
from kvrag.rag.kvcache.connectors.spec import DEFAULT_MEMORY_BYTES, StoreSpec, parse_size, redact_url
from kvrag.rag.kvcache.connectors.tiered import TieredStore

__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "Connector",
    "FileStore",
    "KVStore",
    "MemoryStore",
    "RedisClusterStore",
    "RedisStore",
    "StoreSpec",
    "StoreStats",
    "TieredStore",
    "connect",
    "open_kv_store",
    "parse_size",
    "parse_store_url",
    "redact_url",
    "register",
]
