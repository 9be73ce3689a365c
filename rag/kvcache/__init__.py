"""Passage KV caches: a checked binary codec and byte-blob stores (memory, files, Redis, Redis Cluster, tiers),
each a connector chosen by URL scheme (`kvrag.rag.kvcache.connectors`)."""

from kvrag.rag.kvcache.codec import (
    CODECS,
    CorruptBlobError,
    blob_info,
    decode_kv,
    dequantize_int8_reference,
    encode_kv,
    kv_nbytes,
)
from kvrag.rag.kvcache.store import (
    FileStore,
    KVStore,
    MemoryStore,
    RedisClusterStore,
    RedisStore,
    StoreSpec,
    TieredStore,
    open_kv_store,
    parse_store_url,
    redact_url,
)

__all__ = [
    "CODECS",
    "CorruptBlobError",
    "FileStore",
    "KVStore",
    "MemoryStore",
    "RedisClusterStore",
    "RedisStore",
    "StoreSpec",
    "TieredStore",
    "blob_info",
    "decode_kv",
    "dequantize_int8_reference",
    "encode_kv",
    "kv_nbytes",
    "open_kv_store",
    "parse_store_url",
    "redact_url",
]
