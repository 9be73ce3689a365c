"""The docker-compose topology without Docker: `kvrag serve` in a subprocess over a private,
password-protected `redis-server` (maxmemory with allkeys-lru, no persistence), as in
docker-compose.yml, including a Redis outage and its recovery.

The KV URL is the compose one (an in-process memory tier in front of Redis), with a front too small
to hold any blob, so that every cache read below is served by Redis itself, and short timeouts so an
outage costs milliseconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.redis_util import free_port, redis_server_binary
from tests.service.conftest import DOCS, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "topology-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = "When was the Velmora bridge built?"


@dataclass
class PasswordRedis:
    """A private redis-server with a password that a test may SIGKILL and start again on its port."""

    binary: str
    port: int
    password: str = field(default_factory=lambda: uuid.uuid4().hex)
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="kvrag-topology-redis-"))
    proc: subprocess.Popen | None = None

    def client(self, password: str | None = None):
        import redis

        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            db=0,
            password=password or self.password,
            socket_timeout=2,
            socket_connect_timeout=2,
        )

    def start(self) -> None:
        import redis

        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password]
        cmd += [
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "allkeys-lru",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        cmd += ["--dir", self.workdir, "--daemonize", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            client = self.client()
            try:
                if client.ping():
                    return
            except (redis.exceptions.RedisError, OSError):
                time.sleep(0.05)
            finally:
                client.close()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within 10 s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections drop at once, as when a container dies."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def kv_url(self, password: str | None = None) -> str:
        # mem_bytes=1: no blob fits the memory tier, so reads hit Redis; timeouts as short as is safe.
        pw = password or self.password
        return (
            f"memory+redis://:{pw}@127.0.0.1:{self.port}/0?mem_bytes=1&timeout=0.5&retry_after=0.3"
            "&prefix=kvrag:"
        )

    def kv_keys(self) -> int:
        client = self.client()
        try:
            return sum(1 for _ in client.scan_iter(match="kvrag:*", count=1000))
        finally:
            client.close()

    def keyspace_hits(self) -> int:
        client = self.client()
        try:
            return int(client.info("stats")["keyspace_hits"])
        finally:
            client.close()


@pytest.fixture
def password_redis() -> Iterator[PasswordRedis]:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = PasswordRedis(binary, free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def serve(service_env, tmp_path) -> Iterator:
    """start(kv_url) -> (client, process): `kvrag serve` with an API key over the given KV store."""
    procs: list[subprocess.Popen] = []
    clients: list[httpx.Client] = []

    def start(kv_url: str):
        env = {
            **service_env,
            "KVRAG_HOME": str(tmp_path / f"home-{len(procs)}"),
            "KVRAG_API_KEY": API_KEY,
            "KVRAG_KV_URL": kv_url,
        }
        proc, url = start_server(env)
        procs.append(proc)
        client = httpx.Client(base_url=url, headers=AUTH, timeout=60)
        clients.append(client)
        return client, proc

    yield start
    for c in clients:
        c.close()
    for p in procs:
        if p.poll() is None:
            stop_server(p)


def new_collection(client: httpx.Client) -> tuple[str, dict]:
    name = f"topo-{uuid.uuid4().hex[:8]}"
    r = client.post("/v1/collections", json={"name": name})
    assert r.status_code == 201, r.text
    r = client.post(f"/v1/collections/{name}/documents", json={"documents": DOCS})
    assert r.status_code == 200, r.text
    return name, r.json()


def ask(client: httpx.Client, collection: str, question: str = QUESTION) -> dict:
    body = {
        "messages": [{"role": "user", "content": question}],
        "collection": collection,
        "k": 2,
        "max_tokens": 6,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, f"chat completion failed: {r.status_code} {r.text}"
    out = r.json()
    assert len(out["citations"]) == 2, f"expected 2 citations, got {out['citations']}"
    assert {c["doc_id"] for c in out["citations"]} <= {d["id"] for d in DOCS}, out["citations"]
    return out


def readiness(client: httpx.Client) -> dict:
    r = client.get("/readyz")
    assert r.status_code == 200, f"/readyz answered {r.status_code}: {r.text}"
    return r.json()


def store_errors(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    values = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(("kvrag_kv_store_errors ", "kvrag_kv_store_errors_total "))
    ]
    assert values, "/metrics has no kvrag_kv_store_errors sample"
    return values[0]


@pytest.mark.redis
def test_redis_outage_degrades_and_recovers(password_redis, serve):
    client, proc = serve(password_redis.kv_url())
    ready = readiness(client)
    assert ready["status"] == "ready" and ready["kv_store"]["reachable"] is True, ready
    assert password_redis.password not in str(ready), "/readyz shows the Redis password"

    # Indexing writes every passage's cache (and the shared prefix's) into Redis.
    name, upsert = new_collection(client)
    assert upsert["kv_computed"] == upsert["passages_added"] > 0, upsert
    stored = password_redis.kv_keys()
    assert stored >= upsert["passages_added"] + 1, (
        f"Redis holds {stored} KV blobs, expected the {upsert['passages_added']} passages' and the prefix's"
    )

    # An answer loads both retrieved passages' caches from Redis: hits, and Redis counted the reads.
    before = password_redis.keyspace_hits()
    kv = ask(client, name)["kvrag"]["kv"]
    assert (kv["hits"], kv["misses"]) == (2, 0), f"expected 2 KV hits from Redis, got {kv}"
    assert password_redis.keyspace_hits() - before >= 2, "the hits were not served by Redis"
    wrong_key = {"Authorization": "Bearer not-the-key"}
    denied = client.post("/v1/chat/completions", json={"messages": []}, headers=wrong_key)
    assert denied.status_code == 401, f"a wrong API key must be refused: {denied.status_code}"

    # Redis dies: answers still come (caches recomputed), the service reports itself degraded.
    password_redis.kill()
    kv = ask(client, name)["kvrag"]["kv"]
    assert kv["hits"] == 0 and kv["misses"] == 2, f"with Redis down every passage is a miss: {kv}"
    ready = readiness(client)
    assert ready["status"] == "degraded", f"/readyz must say degraded while Redis is down: {ready}"
    assert ready["kv_store"]["reachable"] is False, ready
    assert store_errors(client) > 0, "kvrag_kv_store_errors must count the failed Redis calls"
    ask(client, name, "How many moons does Mars have?")
    assert proc.poll() is None, "the server process died with Redis"

    # Redis is back (empty: no persistence) on the same port: ready again, caches written back.
    password_redis.start()
    deadline = time.monotonic() + 20
    while (status := readiness(client)["status"]) != "ready" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == "ready", "/readyz did not return to ready after Redis came back"
    assert readiness(client)["kv_store"]["reachable"] is True
    first = ask(client, name)["kvrag"]["kv"]
    assert first["misses"] == 2, f"a restarted, empty Redis must miss: {first}"
    assert password_redis.kv_keys() >= 2, "the recomputed caches were not written back to Redis"
    again = ask(client, name)["kvrag"]["kv"]
    assert (again["hits"], again["misses"]) == (2, 0), f"the repeated question must hit Redis: {again}"
    assert proc.poll() is None, "the server process died"


@pytest.mark.redis
def test_wrong_redis_password_is_degraded_not_fatal(password_redis, serve):
    wrong = "not-" + password_redis.password
    client, proc = serve(password_redis.kv_url(password=wrong))
    ready = readiness(client)
    assert ready["status"] == "degraded", f"a rejected Redis password must show as degraded: {ready}"
    assert ready["kv_store"]["reachable"] is False, ready
    assert wrong not in client.get("/readyz").text, "/readyz shows the Redis password"
    assert wrong not in client.get("/metrics").text, "/metrics shows the Redis password"

    name, upsert = new_collection(client)
    assert upsert["passages_added"] > 0, upsert
    out = ask(client, name)
    assert isinstance(out["choices"][0]["message"]["content"], str), out
    kv = out["kvrag"]["kv"]
    assert (kv["hits"], kv["misses"]) == (0, 2), f"nothing can be read with a wrong password: {kv}"
    assert password_redis.kv_keys() == 0, "nothing may be written to Redis with a wrong password"
    assert proc.poll() is None, "the server process died"


def test_serve_refuses_a_public_bind_without_an_api_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVRAG_")}
    env["KVRAG_HOME"] = str(tmp_path)
    port = free_port()
    cmd = [sys.executable, "-m", "kvrag.service.cli", "serve", "--host", "0.0.0.0", "--port", str(port)]
    try:
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("kvrag serve --host 0.0.0.0 without KVRAG_API_KEY started serving instead of exiting")
    assert r.returncode != 0, "kvrag serve on 0.0.0.0 without KVRAG_API_KEY must exit non-zero"
    assert "KVRAG_API_KEY" in r.stderr, f"the error must name KVRAG_API_KEY:\n{r.stderr}"
