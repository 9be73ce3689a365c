"""GET /healthz (process up), /readyz (models loaded, KV store reachable), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from rag.kvcache.store import redact_url
from service.schemas import Health, Readiness

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
    body = Readiness(
        # A KV store that cannot be reached only costs speed (caches are recomputed): still ready.
        status="ready" if reachable else "degraded",
        models={"encoder": state.settings.encoder, "generator": state.generator.spec},
        kv_store={
            "url": redact_url(store.url),
            "reachable": reachable,
            "errors": stats.get("errors", 0),
            "codec": state.kv.codec,
        },
    )
    return body


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.kvrag.metrics.render(), media_type="text/plain; version=0.0.4")
