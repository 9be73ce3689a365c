"""Redis fixtures for the KV-store tests: the shared server when it answers, else a private one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.redis_util import RedisProc, redis_server_binary, shared_redis_url, start_redis_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """Base URL of a Redis server (db 15): 127.0.0.1:6379 if it answers, else a private server."""
    url = shared_redis_url()
    if url is not None:
        yield url
        return
    if redis_server_binary() is None:
        pytest.skip("no Redis server and no redis-server binary")
    with start_redis_server() as server:
        yield server.url


def _delete_prefix(base_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(base_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        names = list(client.scan_iter(match=prefix + "*", count=1000))
        if names:
            client.delete(*names)
    except (redis.exceptions.RedisError, OSError):
        pass  # the server may have been stopped by the test itself
    finally:
        client.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to one test."""
    return f"kvrag-test-{uuid.uuid4().hex}:"


@pytest.fixture
def redis_store_url(redis_url: str, redis_prefix: str) -> Iterator[str]:
    """`redis_url` with this test's own key prefix; its keys are deleted at teardown."""
    yield f"{redis_url}?prefix={redis_prefix}"
    _delete_prefix(redis_url, redis_prefix)


@pytest.fixture
def private_redis() -> Iterator[RedisProc]:
    """A redis-server of this test's own, which the test may stop."""
    if redis_server_binary() is None:
        pytest.skip("no redis-server binary")
    with start_redis_server() as server:
        yield server


@pytest.fixture
def quiet_redis_url(redis_prefix: str) -> Iterator[str]:
    """A prefixed URL on a server no one else uses (private when possible), for INFO-counter checks."""
    if redis_server_binary() is not None:
        with start_redis_server() as server:
            yield f"{server.url}?prefix={redis_prefix}"
        return
    url = shared_redis_url()
    if url is None:
        pytest.skip("no Redis server and no redis-server binary")
    yield f"{url}?prefix={redis_prefix}"
    _delete_prefix(url, redis_prefix)
