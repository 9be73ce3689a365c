"""Tests for index.ray_job (`kvrag index --engine ray`) on a local Ray instance with 2 CPUs.

The same small corpus is indexed by the local engine and by the Ray engine with 1 and with 2 actors
per pool; passages, ids, vectors, search results and the stored passage KV caches must agree. Each
Ray run starts its actor pools (a few seconds each on a loaded 2-core machine), so the runs are
module fixtures shared by the tests.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from kvrag.encoders.encoder import EncoderConfig  # noqa: E402
from kvrag.errors import InvalidInputError  # noqa: E402
from kvrag.index import ray_job  # noqa: E402
from kvrag.index.collection import Collection, CollectionConfig  # noqa: E402
from kvrag.index.job import index_paths  # noqa: E402
from kvrag.index.ray_job import KVJobConfig, RayOptions, index_paths_ray  # noqa: E402
from kvrag.rag.kvcache.codec import decode_kv  # noqa: E402
from kvrag.rag.kvcache.manager import KVCacheManager  # noqa: E402
from kvrag.rag.kvcache.store import open_kv_store  # noqa: E402
from kvrag.service.cli import main  # noqa: E402
from tests.index.test_job import N_DOCS, write_sources  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "c"
CONFIG = {"max_tokens": 64, "overlap_tokens": 8}
QUERIES = ["cold weather in the north", "fresh bread from the baker", "def foo", "a cat on the table"]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_sources(tmp_path_factory.mktemp("corpus"))


def kv_url(home: Path) -> str:
    return f"file://{home / 'kv'}"


def pieces(generator, collection: Collection) -> dict[int, list[int]]:
    rows = collection.store.passages(collection.store.passage_ids())
    return {r.id: generator.passage_ids(r.text, r.doc_title) for r in rows}


@pytest.fixture(scope="module")
def local(tmp_path_factory, corpus, tiny_encoder, tiny_generator):
    """The local engine: index_paths, then the passage KV precompute as `kvrag index` runs it."""
    home = tmp_path_factory.mktemp("local")
    coll = Collection.create(home, NAME, CollectionConfig(encoder=tiny_encoder.name, **CONFIG))
    report = index_paths(coll, [corpus], tiny_encoder)
    kv = KVCacheManager(tiny_generator, open_kv_store(kv_url(home)), "fp16")
    kv_report = kv.ensure(list(pieces(tiny_generator, coll).values()))
    yield {"home": home, "coll": coll, "report": report, "kv": kv_report}
    coll.close()


def ray_run(home: Path, corpus: Path, model_dir: Path, llama_dir: Path, actors: int, *, create: bool = True):
    coll = (
        Collection.create(home, NAME, CollectionConfig(encoder=str(model_dir), **CONFIG))
        if create
        else Collection.open(home, NAME)
    )
    report, kv_report = index_paths_ray(
        coll,
        [corpus],
        EncoderConfig(model=str(model_dir), batch_tokens=512),
        kv=KVJobConfig(generator=str(llama_dir), models_dir=home / "models", url=kv_url(home)),
        options=RayOptions(actors=actors, batch_size=4, doc_batch_size=2),
    )
    return coll, report, kv_report


@pytest.fixture(scope="module")
def ray1(tmp_path_factory, ray_local, corpus, tiny_model_dir, tiny_llama_dir):
    home = tmp_path_factory.mktemp("ray1")
    coll, report, kv_report = ray_run(home, corpus, tiny_model_dir, tiny_llama_dir, 1)
    run = {"home": home, "coll": coll, "report": report, "kv": kv_report}
    yield run
    run["coll"].close()


@pytest.fixture(scope="module")
def ray2(tmp_path_factory, ray_local, corpus, tiny_model_dir, tiny_llama_dir):
    home = tmp_path_factory.mktemp("ray2")
    coll, report, kv_report = ray_run(home, corpus, tiny_model_dir, tiny_llama_dir, 2)
    run = {"home": home, "coll": coll, "report": report, "kv": kv_report}
    yield run
    run["coll"].close()


def passages(coll: Collection) -> list[tuple]:
    rows = coll.store.passages(coll.store.passage_ids())
    return [
        (
            r.id,
            r.doc_id,
            r.ord,
            r.text,
            r.start,
            r.end,
            r.lang,
            r.kind,
            r.title,
            r.doc_title,
            r.source,
            r.metadata,
        )
        for r in rows
    ]


def vectors(coll: Collection) -> dict[int, np.ndarray]:
    """The saved index's vectors by passage id (read back from disk)."""
    reopened = Collection.open(coll.folder.parent.parent, coll.name)
    try:
        index = reopened.index
        floats = index.floats.array()
        return {int(pid): floats[row] for row, pid in enumerate(index.row_ids.tolist()) if pid >= 0}
    finally:
        reopened.close()


