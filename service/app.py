"""The FastAPI app: `create_app(settings)`; models, KV store and collections load in the lifespan."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from kvrag.service import errors
from kvrag.service.limits import (
    LOOPBACK_NAMES,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    HostGuardMiddleware,
    is_loopback,
)
from kvrag.service.metrics import MetricsMiddleware
from kvrag.service.routers import chat, collections, embeddings, health
from kvrag.service.settings import Settings, get_settings
from kvrag.service.state import AppState

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
    app.include_router(embeddings.router)
    app.include_router(collections.router)
    app.include_router(chat.router)
    app.include_router(health.router)
    # added innermost first: metrics see every answer, the host and key are checked before the body
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value())
    hosts = allowed_hosts(settings)
    if hosts is not None:
        app.add_middleware(HostGuardMiddleware, allowed=hosts)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The `Host` names served, or None for any: KVRAG_ALLOWED_HOSTS when set (`*` for any), else the
    loopback names when bound to loopback without an API key (the DNS rebinding case), else any."""
    listed = {h.strip() for h in settings.allowed_hosts.split(",") if h.strip()}
    if "*" in listed:
        return None
    local = is_loopback(settings.host)
    if listed:
        return frozenset(listed | (LOOPBACK_NAMES if local else set()))
    if local and settings.api_key is None:
        return LOOPBACK_NAMES
    return None
