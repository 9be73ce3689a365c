"""KV stores: one contract suite over every backend, then backend-specific behaviour and URL parsing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache import (
    FileStore,
    KVStore,
    MemoryStore,
    RedisStore,
    TieredStore,
    open_kv_store,
    redact_url,
)
from tests.redis_util import free_port, start_redis_server

MiB = 1 << 20


def _redis(request: pytest.FixtureRequest) -> RedisStore:
    return RedisStore(request.getfixturevalue("redis_store_url"))


STORE_KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("file", id="file"),
    pytest.param("file-budget", id="file-budget"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("memory+file", id="memory+file"),
    pytest.param("memory+redis", id="memory+redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KVStore]:
    kind = request.param
    if kind == "memory":
        s: KVStore = MemoryStore(64 * MiB)
    elif kind == "file":
        s = FileStore(tmp_path / "kv")
    elif kind == "file-budget":
        s = FileStore(tmp_path / "kv", max_bytes=64 * MiB)
    elif kind == "redis":
        s = _redis(request)
    elif kind == "memory+file":
        s = TieredStore(MemoryStore(64 * MiB), FileStore(tmp_path / "kv"))
    else:
        s = TieredStore(MemoryStore(64 * MiB), _redis(request))
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------- contract


def test_put_get_exists_delete(store: KVStore) -> None:
    store.put_many({"kvrag:kv:a": b"alpha", "kvrag:kv:b": b"beta"})
    assert store.get_many(["kvrag:kv:a", "kvrag:kv:b"]) == [b"alpha", b"beta"]
    assert store.exists_many(["kvrag:kv:a", "kvrag:kv:zz", "kvrag:kv:b"]) == [True, False, True]
    assert store.delete_many(["kvrag:kv:a", "kvrag:kv:zz"]) == 1
    assert store.get_many(["kvrag:kv:a", "kvrag:kv:b"]) == [None, b"beta"]
    assert store.exists_many(["kvrag:kv:a"]) == [False]
    assert store.ping()


def test_missing_keys_keep_their_positions(store: KVStore) -> None:
    present = {f"kvrag:kv:{i:02d}": f"value {i}".encode() for i in range(0, 20, 3)}
    store.put_many(present)
    keys = [f"kvrag:kv:{i:02d}" for i in reversed(range(20))]
    got = store.get_many(keys)
    assert got == [present.get(k) for k in keys]
    stats = store.stats()
    assert stats["gets"] == 20 and stats["hits"] == len(present) and stats["misses"] == 20 - len(present)
    assert stats["bytes_read"] == sum(len(v) for v in present.values())
    assert stats["puts"] == len(present) and stats["errors"] == 0


def test_empty_inputs(store: KVStore) -> None:
    assert store.get_many([]) == []
    store.put_many({})
    assert store.exists_many([]) == []
    assert store.delete_many([]) == 0
    assert store.stats()["gets"] == 0


def test_large_and_binary_values(store: KVStore) -> None:
    big = os.urandom(8 * MiB)
    every_byte = bytes(range(256)) * 17
    store.put_many({"big": big, "bin": every_byte, "empty": b"", "ünï/cödé key \n": b"\x00\xff"})
    assert store.get_many(["bin", "big", "empty", "ünï/cödé key \n"]) == [every_byte, big, b"", b"\x00\xff"]
    assert store.stats()["bytes_written"] >= len(big) + len(every_byte)


def test_overwrite_and_buffer_values(store: KVStore) -> None:
    store.put_many({"k": b"first"})
    store.put_many({"k": bytearray(b"second")})
    assert store.get_many(["k"]) == [b"second"]
    store.put_many({"k": memoryview(b"third")})
    assert store.get_many(["k", "k"]) == [b"third", b"third"]


def test_rejects_wrong_types(store: KVStore) -> None:
    with pytest.raises(InvalidInputError):
        store.get_many("kvrag:kv:a")  # a single string is not a batch
    with pytest.raises(InvalidInputError):
        store.put_many({"k": "text"})  # type: ignore[dict-item]
    with pytest.raises(InvalidInputError):
        store.exists_many([b"k"])  # type: ignore[list-item]


def test_concurrent_use(store: KVStore) -> None:
    def work(t: int) -> None:
        for i in range(10):
            key = f"t{t}:{i}"
            store.put_many({key: key.encode() * 10})
            assert store.get_many([key]) == [key.encode() * 10]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stats = store.stats()
    assert stats["gets"] == stats["hits"] == 40 and stats["puts"] == 40


# ------------------------------------------------------------------------------------------------ memory


def test_memory_lru_evicts_least_recently_used_by_bytes() -> None:
    s = MemoryStore(300)
    s.put_many({"a": b"a" * 100, "b": b"b" * 100, "c": b"c" * 100})
    assert s.get_many(["a"]) == [b"a" * 100]  # a is now more recent than b and c
    s.put_many({"d": b"d" * 100})
    assert s.exists_many(["a", "b", "c", "d"]) == [True, False, True, True]
    s.put_many({"e": b"e" * 150})  # needs two evictions: c, then a
    assert s.exists_many(["a", "c", "d", "e"]) == [False, False, True, True]
    stats = s.stats()
    assert stats["evictions"] == 3 and stats["bytes_used"] == 250 and stats["entries"] == 2


def test_memory_skips_oversized_values() -> None:
    s = MemoryStore(100)
    s.put_many({"k": b"small"})
    s.put_many({"k": b"x" * 101, "other": b"y" * 101})
    assert s.get_many(["k", "other"]) == [None, None]  # the stale small value is gone too
    assert s.stats()["bytes_used"] == 0
    with pytest.raises(InvalidInputError):
        MemoryStore(0)


# -------------------------------------------------------------------------------------------------- file


def test_file_layout_persistence_and_no_temp_files(tmp_path: Path) -> None:
    s = FileStore(tmp_path / "kv")
    s.put_many({f"kvrag:kv:{i}": os.urandom(1000) for i in range(20)})
    s.put_many({"kvrag:kv:0": b"new"})
    files = [p for p in (tmp_path / "kv").rglob("*") if p.is_file()]
    assert len(files) == 20 and all(p.suffix == ".kv" for p in files)
    path = s.path_for("kvrag:kv:0")
    assert path.parent.parent == s.root and len(path.parent.name) == 2 and len(path.stem) == 64
    assert FileStore(tmp_path / "kv").get_many(["kvrag:kv:0"]) == [b"new"]
    assert s.url == (tmp_path / "kv").as_uri()


def test_file_failed_write_leaves_old_value_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = FileStore(tmp_path)
    s.put_many({"k": b"old value"})

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    s.put_many({"k": b"new value that never lands"})
    monkeypatch.undo()
    assert s.get_many(["k"]) == [b"old value"]
    assert s.stats()["errors"] == 1
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [s.path_for("k").name]


def test_file_unreadable_entry_is_an_error_not_an_exception(tmp_path: Path) -> None:
    s = FileStore(tmp_path)
    s.path_for("bad").mkdir(parents=True)  # a directory where the file should be
    s.put_many({"good": b"ok"})
    assert s.get_many(["bad", "good"]) == [None, b"ok"]
    assert s.exists_many(["bad", "good"]) == [False, True]
    assert s.delete_many(["bad"]) == 0
    stats = s.stats()
    assert stats["errors"] == 2 and stats["misses"] == 1


# ------------------------------------------------------------------------------------------------- redis


def _info_calls(store: RedisStore, command: str) -> int:
    stats = store._client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.redis
def test_redis_batch_get_is_one_round_trip(quiet_redis_url: str) -> None:
    s = RedisStore(quiet_redis_url)
    keys = [f"kvrag:kv:{i}" for i in range(50)]
    s.put_many({k: k.encode() for k in keys[::2]})
    rt, mget = s.stats()["round_trips"], _info_calls(s, "mget")
    got = s.get_many(keys)
    assert got == [k.encode() if i % 2 == 0 else None for i, k in enumerate(keys)]
    assert s.stats()["round_trips"] - rt == 1
    assert _info_calls(s, "mget") - mget == 1
    rt = s.stats()["round_trips"]
    s.put_many({k: b"x" for k in keys})
    assert s.stats()["round_trips"] - rt == 1
    s.delete_many(keys)
    s.close()


@pytest.mark.redis
def test_redis_ttl_and_prefix(redis_store_url: str, redis_prefix: str) -> None:
    s = RedisStore(redis_store_url + "&ttl=100")
    s.put_many({"kvrag:kv:t": b"v"})
    ttl = s._client.ttl(redis_prefix + "kvrag:kv:t")
    assert 0 < ttl <= 100
    s2 = RedisStore(redis_store_url)
    s2.put_many({"kvrag:kv:p": b"v"})
    assert s2._client.ttl(redis_prefix + "kvrag:kv:p") == -1  # no ttl: never expires
    assert s2._client.get("kvrag:kv:p") is None  # stored under the prefix only
    s.close()
    s2.close()


def test_redis_unreachable_server_degrades_to_misses(caplog: pytest.LogCaptureFixture) -> None:
    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0?timeout=0.2")
    with caplog.at_level("WARNING", logger="kvrag.kvcache"):
        assert s.get_many(["a", "b"]) == [None, None]
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    t0 = time.perf_counter()
    assert s.get_many(["a"]) == [None]  # inside the back-off: no network at all
    s.put_many({"a": b"1"})
    assert s.exists_many(["a"]) == [False] and s.delete_many(["a"]) == 0
    assert time.perf_counter() - t0 < 0.05
    stats = s.stats()
    assert stats["errors"] == 1 and stats["skipped"] == 4 and stats["available"] == 0
    assert stats["gets"] == 3 and stats["misses"] == 3 and stats["puts"] == 0
    assert s.ping() is False
    s.close()


def test_redis_put_on_unreachable_server_does_not_raise() -> None:
    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0?timeout=0.2&retry_after=0")
    s.put_many({"a": b"1"})
    s.put_many({"a": b"1"})  # no back-off with retry_after=0: it tries again
    assert s.stats()["errors"] == 2 and s.stats()["round_trips"] == 2


@pytest.mark.redis
def test_redis_server_stopped_mid_run_then_back(private_redis) -> None:
    port = private_redis.port
    s = RedisStore(f"{private_redis.url}?timeout=0.3&retry_after=0.2&prefix=t:")
    s.put_many({"a": b"1", "b": b"2"})
    assert s.get_many(["a", "b"]) == [b"1", b"2"]
    private_redis.stop()
    private_redis.stop()  # idempotent
    assert s.get_many(["a", "b"]) == [None, None]
    s.put_many({"c": b"3"})  # skipped: inside the back-off
    assert s.ping() is False
    stats = s.stats()
    assert stats["errors"] >= 2 and stats["skipped"] >= 1
    with start_redis_server(port=port):  # a fresh (empty) server on the same port
        time.sleep(0.25)
        s.put_many({"c": b"3"})
        assert s.get_many(["a", "c"]) == [None, b"3"]
        assert s.ping() is True
    s.close()


def test_redis_url_hides_password_and_strips_own_params() -> None:
    s = RedisStore("redis://:s3cret@127.0.0.1:1/2?timeout=0.25&ttl=60&prefix=p:&max_connections=4")
    assert "s3cret" not in s.url and "s3cret" not in repr(s) and "s3cret" not in str(s.stats())
    assert (s.timeout, s.ttl, s.prefix, s.retry_after) == (0.25, 60, "p:", 2.0)
    kwargs = s._client.connection_pool.connection_kwargs
    assert kwargs["db"] == 2 and kwargs["password"] == "s3cret"
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
    assert s._client.connection_pool.max_connections == 4
    s.close()


# ------------------------------------------------------------------------------------------------ tiered


def test_tiered_back_hit_fills_front(tmp_path: Path) -> None:
    front, back = MemoryStore(MiB), FileStore(tmp_path)
    s = TieredStore(front, back)
    back.put_many({"k": b"from back"})
    assert s.get_many(["k", "none"]) == [b"from back", None]
    assert front.exists_many(["k"]) == [True]
    back_gets, front_hits = back.stats()["gets"], front.stats()["hits"]
    assert s.get_many(["k"]) == [b"from back"]
    assert back.stats()["gets"] == back_gets  # served by the front alone
    assert front.stats()["hits"] == front_hits + 1
    stats = s.stats()
    assert stats["hits"] == 2 and stats["misses"] == 1 and stats["promotions"] == 1
    assert stats["front"]["kind"] == "memory" and stats["back"]["kind"] == "file"
    s.put_many({"w": b"both"})
    assert front.get_many(["w"]) == back.get_many(["w"]) == [b"both"]
    assert s.delete_many(["w", "k", "none"]) == 2
    assert front.exists_many(["w", "k"]) == back.exists_many(["w", "k"]) == [False, False]


def test_tiered_exists_falls_back_and_dead_back_still_serves_front() -> None:
    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0?timeout=0.2")
    s = TieredStore(MemoryStore(MiB), dead)
    s.put_many({"k": b"v"})  # the back fails (logged, counted), the front keeps it
    assert s.get_many(["k", "x"]) == [b"v", None]
    assert s.exists_many(["k", "x"]) == [True, False]
    assert s.ping() is False
    assert s.stats()["back"]["errors"] == 2  # the put, then the ping (which always asks)
    assert s.stats()["errors"] == 2  # an outage of the back shows at the top level too


# --------------------------------------------------------------------------------------------------- URLs


def test_open_memory_and_file_urls(tmp_path: Path) -> None:
    s = open_kv_store("memory://")
    assert isinstance(s, MemoryStore) and s.max_bytes == 1 << 30
    assert open_kv_store("memory://?max_bytes=2G").max_bytes == 2 << 30
    assert open_kv_store("memory://?max_bytes=512K").max_bytes == 512 << 10
    assert open_kv_store("memory://?max_bytes=1000").max_bytes == 1000
    f = open_kv_store(f"file://{tmp_path}/kv")
    assert isinstance(f, FileStore) and f.root == tmp_path / "kv" and f.root.is_dir()
    t = open_kv_store(f"memory+file://{tmp_path}/kv2?mem_bytes=64M")
    assert isinstance(t, TieredStore) and isinstance(t.back, FileStore)
    assert t.front.max_bytes == 64 * MiB and t.back.root == tmp_path / "kv2"
    assert open_kv_store(f"memory+file://{tmp_path}/kv3").front.max_bytes == 1 << 30


def test_open_redis_urls() -> None:
    r = open_kv_store("redis://:pw@localhost:6390/3?ttl=5&prefix=a:b:&timeout=1.5&retry_after=0.5")
    assert isinstance(r, RedisStore) and (r.ttl, r.prefix, r.timeout, r.retry_after) == (5, "a:b:", 1.5, 0.5)
    assert "pw" not in r.url
    assert isinstance(open_kv_store("rediss://example.invalid:6380/0"), RedisStore)
    u = open_kv_store("unix:///tmp/nonexistent-kvrag.sock?db=1&prefix=x")
    assert isinstance(u, RedisStore) and u.prefix == "x"
    t = open_kv_store("memory+redis://:pw@localhost:6390/0?mem_bytes=1M&prefix=q:")
    assert isinstance(t, TieredStore) and isinstance(t.back, RedisStore)
    assert t.front.max_bytes == MiB and t.back.prefix == "q:"
    assert "mem_bytes" not in t.back.url and "pw" not in t.url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "nonsense",
        "ftp://host/x",
        "file://relative/path",
        "file:///abs?x=1",
        "memory://?max_bytes=lots",
        "memory://?max_bytes=0",
        "memory://?maxbytes=1G",
        "memory://somewhere",
        "redis://localhost/0?ttl=0",
        "redis://localhost/0?ttl=ten",
        "redis://localhost/0?timeout=-1",
        "redis://localhost/0?retry_after=x",
        "redis://localhost/0?bogus=1",
        "redis://localhost:notaport/0",
        "file+memory:///tmp/x",
        "memory+memory://",
        "memory+redis://localhost/0?mem_bytes=big",
    ],
)
def test_bad_urls_raise_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInputError):
        open_kv_store(url)


def test_unknown_scheme_names_accepted_forms() -> None:
    with pytest.raises(InvalidInputError, match=r"memory://.*file:///.*redis://"):
        open_kv_store("s3://bucket/kv")


def test_redact_url() -> None:
    assert redact_url("redis://:hunter2@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:hunter2@host/1?ttl=5") == "rediss://user:***@host/1?ttl=5"
    assert "hunter2" not in redact_url("redis://host/0?password=hunter2&prefix=a:")
    assert "hunter2" not in redact_url("memory+redis://:hunter2@host/0?mem_bytes=1G")
    assert redact_url("redis://user@host/0") == "redis://user@host/0"
    assert redact_url("memory://?max_bytes=1G") == "memory://?max_bytes=1G"
