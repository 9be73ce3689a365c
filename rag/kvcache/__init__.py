"""Passage KV caches: a checked binary codec and byte-blob stores (memory, files, Redis, Redis Cluster, tiers)."""

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
    TieredStore,
    open_kv_store,
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
    "TieredStore",
    "blob_info",
    "decode_kv",
    "dequantize_int8_reference",
    "encode_kv",
    "kv_nbytes",
    "open_kv_store",
    "redact_url",
]
