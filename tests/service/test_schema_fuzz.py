"""Requests generated from the app's own OpenAPI schema (schemathesis, in process over ASGI): valid and
invalid bodies, paths and parameters for every operation; none may be answered with a 5xx."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from service.app import create_app
from service.state import AppState
from tests.service.conftest import DOCS

schemathesis = pytest.importorskip("schemathesis")

SEEDED = "fuzz"  # a collection holding DOCS: generated requests are pointed at it half the time
MIN_REQUESTS = 500
EXAMPLES = 60  # per operation and generation mode


@pytest.fixture(scope="module")
def fuzz_app(make_settings, tmp_path_factory):
    """An app over tiny models with its own data directory and a low max_tokens, so generated chat
    requests decode at most 16 tokens."""
    state = AppState(make_settings(home=str(tmp_path_factory.mktemp("fuzz-home")), max_tokens=16, allowed_hosts="*"))
    state.load()
    app = create_app(state=state)
    with TestClient(app, base_url="http://localhost") as c:
        assert c.post("/v1/collections", json={"name": SEEDED}).status_code == 201
        assert c.post(f"/v1/collections/{SEEDED}/documents", json={"documents": DOCS}).status_code == 200
    yield app
    state.close()


def steer(label: str, case) -> None:
    """Move a generated case past the checks its schema cannot express (a collection that exists, a
    served encoder, a user message, the token limit), so its other generated values reach the
    encoder, the index and the generator."""
    if "name" in case.path_parameters and label != "DELETE /v1/collections/{name}":
        case.path_parameters["name"] = SEEDED  # never deleted: later cases still find it
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("k"), int) and body["k"] > 50:
        del body["k"]
    if label == "POST /v1/embeddings":
        body.pop("model", None)
    elif label == "POST /v1/collections":
        body["name"] = f"fz-{uuid.uuid4().hex[:8]}"
        for key in ("encoder", "spec", "bm25_language"):
            body.pop(key, None)
    elif label == "POST /v1/chat/completions":
        body["collection"] = SEEDED
        if isinstance(body.get("messages"), list):
            body["messages"].append({"role": "user", "content": "How many moons does Mars have?"})
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 16:
                del body[key]


def fuzz(op, mode, sent: Counter, statuses: Counter, failures: list[str], unsatisfiable: list[str]) -> None:
    """Send up to EXAMPLES generated requests to one operation, recording what came back."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode), seeded=st.booleans())
    def run(case, seeded):
        if seeded:
            steer(op.label, case)
        response = case.call()
        sent[op.label] += 1
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            failures.append(
                f"{mode.value} {op.label} -> {response.status_code} {response.text[:300]}\n"
                f"    {case.as_curl_command()}"
            )

    try:
        run()
    except Unsatisfiable:
        # nothing in this operation can be made invalid (e.g. free-form string path parameters only)
        assert mode is schemathesis.GenerationMode.NEGATIVE, op.label
        unsatisfiable.append(op.label)


def test_no_generated_request_gets_a_server_error(fuzz_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {
        "POST /v1/embeddings",
        "POST /v1/collections",
        "POST /v1/collections/{name}/documents",
        "POST /v1/collections/{name}/search",
        "POST /v1/chat/completions",
    } <= labels

    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    unsatisfiable: list[str] = []
    t0 = time.perf_counter()
    for op in operations:
        has_input = bool(op.path_parameters or op.query or op.body)
        modes = list(schemathesis.GenerationMode) if has_input else [schemathesis.GenerationMode.POSITIVE]
        for mode in modes:
            fuzz(op, mode, sent, statuses, failures, unsatisfiable)
    elapsed = time.perf_counter() - t0

    assert not failures, "\n".join(failures[:10])
    total = sum(sent.values())
    assert total >= MIN_REQUESTS, (total, dict(sent))
    # every operation was exercised, and the generated requests reached the handlers, not only validation
    assert set(sent) == labels
    assert statuses[200] + statuses[201] + statuses[204] >= 50, dict(statuses)
    assert statuses[422] >= 50, dict(statuses)
    print(f"{total} requests in {elapsed:.0f} s: statuses {dict(sorted(statuses.items()))}")
