"""Service fixtures: the app on tiny random models (in process, through httpx), and a live server
(`kvrag serve` under uvicorn in a subprocess) for real clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from kvrag.service.app import create_app
from kvrag.service.settings import Settings
from kvrag.service.state import AppState

DOCS = [
    {
        "id": "bridge",
        "title": "Bridge",
        "text": "The Velmora bridge was built in 1764 by the masons of Arlen.",
    },
    {
        "id": "garden",
        "title": "Garden",
        "text": "Tomatoes need full sun, warm soil and regular water.",
        "metadata": {"topic": "garden"},
    },
    {
        "id": "mars",
        "title": "Mars",
        "text": "Mars has two small moons, Phobos and Deimos.",
        "metadata": {"topic": "space"},
    },
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def service_env(tiny_model_dir, tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    """KVRAG_ settings for tiny models and an in-memory KV store, as environment variables."""
    return {
        "KVRAG_HOME": str(tmp_path_factory.mktemp("service-home")),
        "KVRAG_ENCODER": str(tiny_model_dir),
        "KVRAG_GENERATOR": str(tiny_llama_dir),
        "KVRAG_EMBEDDING_CACHE": "false",
        "KVRAG_KV_URL": "memory://",
    }


@pytest.fixture(scope="session")
def make_settings(service_env) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        base = {k.removeprefix("KVRAG_").lower(): v for k, v in service_env.items()}
        return Settings(**{**base, **overrides})

    return make


@pytest.fixture(scope="session")
def shared_state(make_settings) -> Iterator[AppState]:
    """One loaded state (tiny models) shared by the in-process tests; tests use their own collections."""
    state = AppState(make_settings())
    state.load()
    yield state
    state.close()


@pytest.fixture
def client(shared_state) -> Iterator[TestClient]:
    with TestClient(create_app(state=shared_state), base_url="http://localhost") as c:
        yield c


@pytest.fixture
def make_client(make_settings) -> Iterator[Callable[..., TestClient]]:
    """A client over a fresh app with settings overridden (limits, API key...)."""
    opened: list[TestClient] = []

    def make(**overrides) -> TestClient:
        c = TestClient(create_app(make_settings(**overrides)), base_url="http://localhost")
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture
def collection(client) -> str:
    """A new collection holding DOCS (embeddings and KV caches computed)."""
    name = f"c-{uuid.uuid4().hex[:10]}"
    assert client.post("/v1/collections", json={"name": name}).status_code == 201
    r = client.post(f"/v1/collections/{name}/documents", json={"documents": DOCS})
    assert r.status_code == 200, r.text
    return name


def start_server(env: dict[str, str], *, port: int | None = None, timeout: float = 120.0):
    """`kvrag serve` in a subprocess; returns (process, base URL) once /readyz answers."""
    port = port or free_port()
    full = {**os.environ, **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvrag.service.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"kvrag serve exited with {proc.returncode}:\n{out[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("kvrag serve did not become ready in time")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def live_server(service_env, tmp_path_factory) -> Iterator[str]:
    """A live server (tiny models, API key `test-key`) with collection `docs` holding DOCS."""
    env = {
        **service_env,
        "KVRAG_HOME": str(tmp_path_factory.mktemp("live-home")),
        "KVRAG_API_KEY": "test-key",
    }
    proc, url = start_server(env)
    try:
        h = {"Authorization": "Bearer test-key"}
        assert httpx.post(f"{url}/v1/collections", json={"name": "docs"}, headers=h).status_code == 201
        r = httpx.post(
            f"{url}/v1/collections/docs/documents", json={"documents": DOCS}, headers=h, timeout=60
        )
        assert r.status_code == 200, r.text
        yield url
    finally:
        stop_server(proc)