def test_same_report_as_the_local_engine(local, ray1):
    a, b = local["report"], ray1["report"]
    for field in (
        "documents_seen",
        "added",
        "replaced",
        "unchanged",
        "pruned",
        "passages_added",
        "passages_removed",
        "repaired",
        "skipped_files",
        "documents",
        "passages",
    ):
        assert getattr(b, field) == getattr(a, field), field
    assert b.documents == N_DOCS and b.passages > N_DOCS  # the English document is split


def test_same_passages_and_ids(local, ray1):
    assert passages(ray1["coll"]) == passages(local["coll"])
    assert ray1["coll"].store.document_hashes() == local["coll"].store.document_hashes()
    for doc_id in local["coll"].store.document_hashes():
        a, b = local["coll"].store.get_document(doc_id), ray1["coll"].store.get_document(doc_id)
        assert {k: v for k, v in a.items() if k != "updated_at"} == {
            k: v for k, v in b.items() if k != "updated_at"
        }


def test_same_vectors(local, ray1):
    a, b = vectors(local["coll"]), vectors(ray1["coll"])
    assert sorted(a) == sorted(b) == local["coll"].store.passage_ids()
    for pid in a:
        np.testing.assert_allclose(b[pid], a[pid], atol=1e-5)


def test_same_search_results(local, ray1, tiny_encoder):
    for q in QUERIES:
        for hybrid in (False, True):
            a = local["coll"].search(q, tiny_encoder, k=5, hybrid=hybrid)
            b = ray1["coll"].search(q, tiny_encoder, k=5, hybrid=hybrid)
            assert [h.passage_id for h in b] == [h.passage_id for h in a], (q, hybrid)
            assert [h.score for h in b] == pytest.approx([h.score for h in a], abs=1e-5)


def test_kv_caches_written_by_the_actors_equal_the_local_ones(local, ray1, tiny_generator):
    n = len(local["coll"].store.passage_ids())
    assert local["kv"]["kv_computed"] == n
    assert (ray1["kv"]["kv_computed"], ray1["kv"]["kv_present"], ray1["kv"]["store_errors"]) == (n, 0, 0)
    assert ray1["kv"]["kv_bytes_written"] == local["kv"]["kv_bytes_written"]
    assert ray1["kv"]["url"] == kv_url(ray1["home"]) and ray1["kv"]["codec"] == "fp16"
    local_store, ray_store = open_kv_store(kv_url(local["home"])), open_kv_store(kv_url(ray1["home"]))
    manager = KVCacheManager(tiny_generator, ray_store, "fp16")
    keys = [manager.key(())] + [manager.key(p) for p in pieces(tiny_generator, ray1["coll"]).values()]
    assert all(ray_store.exists_many([k.key for k in keys]))  # the shared prefix and every passage
    for key, blob_a, blob_b in zip(
        keys,
        local_store.get_many([k.key for k in keys]),
        ray_store.get_many([k.key for k in keys]),
        strict=True,
    ):
        ka, va = decode_kv(blob_a, expect_digest=key.digest)
        kb, vb = decode_kv(blob_b, expect_digest=key.digest)
        assert ka.shape == kb.shape
        assert float((ka - kb).abs().max()) <= 2e-3 and float((va - vb).abs().max()) <= 2e-3


def test_one_and_two_actors_give_identical_results(ray1, ray2):
    assert passages(ray2["coll"]) == passages(ray1["coll"])
    a, b = vectors(ray1["coll"]), vectors(ray2["coll"])
    assert sorted(a) == sorted(b)
    for pid in a:
        np.testing.assert_array_equal(b[pid], a[pid])
    assert {k: v for k, v in ray2["kv"].items() if k not in ("kv_seconds", "url")} == {
        k: v for k, v in ray1["kv"].items() if k not in ("kv_seconds", "url")
    }
    s1, s2 = open_kv_store(kv_url(ray1["home"])), open_kv_store(kv_url(ray2["home"]))
    names = sorted(p.name for p in Path(s1.root).rglob("*") if p.is_file())
    assert names == sorted(p.name for p in Path(s2.root).rglob("*") if p.is_file())


