"""Prometheus metrics of one app: request latency, TTFT, decode speed, KV cache and store counters."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 3, 5, 10, 30)


class Metrics:
    """Holds the app's registry; the KV and gate figures are read at scrape time."""

    def __init__(self, state=None):
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "kvrag_http_request_duration_seconds",
            "HTTP request latency (to the last byte sent)",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "kvrag_ttft_seconds",
            "time to first answer token: retrieval, KV fetch and prefill",
            ["mode"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.decode_speed = Histogram(
            "kvrag_decode_tokens_per_second",
            "answer tokens per second after the first",
            ["mode"],
            buckets=(5, 10, 20, 30, 40, 60, 80, 120, 200, 400),
            registry=self.registry,
        )
        self.tokens = Counter(
            "kvrag_generated_tokens", "answer tokens generated", ["mode"], registry=self.registry
        )
        self.embedded = Counter(
            "kvrag_embedded_inputs", "texts embedded by /v1/embeddings", registry=self.registry
        )
        self.state = state
        self.registry.register(_StateCollector(self))

    def observe_answer(self, mode: str, timings: dict, completion_tokens: int) -> None:
        if "ttft_ms" in timings:
            self.ttft.labels(mode).observe(timings["ttft_ms"] / 1000)
        if timings.get("decode_tok_s"):
            self.decode_speed.labels(mode).observe(timings["decode_tok_s"])
        self.tokens.labels(mode).inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """KV manager counters, KV store counters and the model gate, read when scraped."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        state = self.metrics.state
        if state is None or state.kv is None:
            return
        c = CounterMetricFamily("kvrag_kv_events", "passage KV cache events", labels=["event"])
        for name, value in state.kv.counters.items():
            c.add_metric([name], value)
        yield c
        stats = state.kv.store.stats()
        s = CounterMetricFamily("kvrag_kv_store_operations", "KV store counters", labels=["counter"])
        for name, value in stats.items():
            if isinstance(value, int | float) and name != "bytes":
                s.add_metric([name], value)
        yield s
        e = CounterMetricFamily("kvrag_kv_store_errors", "KV store errors (Redis unreachable, timeouts)")
        e.add_metric([], stats.get("errors", 0))
        yield e
        g = GaugeMetricFamily("kvrag_model_slots", "model work slots", labels=["state"])
        g.add_metric(["running"], state.gate.running)
        g.add_metric(["waiting"], state.gate.waiting)
        yield g
        r = CounterMetricFamily("kvrag_rejected_requests", "requests answered 503 because the queue was full")
        r.add_metric([], state.gate.rejected)
        yield r


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def status_label(code: int) -> str:
    """A status code as a label: the code for the ones HTTP defines, `other` past them."""
    return str(code) if 100 <= code <= 599 else "other"


class MetricsMiddleware:
    """Times every request. Labels take bounded values only, whatever clients send: the route
    template (`unmatched` when no route matched), the method when it is a standard one (else
    `OTHER`), the status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def _send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            # a route's template is one of the app's own (never the raw path a client sent)
            path = route.path if isinstance(route, BaseRoute) else "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.requests.labels(method, path, status_label(status["code"])).observe(
                time.perf_counter() - t0
            )
