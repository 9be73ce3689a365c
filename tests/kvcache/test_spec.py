"""KV store URLs parsed once into a `StoreSpec`, the registry from scheme to connector, and the back-off
the Redis connectors share. No server is needed: opening a Redis store does not connect."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import pytest

from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache.connectors import Connector, connectors, register, unregister
from kvrag.rag.kvcache.connectors.backoff import Backoff, redis_errors
from kvrag.rag.kvcache.connectors.base import KVStore, check_items, check_keys
from kvrag.rag.kvcache.store import (
    MemoryStore,
    RedisClusterStore,
    RedisStore,
    StoreSpec,
    TieredStore,
    open_kv_store,
    parse_store_url,
)

MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ specs


def test_spec_is_frozen_typed_and_hides_the_password() -> None:
    spec = parse_store_url(
        "redis://user:s3cret@Cache.example:6390/3?ttl=60&prefix=p:&timeout=1.5&retry_after=0.5"
        "&max_connections=4&socket_keepalive=yes&health_check_interval=10&client_name=kv"
    )
    assert (spec.scheme, spec.hosts, spec.db, spec.username, spec.password) == (
        "redis",
        (("cache.example", 6390),),
        3,
        "user",
        "s3cret",
    )
    assert (spec.ttl, spec.prefix, spec.timeout, spec.retry_after, spec.front_bytes) == (
        60,
        "p:",
        1.5,
        0.5,
        None,
    )
    assert dict(spec.options) == {
        "max_connections": 4,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "client_name": "kv",
    }
    assert spec.option("max_connections") == 4 and spec.option("protocol", 2) == 2
    assert (
        "s3cret" not in repr(spec) and "s3cret" not in spec.url and spec.url.startswith("redis://user:***@")
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.ttl = 5  # type: ignore[misc]


def test_every_scheme_parses_to_its_spec(tmp_path) -> None:
    assert parse_store_url("memory://").max_bytes == 1 << 30
    assert parse_store_url("memory://?max_bytes=1.5G").max_bytes == 3 << 29
    assert parse_store_url(f"file://{tmp_path}/kv").path == f"{tmp_path}/kv"
    assert parse_store_url("file://localhost/var/kv").path == "/var/kv"
    plain = parse_store_url("redis://")
    assert (plain.hosts, plain.db, plain.timeout, plain.retry_after, plain.ttl) == (
        (("localhost", 6379),),
        0,
        0.5,
        2.0,
        None,
    )
    assert parse_store_url("redis://[::1]:7000/0").hosts == (("::1", 7000),)
    assert parse_store_url("redis://h/1?db=4").db == 4  # db= wins over the path, as in redis-py
    assert parse_store_url("redis://h/0?password=pw").password == "pw"
    assert parse_store_url("redis://:userinfo@h/0?password=query").password == "userinfo"
    tls = parse_store_url("rediss://h:6380/0?ssl_cert_reqs=required&ssl_check_hostname=false")
    assert tls.scheme == "rediss" and dict(tls.options) == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": False,
    }
    sock = parse_store_url("unix:///run/redis%20x.sock?db=2&prefix=x")
    assert (sock.scheme, sock.path, sock.db, sock.hosts) == ("unix", "/run/redis x.sock", 2, ())
    cluster = parse_store_url("redis-cluster://u:pw@h1:7000,[::1]:7001,h3?max_connections=8&ttl=5")
    assert cluster.hosts == (("h1", 7000), ("::1", 7001), ("h3", 6379))
    assert (cluster.username, cluster.password, cluster.ttl, cluster.option("max_connections")) == (
        "u",
        "pw",
        5,
        8,
    )


def test_tier_urls_carry_the_front_size_and_the_back_spec() -> None:
    spec = parse_store_url("memory+redis-cluster://:pw@h1:7000?mem_bytes=64M&prefix=q:")
    assert spec.scheme == "redis-cluster" and spec.front_bytes == 64 * MiB and spec.prefix == "q:"
    assert "mem_bytes" not in spec.url and "pw" not in spec.url
    assert parse_store_url("memory+file:///tmp/kv").front_bytes == 1 << 30
    store = open_kv_store(spec)  # a spec opens as well as a URL
    assert isinstance(store, TieredStore) and isinstance(store.back, RedisClusterStore)
    assert store.front.max_bytes == 64 * MiB and store.back.spec.front_bytes is None
    store.close()


def test_stores_take_specs() -> None:
    import redis

    r = RedisStore(parse_store_url("rediss://:pw@h:6380/1?ssl_check_hostname=false&max_connections=3"))
    pool = r._client.connection_pool
    assert pool.connection_class is redis.SSLConnection and pool.max_connections == 3
    assert pool.connection_kwargs["ssl_check_hostname"] is False and pool.connection_kwargs["db"] == 1
    r.close()
    u = open_kv_store("unix:///tmp/nonexistent-kvrag.sock?db=1&socket_timeout=3")
    pool = u._client.connection_pool
    assert pool.connection_class is redis.UnixDomainSocketConnection
    assert pool.connection_kwargs["path"] == "/tmp/nonexistent-kvrag.sock"
    assert (pool.connection_kwargs["socket_timeout"], pool.connection_kwargs["socket_connect_timeout"]) == (
        3.0,
        0.5,
    )
    u.close()
    c = RedisClusterStore(parse_store_url("redis-cluster://h1:7000?client_name=kv&timeout=0.2"))
    assert c._client_kwargs == {"client_name": "kv", "socket_timeout": 0.2, "socket_connect_timeout": 0.2}
    with pytest.raises(InvalidInputError, match="not a Redis URL"):
        RedisStore(parse_store_url("memory://"))
    with pytest.raises(InvalidInputError, match="not a Redis Cluster URL"):
        RedisClusterStore(parse_store_url("redis://h/0"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0?timeout=0", r"timeout='0' must be a number > 0"),
        ("redis://h/0?retry_after=-1", r"retry_after='-1' must be a number >= 0"),
        ("redis://h/0?ttl=1.5", r"ttl='1.5' must be a positive integer"),
        ("redis://h/0?max_connections=0", r"max_connections='0' must be an integer >= 1"),
        ("redis://h/0?protocol=4", r"protocol='4' must be 2 or 3"),
        ("redis://h/0?socket_keepalive=maybe", r"socket_keepalive='maybe' must be true or false"),
        ("redis://h/0?ssl_certfile=/c.pem", r"'ssl_certfile' needs a rediss:// URL"),
        ("unix:///s.sock?socket_keepalive=1", r"'socket_keepalive' needs a redis:// or rediss:// URL"),
        ("unix://", r"needs a path"),
        ("redis://h/zero", r"must be a database number"),
        ("redis://h:99999/0", r"bad port"),
        ("redis://h/0?prefix=a&prefix=b", r"'prefix' given twice"),
        ("redis://h/0?mem_bytes=1G", r"unknown Redis URL parameter 'mem_bytes'"),
        ("redis-cluster://h1:7000?db=1", r"unknown Redis Cluster URL parameter 'db'"),
        ("redis-cluster://h1:7000?socket_keepalive=1", r"unknown Redis Cluster URL parameter"),
        ("memory://?max_bytes=0", r"must be positive"),
        ("memory+unknown://x", r"bad tiered KV store URL"),
        ("s3://bucket/kv", r"unknown KV store URL scheme 's3'"),
    ],
)
def test_bad_parameters_name_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_store_url(url)


def test_messages_never_show_the_password() -> None:
    for url in (
        "redis://:hunter2@h/0?ttl=0",
        "redis-cluster://:hunter2@h1:x",
        "memory+redis://:hunter2@h/0?a=1",
    ):
        with pytest.raises(InvalidInputError) as err:
            parse_store_url(url)
        assert "hunter2" not in str(err.value)


# ------------------------------------------------------------------------------------------- registry


class _DictStore(KVStore):
    """A minimal connector for the registry test: a dict, named by the spec's path."""

    kind = "dict"

    def __init__(self, spec: StoreSpec) -> None:
        super().__init__(spec.url)
        self.spec = spec
        self.data: dict[str, bytes] = {}

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out = [self.data.get(k) for k in check_keys(keys)]
        self._count_reads(out)
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = check_items(items)
        self.data.update(pairs)
        self._count(puts=len(pairs))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [k in self.data for k in check_keys(keys)]

    def delete_many(self, keys: Sequence[str]) -> int:
        return sum(self.data.pop(k, None) is not None for k in check_keys(keys))

    def ping(self) -> bool:
        return True


