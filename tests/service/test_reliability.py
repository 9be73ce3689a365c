"""The server against careless and hostile clients: dropped streams and hang-ups, body framing and
size tricks, slow clients, odd methods and paths, foreign Host headers, hostile values, deletes
racing requests. Most run against a live `kvrag serve` (uvicorn, real sockets)."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kvrag.service.gate import ModelGate
from kvrag.service.work import model_work, run_model_work
from tests.service.conftest import DOCS, start_server, stop_server

KEY = "reliability-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "How many moons does Mars have?"


@pytest.fixture(scope="module")
def server(service_env, tmp_path_factory):
    """A live server with short connection timeouts and a small connection limit."""
    env = {
        **service_env,
        "KVRAG_HOME": str(tmp_path_factory.mktemp("reliability-home")),
        "KVRAG_API_KEY": KEY,
        "KVRAG_HEADER_TIMEOUT_S": "1",
        "KVRAG_BODY_TIMEOUT_S": "1",
        "KVRAG_MAX_CONNECTIONS": "24",
        "KVRAG_QUEUE_TIMEOUT_S": "20",
    }
    proc, url = start_server(env)
    try:
        assert httpx.post(f"{url}/v1/collections", json={"name": "docs"}, headers=AUTH).status_code == 201
        r = httpx.post(
            f"{url}/v1/collections/docs/documents", json={"documents": DOCS}, headers=AUTH, timeout=60
        )
        assert r.status_code == 200, r.text
        yield url
    finally:
        stop_server(proc)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _raw(url: str, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        return out


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def _search(url: str, timeout: float = 2.0) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/collections/docs/search",
        json={"query": "Mars moons", "k": 2},
        headers=AUTH,
        timeout=timeout,
    )


def _slots(url: str) -> dict:
    return httpx.get(f"{url}/readyz", timeout=5).json()["model_slots"]


# ------------------------------------------------------------------------ dropped streams


def test_dropped_streams_do_not_wedge_the_server(server):
    """20 streamed answers cut mid-way by 8 clients; then a search answers within 2 s, and no
    model slot is left held."""
    body = {
        "collection": "docs",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "max_tokens": 400,
        "temperature": 1.0,
        "seed": 1,
    }
    cut = 0
    lock = threading.Lock()

    def client() -> list[int]:
        nonlocal cut
        statuses = []
        with httpx.Client(timeout=30, headers=AUTH) as c:
            while True:
                with lock:
                    if cut >= 20:
                        return statuses
                    cut += 1
                with c.stream("POST", f"{server}/v1/chat/completions", json=body) as r:
                    statuses.append(r.status_code)
                    seen = 0
                    for line in r.iter_lines():
                        seen += line.startswith("data: ")
                        if seen >= 3:  # the role chunk and two tokens: cut here
                            break
                # leaving the block closes the connection half-way through the stream

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for f in [pool.submit(client) for _ in range(8)] for s in f.result()]
    assert len(statuses) == 20 and set(statuses) == {200}, statuses
    t0 = time.perf_counter()
    r = _search(server, timeout=2.0)
    assert r.status_code == 200 and r.json()["hits"], r.text
    assert time.perf_counter() - t0 < 2.0
    deadline = time.monotonic() + 5
    while _slots(server)["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    slots = _slots(server)
    assert slots["running"] == 0 and slots["waiting"] == 0, slots
    ready = httpx.get(f"{server}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_a_non_streamed_answer_stops_when_its_client_hangs_up():
    """`model_work` with the request's receive: a disconnect stops the work between steps and
    frees the slot."""

    async def main():
        gate = ModelGate(1, 4, 5.0)
        produced = 0
        disconnect = asyncio.Event()

        async def receive():
            await disconnect.wait()
            return {"type": "http.disconnect"}

        def produce(stop):
            nonlocal produced
            for i in range(1000):
                time.sleep(0.005)
                produced += 1
                yield i

        task = asyncio.create_task(run_model_work(gate, produce, receive=receive))
        await asyncio.sleep(0.1)
        disconnect.set()
        items = await asyncio.wait_for(task, 5)
        await asyncio.sleep(0.05)
        return items, produced, gate.running

    items, produced, running = asyncio.run(main())
    assert produced < 200 and len(items) <= produced, produced  # 1000 without the hang-up
    assert running == 0


def test_a_cancelled_stream_stops_its_worker_and_frees_the_slot():
    """What Starlette does to a streaming response whose client disconnects: cancel it."""

    async def main():
        gate = ModelGate(1, 4, 5.0)
        stopped = threading.Event()

        def produce(stop):
            try:
                for i in range(100_000):
                    time.sleep(0.002)
                    yield i
            finally:
                stopped.set()

        async def consume():
            async for _ in model_work(gate, produce):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        assert gate.running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if stopped.is_set() and gate.running == 0:
                break
            await asyncio.sleep(0.02)
        # the slot is free again: a new holder gets it at once
        async with asyncio.timeout(1):
            async with gate.slot():
                pass
        return stopped.is_set(), gate.running

    assert asyncio.run(main()) == (True, 0)


def test_readyz_reports_a_wedged_gate(make_client):
    c = make_client(wedged_after_s=0.2)
    gate = c.app.state.kvrag.gate
    ticket = c.portal.call(gate.acquire)  # a slot that is never given back
    try:
        assert c.get("/readyz").status_code == 200
        time.sleep(0.3)
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "wedged" and r.json()["stuck"]["model_slot_held_s"] >= 0.2
    finally:
        c.portal.call(gate.release, ticket)
    assert c.get("/readyz").status_code == 200


def test_readyz_reports_a_collection_lock_held_too_long(make_client):
    c = make_client(wedged_after_s=0.2)
    lock = c.app.state.kvrag.lock("somewhere")
    with lock:
        time.sleep(0.3)
        r = c.get("/readyz")
        assert r.status_code == 503 and "somewhere" in r.json()["stuck"]["collection_locks_held_s"]
    assert c.get("/readyz").status_code == 200


# ------------------------------------------------------------------------ body framing and size


def test_content_length_with_chunked_body_is_refused_before_it_is_read(server):
    body = b"x" * 100_000
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head = (
        b"POST /v1/collections/docs/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    out = _raw(server, head + chunked)
    assert _status(out) == 400, out[:300]


def test_bytes_are_counted_as_they_arrive(make_client):
    """A body longer than the limit is refused however it is framed (the middleware counts bytes)."""
    c = make_client(max_body_bytes=1000)

    def chunks():
        for _ in range(100):
            yield b"x" * 100

    r = c.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_the_api_key_is_checked_before_the_body_is_read(server):
    """Headers announcing a large body that never comes, without the key: answered 401 at once. A
    server reading the body first would wait for it (then time out with 408)."""
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as s:
        s.sendall(head)
        t0 = time.perf_counter()
        data = s.recv(4096)
    assert _status(data) == 401, data
    assert time.perf_counter() - t0 < 0.5  # the body timeout is 1 s here


def test_a_lying_content_length_is_refused(server):
    head = (
        b"POST /v1/collections/docs/search HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{}"
    )
    assert _status(_raw(server, head)) == 400


# ------------------------------------------------------------------------ slow clients


def test_headers_that_trickle_in_are_cut_off(server):
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed_at = None
        for _ in range(20):  # one header byte every 0.2 s, for up to 4 s
            try:
                s.sendall(b"X")
            except OSError:
                closed_at = time.perf_counter()
                break
            time.sleep(0.2)
            s.setblocking(False)
            try:
                data = s.recv(4096)
                if data or data == b"":
                    closed_at = time.perf_counter()
                    if data:
                        assert _status(data) == 408, data
                    break
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
    assert closed_at is not None and closed_at - t0 < 3.0, "the server kept a trickling connection open"


def test_a_body_that_trickles_in_gets_408(server):
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=5) as s:
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        t0 = time.perf_counter()
        data = s.recv(4096)
        assert _status(data) == 408, data
        assert time.perf_counter() - t0 < 3.0


def test_idle_connections_cannot_take_every_slot(server):
    """Connections past the limit are answered 503 at once; after the header timeout the idle
    ones are gone and the server answers again."""
    idle = []
    try:
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", _port(server)), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # never finished
            idle.append(s)
        r = httpx.get(f"{server}/healthz", timeout=5)
        assert r.status_code == 503
        time.sleep(1.5)
        assert httpx.get(f"{server}/healthz", timeout=5).status_code == 200
    finally:
        for s in idle:
            s.close()


# ------------------------------------------------------------------------ hosts, paths, ids


def test_foreign_host_is_refused_on_loopback_without_a_key(make_client):
    c = make_client()  # bound to 127.0.0.1, no key: the DNS rebinding case
    assert c.get("/healthz").status_code == 200  # Host: localhost
    for host in ("127.0.0.1:8000", "[::1]:8000", "localhost", "LOCALHOST."):
        assert c.get("/v1/collections", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]"):
        r = c.get("/v1/collections", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    # a key (or an explicit list) lifts the loopback-only rule
    keyed = make_client(api_key="k")
    assert keyed.get("/healthz", headers={"host": "api.example"}).status_code == 200
    listed = make_client(allowed_hosts="api.example")
    assert listed.get("/healthz", headers={"host": "api.example"}).status_code == 200
    assert listed.get("/healthz", headers={"host": "other.example"}).status_code == 400


def test_not_found_does_not_disclose_the_home_path(client, shared_state):
    home = str(shared_state.home)
    for r in (
        client.get("/v1/collections/nope"),
        client.post("/v1/collections/nope/search", json={"query": "x"}),
        client.post(
            "/v1/chat/completions",
            json={"collection": "nope", "messages": [{"role": "user", "content": "x"}], "stream": True},
        ),
    ):
        assert home not in r.text, r.text
        assert r.status_code in (200, 404)


def test_document_ids_with_slashes_are_reachable(server):
    """Over a real server (the test client decodes paths twice): ids with '/', '%' and spaces,
    URL-encoded as path parameters, or with their slashes as they are."""
    from urllib.parse import quote

    name = f"ids-{uuid.uuid4().hex[:8]}"
    base = f"{server}/v1/collections/{name}"
    with httpx.Client(headers=AUTH, timeout=30) as c:
        assert c.post(f"{server}/v1/collections", json={"name": name}).status_code == 201
        ids = ["docs/guide/intro.md", "/abs/path/file.py", "a%2Fb", "x y?z#w"]
        docs = [{"id": i, "text": f"Document {n} about bridges and rivers."} for n, i in enumerate(ids)]
        r = c.post(f"{base}/documents", json={"documents": docs})
        assert r.status_code == 200, r.text
        for i in ids:
            r = c.get(f"{base}/documents/{quote(i, safe='')}")
            assert r.status_code == 200 and r.json()["id"] == i, (i, r.text)
        assert c.get(f"{base}/documents/docs/guide/intro.md").json()["id"] == ids[0]
        assert c.delete(f"{base}/documents/{quote(ids[1], safe='')}").status_code == 204
        assert c.get(f"{base}/documents/{quote(ids[1], safe='')}").status_code == 404


# ------------------------------------------------------------------------ metrics


def test_metrics_labels_stay_bounded(make_client):
    c = make_client()
    rng = random.Random(0)

    def scrape() -> tuple[int, int]:
        text = c.get("/metrics").text
        series = [
            ln for ln in text.splitlines() if ln.startswith("kvrag_http_request_duration_seconds_count")
        ]
        return len(series), len(text)

    def hammer(n: int) -> None:
        for _ in range(n):
            method = rng.choice(["GET", "POST", "FOO", "PROPFIND", "".join(rng.choices("ABCDEFGHIJ", k=6))])
            path = "/" + "/".join(
                rng.choice(["v1", "collections", "x" + str(rng.randrange(10**6)), "%2e%2e", "docs"])
                for _ in range(rng.randrange(1, 5))
            )
            c.request(method, path)

    hammer(200)
    series_a, size_a = scrape()
    hammer(2000)
    series_b, size_b = scrape()
    assert series_b <= series_a + 5, (series_a, series_b)  # a few statuses/routes may be new
    assert series_b < 60 and size_b < 200_000, (series_b, size_b)
    methods = {
        ln.split('method="')[1].split('"')[0]
        for ln in c.get("/metrics").text.splitlines()
        if 'method="' in ln
    }
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"}, methods


# ------------------------------------------------------------------------ hostile values


def test_hostile_values_are_4xx(client, collection):
    chat = "/v1/chat/completions"
    deep: dict = {}
    node = deep
    for _ in range(700):
        node["a"] = {}
        node = node["a"]
    cases = [
        (
            "POST",
            f"/v1/collections/{collection}/documents",
            {"documents": [{"id": "deep", "text": "x", "metadata": deep}]},
        ),
        ("POST", f"/v1/collections/{collection}/search", {"query": "x", "filter": {"n": 2**63}}),
        ("POST", f"/v1/collections/{collection}/search", {"query": "x", "filter": {"n": -(2**63) - 1}}),
        (
            "POST",
            f"/v1/collections/{collection}/search",
            {"query": "x", "filter": {f"k{i}": i for i in range(1000)}},
        ),
        ("POST", f"/v1/collections/{collection}/search", {"query": "x", "filter": {"k": list(range(5000))}}),
        (
            "POST",
            chat,
            {
                "collection": collection,
                "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            },
        ),
        (
            "POST",
            chat,
            {
                "collection": collection,
                "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}],
            },
        ),
        ("POST", "/v1/collections", {"name": f"b-{uuid.uuid4().hex[:6]}", "spec": "BIVF" + "9" * 5000}),
        ("POST", "/v1/collections", {"name": f"b-{uuid.uuid4().hex[:6]}", "spec": "BIVF" + "9" * 40}),
        ("POST", "/v1/collections", {"name": f"b-{uuid.uuid4().hex[:6]}", "bm25_language": "§"}),
        ("POST", "/v1/collections", {"name": f"b-{uuid.uuid4().hex[:6]}", "bm25_language": "klingon"}),
    ]
    for method, path, body in cases:
        r = client.request(method, path, json=body)
        assert 400 <= r.status_code < 500, (path, str(body)[:120], r.status_code, r.text[:300])
        assert r.json()["error"]["message"]
    # moderately nested metadata is still stored, and sent back
    ok = {
        "documents": [
            {"id": "nested", "text": "Nested metadata text.", "metadata": {"a": {"b": {"c": [1, {"d": 2}]}}}}
        ]
    }
    assert client.post(f"/v1/collections/{collection}/documents", json=ok).status_code == 200
    assert client.get(f"/v1/collections/{collection}/documents/nested").json()["metadata"]["a"]["b"]["c"][
        1
    ] == {"d": 2}


@pytest.mark.parametrize("language", ["german", "swedish", "english"])
def test_stemmed_bm25_languages_index_and_search(client, language):
    """Every language offered gets its stemmer and stop words (German and Swedish used to fail)."""
    name = f"lang-{uuid.uuid4().hex[:6]}"
    r = client.post("/v1/collections", json={"name": name, "bm25_language": language})
    assert r.status_code == 201, r.text
    docs = [
        {"id": "a", "text": "Die Katzen laufen schnell über die Brücken."},
        {"id": "b", "text": "Mars has moons."},
    ]
    assert client.post(f"/v1/collections/{name}/documents", json={"documents": docs}).status_code == 200
    r = client.post(
        f"/v1/collections/{name}/search", json={"query": "Katzen Brücken", "hybrid": True, "k": 2}
    )
    assert r.status_code == 200 and r.json()["hits"][0]["doc_id"] == "a", r.text


@pytest.mark.parametrize("stream", [False, True])
def test_tiny_top_p_samples_the_most_likely_token(client, collection, stream):
    body = {
        "collection": collection,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 6,
        "temperature": 1.0,
        "top_p": 1e-50,
        "stream": stream,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert "error" not in r.text
    greedy = client.post("/v1/chat/completions", json={**body, "stream": False, "temperature": 0, "top_p": 1})
    if not stream:  # top_p this small keeps only the top token: the greedy answer
        assert (
            r.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
        )


# ------------------------------------------------------------------------ deletes racing requests


def test_requests_holding_a_deleted_collection_get_404(client, shared_state):
    name = f"del-{uuid.uuid4().hex[:8]}"
    assert client.post("/v1/collections", json={"name": name}).status_code == 201
    assert client.post(f"/v1/collections/{name}/documents", json={"documents": DOCS}).status_code == 200
    lease = shared_state.lease(name)  # a request in flight
    try:
        assert client.delete(f"/v1/collections/{name}").status_code == 204
        # the holder's collection is still open (not closed under it) but gone for new work
        assert lease.collection.store.counts()["documents"] == len(DOCS)
        from kvrag.errors import CollectionNotFoundError

        with pytest.raises(CollectionNotFoundError), shared_state.locked(lease):
            pass
    finally:
        lease.release()
    for method, path, body in [
        ("POST", f"/v1/collections/{name}/search", {"query": "x"}),
        ("POST", f"/v1/collections/{name}/documents", {"documents": DOCS[:1]}),
        ("GET", f"/v1/collections/{name}", None),
        ("DELETE", f"/v1/collections/{name}", None),
    ]:
        assert client.request(method, path, json=body).status_code == 404, path


def test_deletes_racing_searches_upserts_and_chats_never_500(server):
    """Threads search, upsert and chat over a collection that another thread deletes and
    re-creates: every answer is 2xx or 404/409, never 5xx."""
    name = f"race-{uuid.uuid4().hex[:6]}"
    base = f"{server}/v1/collections"
    statuses: list[int] = []
    stop = time.monotonic() + 6

    def churn():
        with httpx.Client(headers=AUTH, timeout=30) as c:
            while time.monotonic() < stop:
                statuses.append(c.post(base, json={"name": name}).status_code)
                statuses.append(c.post(f"{base}/{name}/documents", json={"documents": DOCS}).status_code)
                statuses.append(c.delete(f"{base}/{name}").status_code)

    def use(kind: str):
        with httpx.Client(headers=AUTH, timeout=30) as c:
            while time.monotonic() < stop:
                if kind == "search":
                    r = c.post(f"{base}/{name}/search", json={"query": "moons", "k": 2})
                elif kind == "upsert":
                    r = c.post(f"{base}/{name}/documents", json={"documents": DOCS[1:]})
                elif kind == "get":
                    r = c.get(f"{base}/{name}")
                else:
                    r = c.post(
                        f"{server}/v1/chat/completions",
                        json={
                            "collection": name,
                            "messages": [{"role": "user", "content": QUESTION}],
                            "max_tokens": 4,
                            "stream": kind == "stream",
                        },
                    )
                statuses.append(r.status_code)

    threads = [threading.Thread(target=churn)] + [
        threading.Thread(target=use, args=(k,)) for k in ("search", "upsert", "get", "chat", "stream")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses and all(s < 500 for s in statuses), sorted(set(statuses))
    assert {200, 404} <= set(statuses)
    assert _search(server).status_code == 200


# ------------------------------------------------------------------------ crash mid-upsert


def test_a_server_killed_mid_upsert_repairs_on_start(service_env, tmp_path):
    """kill -9 during a 150-document upsert; the restarted server repairs the collection before it
    answers (every stored passage back in the vector and BM25 indexes) and says what it repaired."""
    import numpy as np

    from kvrag.index.collection import Collection

    env = {**service_env, "KVRAG_HOME": str(tmp_path), "KVRAG_API_KEY": KEY}
    docs = [
        {"id": f"d{i}", "text": f"Document {i} tells of river {i} and the bridge of town {i}. " * 3}
        for i in range(150)
    ]

    def upsert(url: str, name: str) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/collections/{name}/documents",
            json={"documents": docs, "kv": False},
            headers=AUTH,
            timeout=120,
        )

    def state_of(name: str) -> tuple[int, bool]:
        c = Collection.open(tmp_path, name)
        try:
            stored = c.stored_ids()
            return len(stored), bool(len(stored)) and not np.array_equal(c.vector_ids(), stored)
        finally:
            c.close()

    took, behind = None, None
    for attempt, fraction in enumerate([0.6, 0.4, 0.8, 0.3, 0.9]):
        proc, url = start_server(env)
        try:
            name = f"crash{attempt}"
            assert httpx.post(f"{url}/v1/collections", json={"name": name}, headers=AUTH).status_code == 201
            if took is None:  # how long the upsert takes, on a collection of its own
                assert (
                    httpx.post(f"{url}/v1/collections", json={"name": "warm"}, headers=AUTH).status_code
                    == 201
                )
                t0 = time.perf_counter()
                assert upsert(url, "warm").status_code == 200
                took = time.perf_counter() - t0
            errors: list[Exception] = []

            def send(url=url, name=name, errors=errors):
                try:
                    upsert(url, name)
                except httpx.HTTPError as exc:
                    errors.append(exc)

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(took * fraction)
            proc.kill()
            proc.wait()
            sender.join()
        finally:
            stop_server(proc)
        stored, lagging = state_of(name)
        if lagging:  # documents stored, the indexes not yet saved: the state to repair
            behind = name
            break
    assert behind, "no kill landed mid-upsert: the test proved nothing"
    proc, url = start_server(env)
    try:
        ready = httpx.get(f"{url}/readyz", timeout=5).json()
        assert ready["recovered"][behind]["vectors_added"] > 0, ready
        for name in Collection.list(tmp_path):
            c = Collection.open(tmp_path, name)
            try:
                stored = c.stored_ids()
                assert np.array_equal(c.vector_ids(), stored), name
                assert np.array_equal(c.bm25_ids(), stored), name
                first = c.store.passages(stored[:1].tolist())
            finally:
                c.close()
            if first:  # a stored passage is found by a search for its own text
                r = httpx.post(
                    f"{url}/v1/collections/{name}/search",
                    json={"query": first[0].text, "k": 10, "hybrid": True},
                    headers=AUTH,
                )
                assert r.status_code == 200 and first[0].id in [h["passage_id"] for h in r.json()["hits"]]
    finally:
        stop_server(proc)