def test_second_run_through_the_cli_is_a_noop(ray2, corpus, tiny_llama_dir, monkeypatch, capsys):
    home = ray2["home"]
    monkeypatch.setenv("KVRAG_HOME", str(home))
    monkeypatch.setenv("KVRAG_EMBEDDING_CACHE", "false")
    before_vectors = vectors(ray2["coll"])
    before_rows = len(ray2["coll"].index.row_ids)
    argv = ["index", "--collection", NAME, "--engine", "ray", "--actors", "2", "--json"]
    argv += ["--generator", str(tiny_llama_dir), "--kv-url", kv_url(home), str(corpus)]
    capsys.readouterr()
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["engine"], out["actors"]) == ("ray", 2)
    assert (out["documents_seen"], out["unchanged"]) == (N_DOCS, N_DOCS)
    assert (out["added"], out["replaced"], out["pruned"], out["repaired"]) == (0, 0, 0, 0)
    assert (out["passages_added"], out["passages_removed"]) == (0, 0)
    n = out["passages"]
    assert (out["kv"]["kv_computed"], out["kv"]["kv_present"], out["kv"]["kv_bytes_written"]) == (0, n, 0)
    reopened = Collection.open(home, NAME)
    try:
        assert len(reopened.index.row_ids) == before_rows  # nothing re-added, not even as deleted rows
    finally:
        reopened.close()
    after = vectors(ray2["coll"])
    assert sorted(after) == sorted(before_vectors)
    for pid, v in after.items():
        np.testing.assert_array_equal(v, before_vectors[pid])


def test_an_interrupted_run_is_resumed(
    ray2, corpus, tiny_model_dir, tiny_llama_dir, tiny_generator, tmp_path, monkeypatch
):
    """A run that died after storing passages but before saving their vectors and writing their KV:
    the next run embeds exactly those passages and computes exactly the missing caches, even though
    an encoder actor dies in the middle of it (Ray restarts the actor and retries its batch)."""
    marker = tmp_path / "crashed"

    class CrashOnce(ray_job._Embedder):
        def __call__(self, batch):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # the worker process dies mid-batch
            return super().__call__(batch)

    monkeypatch.setattr(ray_job, "_Embedder", CrashOnce)
    home, coll = ray2["home"], ray2["coll"]
    before = vectors(coll)
    coll.close()
    reopened = Collection.open(home, NAME)
    lost = reopened.store.get_document(str(corpus.resolve() / "en.md"))["passages"]
    assert reopened.index.remove(lost) == len(lost) >= 2
    reopened.commit()
    store = open_kv_store(kv_url(home))
    manager = KVCacheManager(tiny_generator, store, "fp16")
    by_id = pieces(tiny_generator, reopened)
    assert store.delete_many([manager.key(by_id[pid]).key for pid in lost]) == len(lost)
    reopened.close()

    coll, report, kv_report = ray_run(home, corpus, tiny_model_dir, tiny_llama_dir, 2, create=False)
    ray2["coll"] = coll  # the fixture closes it
    assert (report.unchanged, report.added, report.repaired, report.passages_added) == (
        N_DOCS,
        0,
        len(lost),
        0,
    )
    assert (kv_report["kv_computed"], kv_report["kv_present"]) == (len(lost), len(by_id) - len(lost))
    after = vectors(coll)
    assert sorted(after) == sorted(before)
    for pid in after:
        np.testing.assert_allclose(after[pid], before[pid], atol=1e-5)
    assert all(store.exists_many([manager.key(p).key for p in by_id.values()]))
    assert marker.exists()  # the actor did die once


def test_memory_kv_store_is_rejected(tmp_path, corpus, tiny_model_dir):
    coll = Collection.create(tmp_path, NAME, CollectionConfig(encoder=str(tiny_model_dir), **CONFIG))
    try:
        with pytest.raises(InvalidInputError, match="memory://"):
            index_paths_ray(
                coll,
                [corpus],
                EncoderConfig(model=str(tiny_model_dir)),
                kv=KVJobConfig(generator="x", models_dir=tmp_path, url="memory://"),
            )
        assert coll.store.counts() == {"documents": 0, "passages": 0}
    finally:
        coll.close()