def test_a_registered_scheme_opens_directly_and_behind_the_memory_tier() -> None:
    def parse(u) -> StoreSpec:
        u.only(["prefix"])
        return StoreSpec("dict", u.printable, path=u.parts.path, prefix=u.params.get("prefix", ""))

    assert register(Connector("DICT", parse, _DictStore, "dict:///name")) is None
    try:
        assert "dict" in connectors()
        store = open_kv_store("dict:///one?prefix=a:")
        assert isinstance(store, _DictStore) and (store.spec.path, store.spec.prefix) == ("/one", "a:")
        tier = open_kv_store("memory+dict:///two?mem_bytes=1M")
        assert isinstance(tier, TieredStore) and isinstance(tier.back, _DictStore)
        assert isinstance(tier.front, MemoryStore) and tier.front.max_bytes == MiB
        tier.put_many({"k": b"v"})
        assert tier.back.data == {"k": b"v"} and tier.get_many(["k"]) == [b"v"]
        with pytest.raises(InvalidInputError, match=r"dict:///name"):
            open_kv_store("nope://x")  # the accepted forms name the new connector
        with pytest.raises(InvalidInputError, match="unknown parameter"):
            open_kv_store("dict:///x?ttl=1")
    finally:
        unregister("dict")
    with pytest.raises(InvalidInputError, match="unknown KV store URL scheme"):
        open_kv_store("dict:///one")
    with pytest.raises(InvalidInputError):
        register(Connector("memory+dict", parse, _DictStore, "x"))


