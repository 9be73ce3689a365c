"""GET /healthz (process up), /readyz (models loaded, model work moving, KV store reachable),
/metrics (Prometheus; behind the API key when one is set)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from kvrag.rag.kvcache.store import redact_url
from kvrag.service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request):
    state = request.app.state.kvrag
    if not state.ready:
        body = Readiness(status="loading", models={}, kv_store={})
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    store = state.kv.store
    reachable = await run_in_threadpool(store.ping)
    stats = store.stats()
    stuck = state.stuck()
    body = Readiness(
        # A KV store that cannot be reached only costs speed (caches are recomputed): still ready.
        # A model slot or collection lock held past KVRAG_WEDGED_AFTER_S: model work has stopped.
        status="wedged" if stuck else "ready" if reachable else "degraded",
        models={"encoder": state.settings.encoder, "generator": state.generator.spec},
        kv_store={
            "url": redact_url(store.url),
            "reachable": reachable,
            "errors": stats.get("errors", 0),
            "codec": state.kv.codec,
        },
        model_slots={
            "slots": state.gate.slots,
            "running": state.gate.running,
            "waiting": state.gate.waiting,
            "oldest_hold_s": round(state.gate.oldest_hold_s(), 3),
        },
        stuck=stuck,
        recovered=state.recovered,
    )
    if stuck:
        return JSONResponse(body.model_dump(), status_code=503)
    return body


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    # rendered in a worker thread: a scrape never holds up the event loop
    body = await run_in_threadpool(request.app.state.kvrag.metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4")
