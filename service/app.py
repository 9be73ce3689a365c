"""The FastAPI app: `create_app(settings)`; models, KV store and collections load in the lifespan."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from service import errors
from service.deps import require_api_key
from service.limits import BodyLimitMiddleware
from service.metrics import MetricsMiddleware
from service.routers import chat, collections, embeddings, health
from service.settings import Settings, get_settings
from service.state import AppState

log = logging.getLogger("kvrag.service")


def create_app(settings: Settings | None = None, state: AppState | None = None) -> FastAPI:
    """Build the app. Pass `state` (already loaded) to share models between apps in tests."""
    settings = settings or (state.settings if state else get_settings())
    state = state or AppState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = not state.ready
        if owned:
            log.info("loading models and the KV store")
            await run_in_threadpool(state.load)
            log.info("ready")
        try:
            yield
        finally:
            if owned:
                state.close()

    app = FastAPI(
        title="kvrag",
        version="0.1.0",
        description="Retrieval and KV-cache augmented generation: OpenAI-compatible embeddings and chat "
        "completions over collections, and kvrag's own collection and search endpoints.",
        lifespan=lifespan,
    )
    app.state.kvrag = state
    errors.install(app)
    auth = [Depends(require_api_key)]
    app.include_router(embeddings.router, dependencies=auth)
    app.include_router(collections.router, dependencies=auth)
    app.include_router(chat.router, dependencies=auth)
    app.include_router(health.router)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    return app
