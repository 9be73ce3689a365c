"""The file store's byte budget: least recently used files go, reads refresh, stores share a folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvrag.errors import InvalidInputError
from kvrag.rag.kvcache import FileStore, TieredStore, open_kv_store, parse_store_url

MiB = 1 << 20


def disk(root: Path) -> dict[str, int]:
    """File name -> size of every value file under `root` (temp files would show as well)."""
    return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()}


def names(store: FileStore, *keys: str) -> set[str]:
    return {store.path_for(k).name for k in keys}


def test_budget_holds_after_many_puts(tmp_path: Path) -> None:
    s = FileStore(tmp_path, max_bytes=10_000)
    for i in range(60):
        s.put_many({f"k{i}": bytes([i]) * 1000})
    s.put_many({f"b{i}": os.urandom(900) for i in range(5)})  # one batch: five files go for it
    on_disk = disk(tmp_path)
    assert sum(on_disk.values()) <= 10_000
    assert set(on_disk) == names(s, *(f"k{i}" for i in range(55, 60)), *(f"b{i}" for i in range(5)))
    assert s.get_many(["k59", "k54"]) == [bytes([59]) * 1000, None]
    stats = s.stats()
    assert stats["bytes"] == sum(on_disk.values()) == 9500 and stats["files"] == 10
    assert stats["evicted"] == 55 and stats["puts"] == 65 and stats["max_bytes"] == 10_000


def test_a_read_keeps_a_key_and_exists_does_not(tmp_path: Path) -> None:
    s = FileStore(tmp_path, max_bytes=300)
    for k in "abc":
        s.put_many({k: k.encode() * 100})
    assert s.get_many(["a"]) == [b"a" * 100]  # a is now more recent than b and c
    assert s.exists_many(["b"]) == [True]  # no refresh
    s.put_many({"d": b"d" * 100})
    assert s.exists_many(["a", "b", "c", "d"]) == [True, False, True, True]
    s.put_many({"e": b"e" * 150})  # two go: c, then a
    assert s.exists_many(["a", "c", "d", "e"]) == [False, False, True, True]
    assert set(disk(tmp_path)) == names(s, "d", "e")
    assert s.stats()["evicted"] == 3 and s.stats()["bytes"] == 250


def test_values_that_do_not_fit_are_not_stored(tmp_path: Path) -> None:
    s = FileStore(tmp_path, max_bytes=250)
    s.put_many({"k": b"small", "old": b"o" * 100})
    s.put_many({"k": b"x" * 251, "other": b"y" * 251})
    assert s.get_many(["k", "other", "old"]) == [None, None, b"o" * 100]  # the stale value is gone too
    assert set(disk(tmp_path)) == names(s, "old")
    s.put_many({"a": b"a" * 100, "b": b"b" * 100, "c": b"c" * 100})  # together over the budget
    assert s.exists_many(["old", "a", "b", "c"]) == [False, True, True, False]  # none of the call's own
    stats = s.stats()
    assert stats["skipped"] == 3 and stats["bytes"] == 200 == sum(disk(tmp_path).values())


def test_no_budget_never_evicts(tmp_path: Path) -> None:
    s = open_kv_store(f"file://{tmp_path}/kv")
    assert isinstance(s, FileStore) and s.max_bytes is None
    for i in range(40):
        s.put_many({f"k{i}": os.urandom(10_000)})
    assert len(disk(tmp_path / "kv")) == 40
    assert all(s.exists_many([f"k{i}" for i in range(40)]))
    stats = s.stats()
    assert "evicted" not in stats and "bytes" not in stats and stats["puts"] == 40


def test_an_existing_folder_is_scanned_once_and_trimmed(tmp_path: Path) -> None:
    FileStore(tmp_path).put_many({f"old{i}": b"o" * 1000 for i in range(8)})
    s = FileStore(tmp_path, max_bytes=4000)
    assert s.stats()["bytes"] == 8000  # what is there, over the budget until the next put
    s.put_many({"new": b"n" * 1000})
    assert sum(disk(tmp_path).values()) == 4000 and s.exists_many(["new"]) == [True]
    assert s.stats()["evicted"] == 5


NEVER = 1 << 50  # rescan_bytes: no rescan after the first scan


def test_two_stores_on_one_folder(tmp_path: Path) -> None:
    a = FileStore(tmp_path, max_bytes=5000, rescan_bytes=NEVER)
    b = FileStore(tmp_path, max_bytes=5000)
    a.put_many({f"a{i}": b"a" * 1000 for i in range(5)})
    b.put_many({f"b{i}": b"b" * 1000 for i in range(5)})  # b sees a's files and deletes them all
    assert set(disk(tmp_path)) == names(b, *(f"b{i}" for i in range(5)))
    assert a.get_many(["a0", "b4"]) == [None, b"b" * 1000]  # a counts b4 now that it has read it
    a.put_many({"a5": b"a" * 1000})  # a's own files are gone: dropped from its count, nothing deleted
    assert a.stats()["evicted"] == 0 and a.exists_many(["a5"]) == [True]
    assert a.delete_many(["a1", "b0"]) == 1
    assert b.get_many(["b0"]) == [None]
    b.put_many({"b5": b"b" * 1000})  # b rescans: a5 counts, b0 is gone, b1 goes
    assert set(disk(tmp_path)) == names(b, "a5", "b2", "b3", "b4", "b5")
    assert a.stats()["errors"] == 0 and b.stats()["errors"] == 0


@pytest.mark.parametrize("rescan_bytes", [None, NEVER], ids=["rescan", "no-rescan"])
def test_a_read_in_another_process_counts_as_recent(tmp_path: Path, rescan_bytes: int | None) -> None:
    writer = FileStore(tmp_path, max_bytes=3000, rescan_bytes=rescan_bytes)
    writer.put_many({"x": b"x" * 1000})
    writer.put_many({"y": b"y" * 1000})
    writer.put_many({"z": b"z" * 1000})
    assert FileStore(tmp_path).get_many(["x"]) == [b"x" * 1000]  # a server with no budget of its own
    writer.put_many({"w": b"w" * 1000})  # x was oldest to the writer, but the file says otherwise
    assert writer.exists_many(["x", "y", "z", "w"]) == [True, False, True, True]


@pytest.mark.parametrize("rescan_bytes", [None, NEVER], ids=["rescan", "no-rescan"])
def test_rescans_count_what_other_stores_wrote(tmp_path: Path, rescan_bytes: int | None) -> None:
    s = FileStore(tmp_path, max_bytes=5000, rescan_bytes=rescan_bytes)
    s.put_many({"s0": b"s" * 1000, "s1": b"s" * 1000})
    FileStore(tmp_path).put_many({f"o{i}": b"o" * 1000 for i in range(6)})  # unseen by s
    s.put_many({"s2": b"s" * 1000})
    total = sum(disk(tmp_path).values())
    if rescan_bytes is None:
        assert total == 5000 and s.stats()["bytes"] == 5000 and s.exists_many(["s2"]) == [True]
    else:  # without a rescan s knows only its own three files
        assert total == 9000 and s.stats()["bytes"] == 3000


def test_a_failed_write_keeps_the_old_value_and_its_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = FileStore(tmp_path, max_bytes=1000)
    s.put_many({"k": b"old", "j": b"j" * 500})

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    s.put_many({"k": b"n" * 900})
    monkeypatch.undo()
    assert s.get_many(["k", "j"]) == [b"old", None]  # j made room for a write that failed
    stats = s.stats()
    assert stats["errors"] == 1 and stats["bytes"] == 3 == sum(disk(tmp_path).values())


def test_repeated_reads_keep_the_heap_small(tmp_path: Path) -> None:
    s = FileStore(tmp_path, max_bytes=MiB)
    s.put_many({f"k{i}": b"v" for i in range(10)})
    for _ in range(300):
        s.get_many(["k3", "k7"])
    assert len(s._heap) <= 2 * 10 + 64
    s.put_many({"big": b"b" * (MiB - 5)})  # five of the ten go, k3 and k7 (just read) stay
    assert s.exists_many(["k3", "k7", "k0", "big"]) == [True, True, False, True]


# --------------------------------------------------------------------------------------------------- URLs


def test_file_url_takes_max_bytes(tmp_path: Path) -> None:
    assert parse_store_url("file:///tmp/x?max_bytes=1M").max_bytes == MiB
    assert parse_store_url("file:///tmp/x?max_bytes=1.5G").max_bytes == 3 << 29
    assert parse_store_url("file:///tmp/x?max_bytes=20000").max_bytes == 20_000
    assert parse_store_url("file:///tmp/x").max_bytes is None
    s = open_kv_store(f"file://{tmp_path}/kv?max_bytes=64K")
    assert isinstance(s, FileStore) and s.max_bytes == 64 << 10 and s.root == tmp_path / "kv"
    assert s.url == f"{(tmp_path / 'kv').as_uri()}?max_bytes=65536"
    t = open_kv_store(f"memory+file://{tmp_path}/kv2?mem_bytes=1M&max_bytes=2G")
    assert isinstance(t, TieredStore) and isinstance(t.back, FileStore)
    assert t.front.max_bytes == MiB and t.back.max_bytes == 2 << 30


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///tmp/x?max_bytes=0", r"max_bytes .*must be positive"),
        ("file:///tmp/x?max_bytes=lots", r"max_bytes .*bad size 'lots'"),
        ("file:///tmp/x?max_bytes=-1G", r"max_bytes .*bad size"),
        ("file:///tmp/x?max_bytes=", r"max_bytes .*bad size"),
        ("file:///tmp/x?max_bytes=1G&max_bytes=2G", r"'max_bytes' given twice"),
        ("file:///tmp/x?maxbytes=1G", r"unknown parameter.*accepted: max_bytes"),
    ],
)
def test_bad_max_bytes_is_refused(url: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_store_url(url)


@pytest.mark.parametrize("max_bytes", [0, -5, True, "1G", 1.5])
def test_file_store_checks_max_bytes(tmp_path: Path, max_bytes: object) -> None:
    with pytest.raises(InvalidInputError, match="max_bytes"):
        FileStore(tmp_path, max_bytes=max_bytes)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="rescan_bytes"):
        FileStore(tmp_path, max_bytes=MiB, rescan_bytes=max_bytes)  # type: ignore[arg-type]
