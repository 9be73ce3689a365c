"""benchmarks/load_test.py end to end on the tiny models: it starts its own server, upserts the sample
corpus, runs every phase with small numbers and prints one JSON object; with `redis-server` installed
it also kills Redis in the middle of the chat phase and checks the service rides through it."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_util import redis_server_binary

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "load_test.py"
PHASES = ("search_baseline", "search", "chat", "chat_stream")
SEARCHES, SEARCH_CLIENTS, CHATS, CHAT_CLIENTS, STREAMS = 64, 8, 8, 2, 2


def _redis_part_selected(request: pytest.FixtureRequest) -> bool:
    """Whether this module's redis-marked test runs in this session (`-m "not redis"` leaves it out)."""
    return any(
        item.get_closest_marker("redis") is not None and getattr(item, "module", None) is request.module
        for item in request.session.items
    )


@pytest.fixture(scope="module")
def load_run(request, tiny_model_dir, tiny_llama_dir) -> dict:
    """One run of the script (about 20-40 s): its exit status, its JSON object and whether Redis was killed."""
    kill_redis = redis_server_binary() is not None and _redis_part_selected(request)
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--encoder",
        str(tiny_model_dir),
        "--generator",
        str(tiny_llama_dir),
        "--passage-tokens",
        "96",
        # The tiny Llama has 512 positions: prose passages of 96 tokens fit, three at a time, while code
        # passages are 40-line windows of any length, so answers are drawn from prose only.
        "--chat-filter",
        '{"kind": "text"}',
        "--search-requests",
        str(SEARCHES),
        "--search-clients",
        str(SEARCH_CLIENTS),
        "--chat-requests",
        str(CHATS),
        "--chat-clients",
        str(CHAT_CLIENTS),
        "--stream-requests",
        str(STREAMS),
        "--request-timeout",
        "30",
        "--startup-timeout",
        "60",
    ]
    if kill_redis:
        cmd.append("--kill-redis")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its server and Redis on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"load_test.py ran over 100 s; stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        pytest.fail(
            f"load_test.py did not print one JSON object (exit {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
        )
    return {"returncode": proc.returncode, "report": report, "kill_redis": kill_redis, "stderr": err}


def test_load_script_reports_every_phase_without_errors(load_run):
    report = load_run["report"]
    assert load_run["returncode"] == 0, json.dumps(report, indent=1)[-4000:]
    assert report["ok"] is True and report["errors_total"] == 0
    assert "[load_test]" not in load_run["stderr"]  # progress goes to stderr only on a terminal

    docs = [p for d in ("docs", "code") for p in (ROOT / "samples" / d).rglob("*") if p.is_file()]
    index = report["index"]
    assert index["errors"] == 0 and index["documents_sent"] == len(docs) == index["collection_documents"]
    assert index["collection_passages"] > 0 and index["kv_computed"] == index["collection_passages"]
    assert index["wall_s"] > 0 and index["documents_per_s"] > 0

    expected = {
        "search_baseline": (SEARCHES, 1),
        "search": (SEARCHES, SEARCH_CLIENTS),
        "chat": (CHATS, CHAT_CLIENTS),
        "chat_stream": (STREAMS, CHAT_CLIENTS),
    }
    for phase in PHASES:
        p = report[phase]
        assert (p["requests"], p["clients"]) == expected[phase], phase
        assert p["errors"] == 0 and p["errors_by_status"] == {}, (phase, p)
        lat = p["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], (phase, lat)
        assert p["throughput_rps"] > 0 and p["wall_s"] > 0
    assert report["search"]["empty_results"] == 0
    assert report["search_scaling"]["clients"] == SEARCH_CLIENTS
    assert report["search_scaling"]["throughput_x"] > 0

    for phase in ("chat", "chat_stream"):
        p = report[phase]
        assert p["server_ttft_ms_median"] > 0
        assert p["kv_hits"] + p["kv_misses"] == 3 * p["requests"]  # --chat-k 3 passages an answer
        assert p["completion_tokens"] > 0
    assert report["chat_stream"]["client_ttft_ms"]["p50"] > 0
    assert report["server_metrics"]["rejected_requests"] == 0

    if not load_run["kill_redis"]:
        assert report["redis_outage"] is None
        assert report["chat"]["kv_misses"] == 0  # every cache was stored when the corpus was upserted


@pytest.mark.redis
def test_load_script_redis_outage(load_run):
    if not load_run["kill_redis"]:
        pytest.skip("redis-server is not installed: the outage part of load_test.py was not run")
    outage = load_run["report"]["redis_outage"]
    assert outage["ok"] is True and all(outage["checks"].values()), outage
    assert outage["requests_during_outage"] > 0 and outage["errors_during_outage"] == 0
    assert "degraded" in outage["readyz_during_outage"]
    assert outage["readyz_after_restart"].get("ready") == 1
    assert outage["hits_before"] > 0 and outage["hits_during"] == 0 and outage["misses_during"] > 0
    assert outage["segments"]["after_repeat"]["kv_hits"] > 0 and outage["hits_after"] > 0
    seg = outage["segments"]
    assert sum(s["requests"] for s in seg.values()) == CHATS


def _load_module():
    spec = importlib.util.spec_from_file_location("kvrag_load_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_summary_and_exit_status_count_every_failure():
    lt = _load_module()
    assert lt.percentile([], 50) is None
    assert lt.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert lt.percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    samples = [lt.Sample(True, "200", 10.0), lt.Sample(False, "503", 5.0), lt.Sample(False, "timeout", 9.0)]
    s = lt.summarize(samples, 2.0, 4)
    assert (s["requests"], s["errors"], s["errors_by_status"]) == (3, 2, {"503": 1, "timeout": 1})
    assert s["latency_ms"]["p50"] == 10.0 and s["throughput_rps"] == 0.5
    assert lt.succeeded({"search": {"errors": 0}, "redis_outage": None})
    assert not lt.succeeded({"search": s, "redis_outage": None})
    assert not lt.succeeded({"search": {"errors": 0}, "redis_outage": {"ok": False}})
    assert not lt.succeeded({"error": "interrupted"})