def test_memory_takes_no_tier() -> None:
    assert connectors()["memory"].tierable is False
    with pytest.raises(InvalidInputError, match="bad tiered"):
        open_kv_store("memory+memory://")


# -------------------------------------------------------------------------------------------- back-off


class _Owner:
    url = "redis://h/0"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def _count(self, **deltas: int) -> None:
        for name, delta in deltas.items():
            self.counts[name] = self.counts.get(name, 0) + delta


def test_backoff_windows_per_target(caplog: pytest.LogCaptureFixture) -> None:
    from redis.exceptions import ClusterDownError, ConnectionError, ResponseError

    now = [100.0]
    owner = _Owner()
    backoff = Backoff(owner, "Redis", 2.0, redis_errors()[1], clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="kvrag.kvcache"):
        assert backoff.failed("MGET", ConnectionError("refused")) is True
        assert backoff.failed("MGET", ClusterDownError("CLUSTERDOWN"), "h2:7000") is True
        assert backoff.failed("SET", ResponseError("OOM"), "h3:7000") is False  # an error reply: no back-off
    assert owner.counts == {"errors": 3}
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "Redis KV store redis://h/0 unavailable",
        "Redis KV store redis://h/0: node h2:7000 unavailable",
        "Redis KV store redis://h/0: SET on node h3:7000 failed: ResponseError: OOM",
    ]
    assert not backoff.allow() and not backoff.allow("h2:7000") and backoff.allow("h3:7000")
    assert owner.counts["skipped"] == 2 and backoff.backed_off() == ["h2:7000"]
    now[0] += 2.0  # the windows end
    assert backoff.allow() and backoff.allow("h2:7000") and backoff.backed_off() == []
    backoff.failed("slot map", RuntimeError("no node answered"), down=True)  # backed off whatever the error
    assert backoff.blocked()
    backoff.succeeded()
    assert not backoff.blocked()
