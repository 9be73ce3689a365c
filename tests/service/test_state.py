"""The app notices an index saved by another process (an indexing job) and searches the new one."""

from __future__ import annotations

import time

from kvrag.encoders.encoder import load_encoder
from kvrag.index.collection import Collection
from kvrag.index.job import Document, index_documents


def test_search_sees_documents_indexed_by_a_job(client, collection, shared_state) -> None:
    url = f"/v1/collections/{collection}/search"
    query = {"query": "lighthouse keeper Orsolya", "k": 10}
    before = client.post(url, json=query).json()["hits"]
    assert "lighthouse" not in {h["doc_id"] for h in before}

    time.sleep(0.01)  # a distinct manifest mtime
    job = Collection.open(shared_state.home, collection)  # as `kvrag index` would, in its own process
    try:
        encoder = load_encoder(shared_state.settings.encoder_config(job.config.encoder))
        doc = Document(
            "lighthouse", "Orsolya kept the lighthouse of Varna for forty years.", title="Lighthouse"
        )
        index_documents(job, iter([doc]), encoder)
    finally:
        job.close()

    after = client.post(url, json=query).json()["hits"]
    assert "lighthouse" in {h["doc_id"] for h in after}
    info = client.get(f"/v1/collections/{collection}").json()
    assert info["documents"] == 4


def test_an_upsert_through_the_app_does_not_reload_the_collection(client, collection, shared_state) -> None:
    with shared_state.lease(collection) as lease:
        before = lease.collection
        stamp = Collection.stamp(shared_state.home, collection)
    time.sleep(0.01)  # a distinct manifest mtime
    doc = {"id": "harbour", "text": "The harbour of Varna was rebuilt in stone.", "title": "Harbour"}
    r = client.post(f"/v1/collections/{collection}/documents", json={"documents": [doc], "kv": False})
    assert r.status_code == 200, r.text
    assert Collection.stamp(shared_state.home, collection) != stamp  # the index was saved
    with shared_state.lease(collection) as lease:
        assert lease.collection is before  # its own save: no reload of FAISS and BM25
    hits = client.post(f"/v1/collections/{collection}/search", json={"query": "harbour Varna", "k": 3})
    assert "harbour" in {h["doc_id"] for h in hits.json()["hits"]}
