"""Load test of the HTTP service on loopback: concurrent searches and chat completions, a single-client
baseline of the same searches in the same run, and optionally a Redis outage in the middle of the chat
phase.

    .venv/bin/python benchmarks/load_test.py --models-from ~/.local/share/kvrag/models --kill-redis
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --api-key KEY --collection sample

By default it starts `kvrag serve` on a free loopback port with its own KVRAG_HOME (a temporary folder
unless --home is given; --models-from links an existing models folder into it so the bundled models
are not prepared again) and upserts the sample corpus (samples/docs, samples/code) through
POST /v1/collections/{name}/documents, timing it. Then:

- search_baseline: the search requests one at a time (1 client);
- search: the same requests from --search-clients concurrent clients;
- chat: non-streamed chat completions from --chat-clients clients (server TTFT, KV hits and misses);
- chat_stream: streamed chat completions, TTFT measured by the client (first content delta).

With --kill-redis the script runs its own `redis-server` (no persistence) as the server's KV store,
with no memory tier in front, so every answer reads Redis. During the chat phase it SIGKILLs Redis after
a third of the requests, polls /readyz while Redis is down (it must say "degraded"), keeps sending chat
requests (they must all succeed: the passage caches are recomputed), restarts Redis on the same port,
waits for "ready", and asks questions twice over: the first round writes the caches back into the empty
Redis, the second must hit them.

Every request has a timeout, the server and Redis are always stopped (also on Ctrl-C or SIGTERM).
Prints one JSON object on stdout (progress goes to stderr when it is a terminal). Exit status: 0 when
every request succeeded and every outage check held, 1 otherwise, 2 when the setup failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = (ROOT / "samples" / "docs", ROOT / "samples" / "code")

# Searches: the sample corpus's topics asked in its seven languages, and code searches.
QUERIES = [
    "How do volcanoes form?",
    "Wie entstehen Wolken und Regen?",
    "Comment le magma remonte-t-il vers la surface ?",
    "¿Cómo entrenan las vacunas al sistema inmunitario?",
    "茶叶是从哪里来的？",
    "Кто изобрёл книгопечатание?",
    "मानसून कैसे आता है?",
    "What does a plant need for photosynthesis?",
    "Why is reading from a cache faster?",
    "evict the least recently used entry",
    "area of a polygon from its vertices",
    "great-circle distance between two points",
    "count the words in a text",
    "Fibonacci numbers in JavaScript",
    "Was passiert bei der Verdunstung?",
    "绿茶和红茶有什么不同？",
]
# Chat questions: short, each answerable from one sample document.
QUESTIONS = [
    "What does a plant need for photosynthesis?",
    "How do volcanoes form?",
    "What is a cache hit?",
    "How do vaccines train the immune system?",
    "Where does tea come from?",
    "What happens to water when it evaporates?",
    "Who printed the first books in Europe?",
    "Why does the monsoon bring rain?",
]
TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".rst"}
CODE_LANGS = {".py": "python", ".js": "javascript"}


def note(message: str) -> None:
    """Progress on stderr, only when it is a terminal (stdout carries the JSON object alone)."""
    if sys.stderr.isatty():
        print(f"[load_test] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks; None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


# ------------------------------------------------------------------------------------ processes


class ServerProc:
    """`kvrag serve` in a subprocess (its own session, so a terminal's Ctrl-C reaches only this script)."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        cmd = [sys.executable, "-m", "kvrag.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        self.proc = subprocess.Popen(
            [*cmd, "--log-level", "warning"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /readyz answers 200; raises with the log's tail if the server exits or stalls."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvrag serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"kvrag serve was not ready within {timeout:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class RedisProc:
    """A private `redis-server` on 127.0.0.1 without persistence, which can be killed and restarted."""

    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def _answers(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=0.3, socket_connect_timeout=0.3)
        try:
            return bool(client.ping())
        except (redis.exceptions.RedisError, OSError):
            return False
        finally:
            client.close()

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        cmd += ["no", "--dir", str(self.workdir), "--daemonize", "no"]
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.starts += 1
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._answers():
                    return
                time.sleep(0.05)
            if self.proc.poll() is None or time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING within {timeout:g} s"
                )
            time.sleep(0.2)  # exited at once (the port not yet released): try again until the deadline

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save."""
        if self.proc is not None and self.proc.poll() is None:
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


# ------------------------------------------------------------------------------------ requests


@dataclass
class Sample:
    """One request: whether it succeeded, its status (HTTP code or exception name) and latency."""

    ok: bool
    status: str
    ms: float
    info: dict[str, Any] = field(default_factory=dict)


def failed(r: httpx.Response, ms: float) -> Sample:
    """A non-2xx answer, with the start of its error message."""
    try:
        message = str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = r.text
    return Sample(False, str(r.status_code), ms, {"message": message[:300]})


async def timed(fn: Callable[[float], Awaitable[Sample]], timeout: float) -> Sample:
    """Run one request with a hard deadline; failures become Samples, never exceptions."""
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(fn(t0), timeout)
    except TimeoutError:
        return Sample(False, "timeout", (time.perf_counter() - t0) * 1000)
    except httpx.HTTPError as exc:
        return Sample(
            False, type(exc).__name__, (time.perf_counter() - t0) * 1000, {"message": str(exc)[:300]}
        )
    except (ValueError, KeyError, IndexError, TypeError):
        return Sample(False, "bad_body", (time.perf_counter() - t0) * 1000)


async def run_phase(
    n: int, clients: int, call: Callable[[int], Awaitable[Sample]]
) -> tuple[list[Sample], float]:
    """`n` requests (0..n-1) from `clients` concurrent clients, each sending its next request as soon as
    its previous one is answered. Returns the samples in request order and the wall time."""
    todo = iter(range(n))
    out: list[Sample | None] = [None] * n

    async def client() -> None:
        for i in todo:  # one iterator shared by every client: each index is taken once
            out[i] = await call(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(max(1, min(clients, n)))))
    return [s for s in out if s is not None], time.perf_counter() - t0


def summarize(samples: list[Sample], wall: float, clients: int) -> dict[str, Any]:
    """Requests, errors (by status), latency percentiles of the successful requests, throughput."""
    ok = [s.ms for s in samples if s.ok]
    errors = Counter(s.status for s in samples if not s.ok)
    examples = {s.status: s.info["message"] for s in samples if not s.ok and s.info.get("message")}
    return {
        "requests": len(samples),
        "clients": clients,
        "errors": sum(errors.values()),
        "errors_by_status": dict(sorted(errors.items())),
        **({"error_examples": examples} if examples else {}),
        "latency_ms": {
            "p50": _r(percentile(ok, 50)),
            "p90": _r(percentile(ok, 90)),
            "p99": _r(percentile(ok, 99)),
            "mean": _r(statistics.fmean(ok)) if ok else None,
            "max": _r(max(ok)) if ok else None,
        },
        "throughput_rps": round(len(ok) / wall, 2) if wall > 0 else None,
        "wall_s": round(wall, 3),
    }


def chat_figures(samples: list[Sample]) -> dict[str, Any]:
    """Server-reported TTFT and KV figures of the successful chat requests."""
    infos = [s.info for s in samples if s.ok]
    ttft = [i["server_ttft_ms"] for i in infos if i.get("server_ttft_ms") is not None]
    return {
        "server_ttft_ms_median": _r(statistics.median(ttft)) if ttft else None,
        "kv_hits": sum(i.get("kv_hits", 0) for i in infos),
        "kv_misses": sum(i.get("kv_misses", 0) for i in infos),
        "completion_tokens": sum(i.get("completion_tokens", 0) for i in infos),
    }


def _answer_info(body: dict) -> dict[str, Any]:
    ext = body.get("kvrag") or {}
    kv = ext.get("kv") or {}
    return {
        "server_ttft_ms": (ext.get("timings") or {}).get("ttft_ms"),
        "kv_hits": int(kv.get("hits", 0)),
        "kv_misses": int(kv.get("misses", 0)),
        "completion_tokens": int((body.get("usage") or {}).get("completion_tokens", 0)),
        "citations": len(body.get("citations") or []),
    }


class Api:
    """The requests the phases send, over one shared httpx client."""

    def __init__(self, client: httpx.AsyncClient, args: argparse.Namespace):
        self.client, self.args = client, args

    async def readyz(self) -> str:
        try:
            r = await self.client.get("/readyz", timeout=5)
            return str(r.json().get("status", f"http_{r.status_code}"))
        except (httpx.HTTPError, ValueError) as exc:
            return f"unreachable:{type(exc).__name__}"

    async def search(self, query: str) -> Sample:
        async def go(t0: float) -> Sample:
            r = await self.client.post(
                f"/v1/collections/{self.args.collection}/search", json={"query": query, "k": self.args.k}
            )
            ms = (time.perf_counter() - t0) * 1000
            if not r.is_success:
                return failed(r, ms)
            hits = r.json()["hits"]
            return Sample(True, str(r.status_code), ms, {"hits": len(hits)})

        return await timed(go, self.args.request_timeout)

    def _chat_body(self, question: str, stream: bool) -> dict[str, Any]:
        body = {
            "messages": [{"role": "user", "content": question}],
            "collection": self.args.collection,
            "k": self.args.chat_k,
            "mode": self.args.mode,
            "max_tokens": self.args.max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        if self.args.chat_filter:
            body["filter"] = self.args.chat_filter
        return body

    async def chat(self, question: str) -> Sample:
        async def go(t0: float) -> Sample:
            r = await self.client.post("/v1/chat/completions", json=self._chat_body(question, False))
            ms = (time.perf_counter() - t0) * 1000
            if not r.is_success:
                return failed(r, ms)
            body = r.json()
            if not isinstance(body["choices"][0]["message"]["content"], str):
                return Sample(False, "bad_body", ms)
            return Sample(True, str(r.status_code), ms, _answer_info(body))

        return await timed(go, self.args.request_timeout)

    async def chat_stream(self, question: str) -> Sample:
        async def go(t0: float) -> Sample:
            first: float | None = None
            final: dict[str, Any] = {}
            done = False
            body = self._chat_body(question, True)
            async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
                if not r.is_success:
                    await r.aread()
                    return failed(r, (time.perf_counter() - t0) * 1000)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        message = str(event["error"].get("message", ""))[:300]
                        return Sample(
                            False, "stream_error", (time.perf_counter() - t0) * 1000, {"message": message}
                        )
                    if event["choices"][0]["delta"].get("content") and first is None:
                        first = time.perf_counter()
                    if "kvrag" in event:
                        final = event
            ms = (time.perf_counter() - t0) * 1000
            if not done or not final:
                return Sample(False, "stream_incomplete", ms)
            info = _answer_info(final)
            info["client_ttft_ms"] = (first - t0) * 1000 if first is not None else None
            return Sample(True, str(r.status_code), ms, info)

        return await timed(go, self.args.request_timeout)


# ------------------------------------------------------------------------------------ the corpus


def sample_documents(paths: list[Path]) -> list[dict[str, Any]]:
    """Documents for POST .../documents from files: prose (Markdown, text) and Python/JavaScript code."""
    docs = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            suffix = path.suffix.lower()
            if suffix not in TEXT_SUFFIXES and suffix not in CODE_LANGS:
                continue
            with path.open(encoding="utf-8-sig", newline="") as fh:
                text = fh.read()
            rel = path.relative_to(root.parent).as_posix() if root.is_dir() else path.name
            if suffix in TEXT_SUFFIXES:
                title = next((ln[2:].strip() for ln in text.splitlines()[:20] if ln.startswith("# ")), None)
                doc = {"id": rel, "text": text, "title": title or path.stem, "source": rel, "kind": "text"}
            else:
                doc = {"id": rel, "text": text, "title": path.stem, "source": rel, "kind": "code"}
                doc["lang"] = CODE_LANGS[suffix]
            doc["metadata"] = {"corpus": root.name}
            docs.append(doc)
    return docs


async def index_corpus(api: Api, docs: list[dict[str, Any]], batch: int, timeout: float) -> dict[str, Any]:
    """Create the collection (an existing one is reused) and upsert `docs`, `batch` per request."""
    client, name = api.client, api.args.collection
    t0 = time.perf_counter()
    spec = {"name": name, "max_tokens": api.args.passage_tokens}
    r = await client.post("/v1/collections", json=spec, timeout=timeout)
    created = r.status_code == 201
    if r.status_code not in (201, 409):
        return {"error": f"POST /v1/collections answered {r.status_code}: {r.text[:500]}", "errors": 1}
    samples: list[Sample] = []
    totals = Counter()
    last: dict[str, Any] = {}
    for start in range(0, len(docs), batch):
        part = docs[start : start + batch]

        async def go(t0: float, part: list[dict[str, Any]] = part) -> Sample:
            r = await client.post(f"/v1/collections/{name}/documents", json={"documents": part})
            ms = (time.perf_counter() - t0) * 1000
            if not r.is_success:
                return failed(r, ms)
            return Sample(True, str(r.status_code), ms, r.json())

        s = await timed(go, timeout)
        samples.append(s)
        if s.ok:
            last = s.info
            for key in ("added", "replaced", "unchanged", "passages_added", "kv_computed", "kv_present"):
                totals[key] += int(s.info.get(key, 0))
    wall = time.perf_counter() - t0
    errors = Counter(s.status for s in samples if not s.ok)
    lat = [s.ms for s in samples if s.ok]
    return {
        "collection": name,
        "created": created,
        "documents_sent": len(docs),
        "requests": len(samples),
        "documents_per_request": batch,
        "errors": sum(errors.values()),
        "errors_by_status": dict(errors),
        **{
            k: totals[k]
            for k in ("added", "replaced", "unchanged", "passages_added", "kv_computed", "kv_present")
        },
        "collection_documents": last.get("documents"),
        "collection_passages": last.get("passages"),
        "request_ms": {"p50": _r(percentile(lat, 50)), "max": _r(max(lat)) if lat else None},
        "wall_s": round(wall, 3),
        "documents_per_s": round(len(docs) / wall, 2) if wall > 0 else None,
        "passages_added_per_s": round(totals["passages_added"] / wall, 2) if wall > 0 else None,
    }


def _metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


# ------------------------------------------------------------------------------------ phases


async def chat_with_outage(
    api: Api, redis: RedisProc, n: int, clients: int
) -> tuple[list[Sample], float, dict]:
    """The chat phase around a Redis outage (see the module docstring). Returns every sample, the time
    spent sending (waits for the restart excluded) and the `redis_outage` report."""
    questions = QUESTIONS
    n1 = n2 = n // 3
    n3 = n - n1 - n2
    rounds = max(1, n3 // 2)  # questions asked twice after the restart: refill, then repeat

    def asking(offset: int, modulo: int) -> Callable[[int], Awaitable[Sample]]:
        return lambda i: api.chat(questions[(offset + i % modulo) % len(questions)])

    note(f"chat: {n1} requests with Redis up")
    before, w1 = await run_phase(n1, clients, asking(0, len(questions)))

    note("chat: SIGKILL redis-server")
    redis.kill()
    killed_at = time.perf_counter()
    seen: Counter[str] = Counter()
    seen[await api.readyz()] += 1
    stop = asyncio.Event()

    async def poll() -> None:
        while not stop.is_set():
            seen[await api.readyz()] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    poller = asyncio.create_task(poll())
    note(f"chat: {n2} requests while Redis is down")
    try:
        during, w2 = await run_phase(n2, clients, asking(n1, len(questions)))
    finally:
        stop.set()
        await poller
    down_s = time.perf_counter() - killed_at

    note("chat: restart redis-server on the same port")
    t_restart = time.perf_counter()
    await asyncio.to_thread(redis.start)
    after_restart: Counter[str] = Counter()
    ready = False
    deadline = time.perf_counter() + api.args.ready_timeout
    while time.perf_counter() < deadline:
        status = await api.readyz()
        after_restart[status] += 1
        if status == "ready":
            ready = True
            break
        await asyncio.sleep(0.2)
    to_ready = time.perf_counter() - t_restart

    note(f"chat: {2 * rounds} requests after the restart ({rounds} questions, asked twice)")
    refill, w3 = await run_phase(rounds, clients, asking(0, rounds))
    repeat, w4 = await run_phase(n3 - rounds, clients, asking(0, rounds))

    def segment(samples: list[Sample], wall: float) -> dict[str, Any]:
        s = summarize(samples, wall, clients)
        f = chat_figures(samples)
        return {
            "requests": s["requests"],
            "errors": s["errors"],
            "errors_by_status": s["errors_by_status"],
            **({"error_examples": s["error_examples"]} if "error_examples" in s else {}),
            "latency_ms_p50": s["latency_ms"]["p50"],
            "kv_hits": f["kv_hits"],
            "kv_misses": f["kv_misses"],
            "server_ttft_ms_median": f["server_ttft_ms_median"],
        }

    seg = {
        "before": segment(before, w1),
        "during": segment(during, w2),
        "after_refill": segment(refill, w3),
        "after_repeat": segment(repeat, w4),
    }
    checks = {
        "hits_before_outage": seg["before"]["kv_hits"] > 0,
        "degraded_seen": "degraded" in seen,
        "no_errors_during_outage": seg["during"]["errors"] == 0,
        "ready_after_restart": ready,
        "hits_after_restart": seg["after_repeat"]["kv_hits"] > 0,
    }
    report = {
        "redis_url": f"redis://127.0.0.1:{redis.port}/0",
        "requests_before": n1,
        "requests_during_outage": n2,
        "errors_during_outage": seg["during"]["errors"],
        "requests_after_restart": n3,
        "readyz_during_outage": dict(seen),
        "readyz_after_restart": dict(after_restart),
        "outage_s": round(down_s, 3),
        "restart_to_ready_s": round(to_ready, 3),
        "hits_before": seg["before"]["kv_hits"],
        "hits_during": seg["during"]["kv_hits"],
        "hits_after": seg["after_refill"]["kv_hits"] + seg["after_repeat"]["kv_hits"],
        "misses_during": seg["during"]["kv_misses"],
        "segments": seg,
        "checks": checks,
        "ok": all(checks.values()),
    }
    return before + during + refill + repeat, w1 + w2 + w3 + w4, report


async def run_load(
    args: argparse.Namespace, base_url: str, report: dict[str, Any], redis: RedisProc | None
) -> None:
    """Every phase against `base_url`; results are written into `report` as they complete."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    most = max(args.search_clients, args.chat_clients, 1) + 8
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        api = Api(client, args)
        r = await client.get("/readyz", timeout=10)
        ready = r.json()
        report["server"].update(
            status=ready.get("status"), models=ready.get("models"), kv_store=ready.get("kv_store")
        )

        if not args.no_index:
            docs = sample_documents([Path(p) for p in args.corpus])
            note(f"index: {len(docs)} documents, {args.index_batch} per request")
            report["index"] = await index_corpus(
                api, docs, args.index_batch, max(args.request_timeout, 600.0)
            )

        note("warm-up: one search per query and one chat")
        warm, w0 = await run_phase(len(QUERIES), 1, lambda i: api.search(QUERIES[i]))
        warm_chat, w1 = await run_phase(1, 1, lambda i: api.chat(QUESTIONS[0]))
        ws = summarize(warm + warm_chat, w0 + w1, 1)
        report["warmup"] = {k: ws[k] for k in ("requests", "errors", "errors_by_status", "wall_s")}

        def searching(i: int) -> Awaitable[Sample]:
            return api.search(QUERIES[i % len(QUERIES)])

        n = args.search_requests
        note(f"search_baseline: {n} requests, 1 client")
        samples, wall = await run_phase(n, 1, searching)
        report["search_baseline"] = summarize(samples, wall, 1)
        report["search_baseline"]["empty_results"] = sum(1 for s in samples if s.ok and not s.info["hits"])
        note(f"search: {n} requests, {args.search_clients} clients")
        samples, wall = await run_phase(n, args.search_clients, searching)
        report["search"] = summarize(samples, wall, args.search_clients)
        report["search"]["empty_results"] = sum(1 for s in samples if s.ok and not s.info["hits"])
        base, conc = report["search_baseline"], report["search"]
        if base["throughput_rps"] and conc["throughput_rps"] and base["latency_ms"]["p50"]:
            report["search_scaling"] = {
                "clients": args.search_clients,
                "throughput_x": round(conc["throughput_rps"] / base["throughput_rps"], 2),
                "p50_latency_x": round(conc["latency_ms"]["p50"] / base["latency_ms"]["p50"], 2),
            }

        n, c = args.chat_requests, args.chat_clients
        if redis is not None:
            samples, wall, outage = await chat_with_outage(api, redis, n, c)
            report["redis_outage"] = outage
        else:
            note(f"chat: {n} requests, {c} clients")
            samples, wall = await run_phase(n, c, lambda i: api.chat(QUESTIONS[i % len(QUESTIONS)]))
        report["chat"] = {**summarize(samples, wall, c), **chat_figures(samples)}

        if args.stream_requests:
            n = args.stream_requests
            note(f"chat_stream: {n} requests, {c} clients")
            samples, wall = await run_phase(n, c, lambda i: api.chat_stream(QUESTIONS[i % len(QUESTIONS)]))
            ttft = [
                s.info["client_ttft_ms"] for s in samples if s.ok and s.info.get("client_ttft_ms") is not None
            ]
            report["chat_stream"] = {
                **summarize(samples, wall, c),
                "client_ttft_ms": {"p50": _r(percentile(ttft, 50)), "p90": _r(percentile(ttft, 90))},
                **chat_figures(samples),
            }

        try:
            text = (await client.get("/metrics", timeout=10)).text
            report["server_metrics"] = {
                "rejected_requests": _metric(text, "kvrag_rejected_requests_total"),
                "kv_store_errors": _metric(text, "kvrag_kv_store_errors_total"),
            }
        except httpx.HTTPError as exc:
            report["server_metrics"] = {"error": type(exc).__name__}


# ------------------------------------------------------------------------------------ main


def total_errors(report: dict[str, Any]) -> int:
    phases = ("index", "warmup", "search_baseline", "search", "chat", "chat_stream")
    return sum(int((report.get(p) or {}).get("errors", 0)) for p in phases)


def succeeded(report: dict[str, Any]) -> bool:
    """Every request answered 2xx, and the outage checks (when run) held."""
    outage = report.get("redis_outage")
    return "error" not in report and total_errors(report) == 0 and (outage is None or bool(outage.get("ok")))


def server_env(args: argparse.Namespace, home: Path, kv_url: str | None) -> dict[str, str]:
    """The server's environment: inherited KVRAG_* settings are dropped, so runs are comparable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVRAG_")}
    env.update(
        PYTHONUNBUFFERED="1",
        KVRAG_HOME=str(home),
        KVRAG_HOST="127.0.0.1",
        KVRAG_MAX_CONCURRENCY=str(args.server_concurrency),
        # Room for every client of every phase: a load test measures the queue, it should not be shed.
        KVRAG_MAX_QUEUE=str(max(256, 4 * max(args.search_clients, args.chat_clients))),
        KVRAG_QUEUE_TIMEOUT_S=str(args.request_timeout),
        KVRAG_EMBEDDING_CACHE="true" if args.embedding_cache else "false",
    )
    if args.encoder:
        env["KVRAG_ENCODER"] = args.encoder
    if args.generator:
        env["KVRAG_GENERATOR"] = args.generator
    if kv_url:
        env["KVRAG_KV_URL"] = kv_url
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = ap.add_argument_group("server")
    target.add_argument("--url", help="target a running server instead of starting one")
    target.add_argument("--api-key", help="bearer key for --url")
    target.add_argument("--home", help="KVRAG_HOME of the started server (default: a temporary folder)")
    target.add_argument("--models-from", help="a prepared models folder, linked in as KVRAG_HOME/models")
    target.add_argument("--encoder", help="KVRAG_ENCODER of the started server (default: bundled e5-small)")
    target.add_argument(
        "--generator", help="KVRAG_GENERATOR of the started server (default: bundled SmolLM2)"
    )
    target.add_argument("--server-concurrency", type=int, default=1, help="KVRAG_MAX_CONCURRENCY (default 1)")
    target.add_argument(
        "--embedding-cache",
        action="store_true",
        help="let the server cache query embeddings (off by default: repeated queries would skip the encoder)",
    )
    target.add_argument(
        "--server-env", action="append", default=[], help="more KVRAG_NAME=VALUE for the server"
    )
    target.add_argument(
        "--startup-timeout", type=float, default=900.0, help="seconds for the server to be ready"
    )
    target.add_argument(
        "--kill-redis", action="store_true", help="Redis as the KV store, killed mid chat phase"
    )
    target.add_argument("--keep", action="store_true", help="keep the temporary folder (server log, home)")
    data = ap.add_argument_group("corpus")
    data.add_argument("--collection", default="loadtest")
    data.add_argument(
        "--corpus", nargs="+", default=[str(p) for p in SAMPLES], help="folders or files to upsert"
    )
    data.add_argument(
        "--passage-tokens", type=int, default=256, help="passage size in encoder tokens of a new collection"
    )
    data.add_argument("--index-batch", type=int, default=4, help="documents per upsert request")
    data.add_argument("--no-index", action="store_true", help="the collection is already indexed")
    load = ap.add_argument_group("load")
    load.add_argument("--search-requests", type=int, default=640)
    load.add_argument("--search-clients", type=int, default=32)
    load.add_argument("--k", type=int, default=5, help="search hits")
    load.add_argument("--chat-requests", type=int, default=40)
    load.add_argument("--chat-clients", type=int, default=4)
    load.add_argument("--chat-k", type=int, default=3, help="passages per answer")
    load.add_argument(
        "--chat-filter", type=json.loads, help='metadata filter of the chat retrieval, e.g. {"kind": "text"}'
    )
    load.add_argument("--max-tokens", type=int, default=16)
    load.add_argument("--mode", default="ape", choices=["ape", "parallel", "sequential", "blend"])
    load.add_argument("--stream-requests", type=int, default=8, help="streamed chats (0: none)")
    load.add_argument("--request-timeout", type=float, default=180.0, help="seconds per request")
    load.add_argument(
        "--ready-timeout", type=float, default=60.0, help="seconds for ready after Redis restarts"
    )
    return ap


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("search_requests", "search_clients", "chat_requests", "chat_clients", "index_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.kill_redis and args.url:
        raise SystemExit(
            "--kill-redis needs the server this script starts (it sets the KV store): drop --url"
        )
    if args.kill_redis and args.chat_requests < 6:
        raise SystemExit(
            "--kill-redis needs --chat-requests >= 6 (before, during and twice after the outage)"
        )
    for item in args.server_env:
        if "=" not in item or not item.startswith("KVRAG_"):
            raise SystemExit(f"--server-env takes KVRAG_NAME=VALUE, not {item!r}")
    binary = shutil.which("redis-server") if args.kill_redis else None
    if args.kill_redis and binary is None:
        raise SystemExit("--kill-redis needs `redis-server` on PATH")
    signal.signal(signal.SIGTERM, _interrupt)

    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "load_test",
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_start": round(os.getloadavg()[0], 2)},
        "server": {"own": args.url is None},
        "config": {
            k: getattr(args, k)
            for k in (
                "search_requests",
                "search_clients",
                "k",
                "chat_requests",
                "chat_clients",
                "chat_k",
                "chat_filter",
                "max_tokens",
                "mode",
                "stream_requests",
                "request_timeout",
                "kill_redis",
            )
        },
        "redis_outage": None,
    }
    workdir = Path(tempfile.mkdtemp(prefix="kvrag-load-"))
    server: ServerProc | None = None
    redis: RedisProc | None = None
    code = 0
    try:
        if args.url:
            base_url = args.url.rstrip("/")
        else:
            home = Path(args.home).expanduser().absolute() if args.home else workdir / "home"
            home.mkdir(parents=True, exist_ok=True)
            if args.models_from:
                src = Path(args.models_from).expanduser().absolute()
                if not src.is_dir():
                    raise RuntimeError(f"--models-from {src}: no such folder")
                if not (home / "models").exists():
                    (home / "models").symlink_to(src, target_is_directory=True)
            kv_url = None
            if binary is not None:
                redis = RedisProc(binary, workdir / "redis")
                redis.start()
                # No memory tier in front: every answer reads Redis. Short timeouts, a 1 s back-off.
                kv_url = f"redis://127.0.0.1:{redis.port}/0?timeout=1&retry_after=1&prefix=kvrag-load:"
            env = server_env(args, home, kv_url)
            note(f"starting kvrag serve (KVRAG_HOME={home})")
            server = ServerProc(env, workdir / "server.log", free_port())
            startup = server.wait_ready(args.startup_timeout)
            base_url = server.url
            report["server"].update(
                startup_s=round(startup, 3),
                max_concurrency=args.server_concurrency,
                max_queue=int(env["KVRAG_MAX_QUEUE"]),
                embedding_cache=args.embedding_cache,
            )
        report["server"]["url"] = base_url
        asyncio.run(run_load(args, base_url, report, redis))
    except KeyboardInterrupt:
        report["error"] = "interrupted"
        code = 130
    except Exception as exc:  # reported in the JSON object; the processes are still stopped below
        report["error"] = f"{type(exc).__name__}: {exc}"
        code = 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleaning up: not to be interrupted again
        if server is not None:
            server.stop()
            if "error" in report:
                report["server_log_tail"] = server.log_tail(2000)
        if redis is not None:
            redis.stop()
        if args.keep:
            report["workdir"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report["errors_total"] = total_errors(report)
    report["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    report["wall_s"] = round(time.perf_counter() - t_start, 3)
    report["ok"] = succeeded(report)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if code:
        return code
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