def test_cli_without_ray_says_how_to_install_it(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv("KVRAG_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["index", "--collection", NAME, "--engine", "ray", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'kvrag[ray]'" in err and "--engine local" in err
    assert not (tmp_path / "home" / "collections" / NAME).exists()


def test_cli_rejects_ray_options_for_the_local_engine(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv("KVRAG_HOME", str(tmp_path / "home"))
    assert main(["index", "--collection", NAME, "--actors", "2", str(corpus)]) == 2
    assert "--engine ray" in capsys.readouterr().err


def test_prune_and_emptied_documents(ray1, corpus, tiny_model_dir):
    """Deleted and emptied files lose their passages; nothing else changes, so no pipeline runs."""
    coll = ray1["coll"]
    root = corpus.resolve()
    de, fr = root / "de.md", root / "sub" / "fr.md"
    gone = coll.store.get_document(str(de))["passages"] + coll.store.get_document(str(fr))["passages"]
    de_text = de.read_text(encoding="utf-8")
    fr_text = fr.read_text(encoding="utf-8")
    de.unlink()
    fr.write_text("  \n", encoding="utf-8")
    try:
        stats: dict = {}
        report, kv_report = index_paths_ray(
            coll, [corpus], EncoderConfig(model=str(tiny_model_dir)), prune=True, stats=stats
        )
    finally:
        de.write_text(de_text, encoding="utf-8")
        fr.write_text(fr_text, encoding="utf-8")
    assert kv_report is None
    assert (report.unchanged, report.passages_removed, report.documents) == (
        N_DOCS - 2,
        len(gone),
        N_DOCS - 2,
    )
    assert report.skipped_files[-1] == f"{fr} (empty)"
    assert stats["documents_chunked"] == stats["passages_embedded"] == 0
    assert coll.store.get_document(str(de)) is None and coll.store.get_document(str(fr)) is None
    live = sorted(coll.index.row_ids[coll.index.row_ids >= 0].tolist())
    assert live == coll.store.passage_ids() and not set(gone) & set(live)


# -- one ingest plan: a compressed collection gives the same passages, vectors and KV keys -----------


def _compressed_run(home: Path, engine: str, corpus, model_dir, llama_dir, tiny_encoder, tiny_generator):
    from kvrag.index.ingest import Compression
    from kvrag.rag.compress import open_from_source

    compression = Compression("selfinfo", 0.5, str(llama_dir))
    coll = Collection.create(home, NAME, CollectionConfig(encoder=str(model_dir), **CONFIG))
    if engine == "local":
        kv = KVCacheManager(tiny_generator, open_kv_store(kv_url(home)), "fp16")
        compressor = open_from_source("selfinfo", str(llama_dir), models_dir=home, generator=tiny_generator)
        index_paths(coll, [corpus], tiny_encoder, compression=compression, compressor=compressor, kv=kv)
    else:
        index_paths_ray(
            coll,
            [corpus],
            EncoderConfig(model=str(model_dir), batch_tokens=512),
            kv=KVJobConfig(generator=str(llama_dir), models_dir=home / "models", url=kv_url(home)),
            options=RayOptions(actors=1, batch_size=4, doc_batch_size=2),
            compression=compression,
        )
    return coll


def test_ray_and_local_agree_on_a_compressed_collection(
    tmp_path, ray_local, corpus, tiny_model_dir, tiny_llama_dir, tiny_encoder, tiny_generator
):
    from kvrag.index.ingest import kv_item

    local = _compressed_run(
        tmp_path / "l", "local", corpus, tiny_model_dir, tiny_llama_dir, tiny_encoder, tiny_generator
    )
    remote = _compressed_run(
        tmp_path / "r", "ray", corpus, tiny_model_dir, tiny_llama_dir, tiny_encoder, tiny_generator
    )
    try:
        assert passages(remote) == passages(local)
        rows_l = local.store.passages(local.store.passage_ids())
        rows_r = remote.store.passages(remote.store.passage_ids())
        # every passage got a compressed text, the same on both engines, shorter than the original
        assert all(r.compressed for r in rows_r)
        assert [r.compressed for r in rows_r] == [r.compressed for r in rows_l]
        assert sum(len(r.compressed) for r in rows_r) < sum(len(r.text) for r in rows_r)
        a, b = vectors(local), vectors(remote)
        assert sorted(a) == sorted(b)
        for pid in a:
            np.testing.assert_allclose(b[pid], a[pid], atol=1e-5)
        # the KV keys the query side looks up (from the compressed texts) are the ones each engine stored
        manager = KVCacheManager(tiny_generator, open_kv_store("memory://"), "fp16")
        keys = [manager.key(tiny_generator.passage_ids(*kv_item(r))).key for r in rows_l]
        for home in (tmp_path / "l", tmp_path / "r"):
            store = open_kv_store(kv_url(home))
            assert all(store.exists_many(keys)), home.name
            originals = [manager.key(tiny_generator.passage_ids(r.text, r.doc_title)).key for r in rows_l]
            assert not any(store.exists_many(originals)), home.name  # nothing cached for unused texts
            store.close()
    finally:
        local.close()
        remote.close()
