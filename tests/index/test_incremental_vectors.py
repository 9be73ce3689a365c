"""Incremental saves of index.vector: a save that added or deleted a few rows appends to the id log
and writes no FAISS file; loading replays the log; compaction past the threshold or on demand;
deleted ids never come back; version-1 manifests still load; torn logs are corrupt; a save that
fails or is killed half-way leaves the previous generation loadable."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import kvrag.index.vectors.persist as persist_module
from kvrag.encoders.compress import normalize
from kvrag.errors import CorruptIndexError
from kvrag.index.vector import MANIFEST, Compaction, VectorIndex

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("incremental_child.py")
DIM = 32
NB = 1200
SPECS = ["Flat", "HNSW16", "SQ8", "HNSW16,SQ8", "BFlat", "BHNSW16", "BIVF8"]
EXACT = ["Flat", "SQ8", "BFlat", "BIVF8"]  # the same codes give the same answers (BIVF: every list probed)


@pytest.fixture(scope="module")
def xb() -> np.ndarray:
    return normalize(np.random.default_rng(7).standard_normal((NB + 400, DIM)).astype(np.float32))


def ids_of(rows) -> np.ndarray:
    return 10 * np.asarray(rows, dtype=np.int64) + 3


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def faiss_files(folder: Path) -> dict[str, int]:
    """The FAISS and id map files in `folder`, with their inode numbers (a rewrite changes them)."""
    return {p.name: p.stat().st_ino for p in folder.iterdir() if p.suffix in (".faiss", ".npy")}


def fresh(spec: str, xb: np.ndarray, n: int = NB) -> VectorIndex:
    vi = VectorIndex(spec, DIM, binary_method="mean")
    vi.add(ids_of(range(n)), xb[:n])
    return vi


def probe_all(vi: VectorIndex) -> VectorIndex:
    if vi.spec.family == "bivf":
        vi.nprobe = vi.spec.param
    vi.ef_search = 256
    return vi


@pytest.mark.parametrize("spec", SPECS)
def test_an_append_only_save_writes_no_faiss_file_and_reloads_the_same(spec, xb, tmp_path):
    folder = tmp_path / "idx"
    vi = fresh(spec, xb)
    vi.save(folder)
    before = faiss_files(folder)
    first = manifest(folder)
    assert first["faiss_rows"] == NB and first["files"]["idlog"] is None and first["log_entries"] == 0

    vi.add(ids_of(range(NB, NB + 20)), xb[NB : NB + 20])
    vi.remove(ids_of([0, 1, 2, NB + 5]))  # three rows of the FAISS file, one logged row
    vi.save()
    vi.add(ids_of(range(NB + 20, NB + 30)), xb[NB + 20 : NB + 30])
    vi.save()
    m = manifest(folder)
    assert faiss_files(folder) == before, "an incremental save must not rewrite the FAISS file or id map"
    assert m["files"]["index"] == first["files"]["index"] and m["files"]["ids"] == first["files"]["ids"]
    assert (m["faiss_rows"], m["rows"], m["live"]) == (NB, NB + 30, NB + 26)
    assert m["log_entries"] == 20 + 3 + 10
    assert (folder / m["files"]["idlog"]).stat().st_size == m["log_entries"] * 16
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        {MANIFEST, *(v for v in m["files"].values() if v)}
    )

    loaded = probe_all(VectorIndex.load(folder))
    probe_all(vi)
    np.testing.assert_array_equal(loaded.row_ids, vi.row_ids)
    assert loaded.index.ntotal == vi.index.ntotal and loaded.ntotal == NB + 26
    np.testing.assert_array_equal(
        np.sort(VectorIndex.saved_ids(folder)), np.sort(vi.row_ids[vi.row_ids >= 0])
    )
    queries = xb[np.r_[0:3, NB : NB + 30 : 3]]
    got, want = loaded.search(queries, 5), vi.search(queries, 5)
    if spec in EXACT:
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    for ids in (got[1], loaded.search(queries, 5, rescore=4)[1]):
        assert not np.isin(ids, ids_of([0, 1, 2, NB + 5])).any()
    # each logged row is found by its own vector
    _, top = loaded.search(xb[NB + 6 : NB + 30], 1, rescore=4)
    assert np.mean(top[:, 0] == ids_of(range(NB + 6, NB + 30))) >= 0.9


@pytest.mark.parametrize("spec", ["Flat", "BIVF8", "HNSW16"])
def test_removed_ids_never_come_back_across_saves_loads_and_compaction(spec, xb, tmp_path):
    folder = tmp_path / "idx"
    fresh(spec, xb, 600).save(folder)
    gone: list[int] = []
    rng = np.random.default_rng(0)
    next_row = 600
    for step in range(6):
        vi = probe_all(VectorIndex.load(folder))
        live = vi.row_ids[vi.row_ids >= 0]
        drop = rng.choice(live, 7, replace=False)
        assert vi.remove(drop) == 7
        gone += drop.tolist()
        vi.add(ids_of(range(next_row, next_row + 5)), xb[next_row : next_row + 5])
        next_row += 5
        vi.save(compact=step == 3)
        saved = set(VectorIndex.saved_ids(folder).tolist())
        assert not saved & set(gone)
        reloaded = probe_all(VectorIndex.load(folder))
        assert reloaded.ntotal == 600 + 5 * (step + 1) - 7 * (step + 1)
        _, ids = reloaded.search(xb[(np.asarray(gone) - 3) // 10], 10, rescore=4)
        assert not np.isin(ids, gone).any()


def test_compaction_happens_once_the_log_passes_its_limit(xb, tmp_path):
    folder = tmp_path / "idx"
    vi = fresh("Flat", xb, 1000)
    vi.compaction = Compaction(fraction=0.05, min_rows=10, max_rows=1000)  # limit: 50 entries
    vi.save(folder)
    first = manifest(folder)["files"]["index"]
    row = 1000
    entries = []
    for _ in range(6):  # 10 entries a save: 5 added, 5 deleted
        vi.add(ids_of(range(row, row + 5)), xb[row : row + 5])
        vi.remove(ids_of(range(row - 1000, row - 995)))
        row += 5
        vi.save()
        m = manifest(folder)
        entries.append(m["log_entries"])
    assert entries == [10, 20, 30, 40, 50, 0], "the sixth save would pass the limit: it compacts"
    m = manifest(folder)
    assert m["files"]["index"] != first and m["files"]["idlog"] is None and m["faiss_rows"] == 1030
    assert not (folder / first).exists() and not any(p.suffix == ".i64" for p in folder.iterdir())
    loaded = VectorIndex.load(folder)
    np.testing.assert_array_equal(loaded.row_ids, vi.row_ids)
    np.testing.assert_array_equal(loaded.search(xb[:20], 5)[1], vi.search(xb[:20], 5)[1])
    assert Compaction().limit(50_000) == 5000 and Compaction().limit(10) == 128
    assert Compaction().limit(10_000_000) == 20_000


def test_compact_and_refit_and_a_new_folder_rewrite_the_faiss_file(xb, tmp_path):
    folder = tmp_path / "idx"
    vi = fresh("BFlat", xb, 400)
    vi.save(folder)
    vi.add(ids_of([400]), xb[400:401])
    vi.save()
    logged = manifest(folder)
    assert logged["log_entries"] == 1
    vi.compact()
    m = manifest(folder)
    assert m["files"]["index"] != logged["files"]["index"] and m["log_entries"] == 0
    vi.add(ids_of([401]), xb[401:402])
    vi.fit(xb[:300])  # a new calibration: the rows in the FAISS file were coded the old way
    vi.save()
    assert manifest(folder)["files"]["index"] != m["files"]["index"]
    vi.add(ids_of([402]), xb[402:403])
    other = vi.save(tmp_path / "other")
    assert manifest(other)["faiss_rows"] == 403 and manifest(other)["files"]["idlog"] is None


@pytest.mark.parametrize("fail_at", ["write_json", "log"])
def test_a_failed_incremental_save_keeps_the_previous_generation(fail_at, xb, tmp_path):
    folder = tmp_path / "idx"
    vi = fresh("Flat", xb, 500)
    vi.save(folder)
    vi.add(ids_of(range(500, 510)), xb[500:510])
    vi.save()
    before = VectorIndex.load(folder)
    vi.add(ids_of(range(510, 520)), xb[510:520])
    vi.remove(ids_of([3, 505]))
    real_save_to = persist_module.RowStore.save_to

    def log_then_fail(store, path: Path) -> None:
        real_save_to(store, path)
        if path.name.startswith("idlog"):  # the entries are written, the manifest never names them
            raise OSError("simulated crash")

    patch = (
        mock.patch.object(persist_module, "write_json", side_effect=OSError("simulated crash"))
        if fail_at == "write_json"
        else mock.patch.object(persist_module.RowStore, "save_to", log_then_fail)
    )
    with patch, pytest.raises(OSError, match="simulated crash"):
        vi.save()
    old = VectorIndex.load(folder)
    np.testing.assert_array_equal(old.row_ids, before.row_ids)
    assert manifest(folder)["log_entries"] == 10
    vi.save()  # writes the log entries again, over what the failed save left past the count
    new = VectorIndex.load(folder)
    np.testing.assert_array_equal(new.row_ids, vi.row_ids)
    assert manifest(folder)["log_entries"] == 10 + 10 + 2
    np.testing.assert_array_equal(new.search(xb[500:520], 3)[1], vi.search(xb[500:520], 3)[1])


def test_a_version_1_manifest_loads_and_is_saved_incrementally_after(xb, tmp_path):
    """The layout written before id logs: no faiss_rows, no idlog; it is a compacted index."""
    folder = tmp_path / "idx"
    vi = fresh("Flat", xb, 300)
    vi.save(folder)
    m = manifest(folder)
    for key in ("faiss_rows", "log_entries"):
        m.pop(key)
    m["files"].pop("idlog")
    m["format_version"] = 1
    (folder / MANIFEST).write_text(json.dumps(m))
    loaded = VectorIndex.load(folder)
    np.testing.assert_array_equal(loaded.row_ids, vi.row_ids)
    loaded.add(ids_of([300]), xb[300:301])
    loaded.save()
    assert manifest(folder)["files"]["index"] == m["files"]["index"]
    assert manifest(folder)["log_entries"] == 1
    assert VectorIndex.load(folder).ntotal == 301


@pytest.mark.parametrize(
    "tear", ["truncated log", "log row out of range", "log entries past the file", "empty id map"]
)
def test_a_torn_id_log_is_corrupt(tear, xb, tmp_path):
    folder = tmp_path / "idx"
    vi = fresh("Flat", xb, 200)
    vi.save(folder)
    vi.add(ids_of(range(200, 204)), xb[200:204])
    vi.save()
    m = manifest(folder)
    log = folder / m["files"]["idlog"]
    if tear == "truncated log":
        log.write_bytes(log.read_bytes()[:40])
    elif tear == "log row out of range":
        np.array([[999, 5]] * 4, dtype=np.int64).tofile(log)
    elif tear == "empty id map":
        (folder / m["files"]["ids"]).write_bytes(b"")
    else:
        m["log_entries"] = 9
        (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptIndexError):
        VectorIndex.load(folder)
    with pytest.raises(CorruptIndexError):
        VectorIndex.saved_ids(folder)


def test_a_sigkilled_incremental_writer_leaves_a_loadable_index(tmp_path):
    """Kill a process that loops (add 8, remove 3, incremental save) at random moments: the folder
    always loads, its log replays, and it holds every save() that had returned."""
    folder = tmp_path / "idx"
    delays = random.Random(20240612)
    saved_before = 0
    logged = 0  # the most log entries a kill left behind (a compaction empties the log)
    for _ in range(4):
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(folder)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = child.stdout.readline()  # type: ignore[union-attr]
            assert ready.startswith("ready"), child.stderr.read()  # type: ignore[union-attr]
            time.sleep(delays.uniform(0.3, 1.0))
        finally:
            child.send_signal(signal.SIGKILL)
            out, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, err
        saves = [line.split()[1:] for line in out.splitlines() if line.startswith("saved")]
        loaded = VectorIndex.load(folder)
        m = manifest(folder)
        if saves:
            rows, live = int(saves[-1][0]), int(saves[-1][1])
            # the last save that returned, or at most one more that committed before the kill
            assert (len(loaded.row_ids), loaded.ntotal) in ((rows, live), (rows + 8, live + 5))
        assert len(loaded.row_ids) >= saved_before
        live_ids = loaded.row_ids[loaded.row_ids >= 0]
        assert len(np.unique(live_ids)) == len(live_ids)
        assert loaded.index.ntotal == len(loaded.row_ids)
        np.testing.assert_array_equal(np.sort(VectorIndex.saved_ids(folder)), np.sort(live_ids))
        # every live row is found by its own stored vector
        rows = np.flatnonzero(loaded.row_ids >= 0)[-20:]
        _, ids = loaded.search(loaded.floats.take(rows), 1)
        np.testing.assert_array_equal(ids[:, 0], loaded.row_ids[rows])
        saved_before = len(loaded.row_ids)
        logged = max(logged, m["log_entries"])
        assert m["format_version"] == 2
    assert saved_before > 0 and logged > 0, "no incremental save was exercised"
