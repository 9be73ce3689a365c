"""Redis servers for tests: the shared one on 127.0.0.1:6379 (db 15) or a private `redis-server`."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

SHARED_URL = "redis://127.0.0.1:6379/15"


def redis_server_binary() -> str | None:
    """Path of `redis-server`, or None when it is not installed."""
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_ping(host: str, port: int, db: int = 0, timeout: float = 0.3) -> bool:
    import redis

    client = redis.Redis(host=host, port=port, db=db, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()


def shared_redis_url() -> str | None:
    """The shared test server's URL (db 15) if it answers PING within 0.3 s, else None."""
    return SHARED_URL if _answers_ping("127.0.0.1", 6379, db=15, timeout=0.3) else None


@dataclass
class RedisProc:
    """A private redis-server child process."""

    port: int
    proc: subprocess.Popen
    workdir: str
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/15"

    def stop(self) -> None:
        """Terminate the server and wait for it (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _launch(binary: str, port: int) -> RedisProc:
    workdir = tempfile.mkdtemp(prefix="kvrag-redis-")
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", workdir, "--daemonize", "no"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisProc(port=port, proc=proc, workdir=workdir)
    atexit.register(server.stop)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"redis-server exited with code {proc.returncode} on port {port}")
        if _answers_ping("127.0.0.1", port, timeout=0.2):
            return server
        time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"redis-server on port {port} did not answer PING within 5 s")


@contextlib.contextmanager
def start_redis_server(port: int | None = None) -> Iterator[RedisProc]:
    """Run a throwaway redis-server (no persistence) on 127.0.0.1 for the `with` block."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        try:
            server = _launch(binary, port if port is not None else free_port())
            break
        except RuntimeError:
            if attempt == attempts - 1:  # a chosen free port can be taken in between: try another
                raise
    try:
        yield server
    finally:
        server.stop()
