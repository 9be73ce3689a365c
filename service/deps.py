"""Dependencies injected into routes: the app state and the API key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.errors import ApiError
from service.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.kvrag
    if not state.ready:
        raise ApiError(
            503,
            "the models are still loading; retry shortly",
            type="server_busy",
            code="loading",
            headers={"Retry-After": "5"},
        )
    return state


def require_api_key(request: Request) -> None:
    """Bearer key check (constant-time) when `KVRAG_API_KEY` is set."""
    key = request.app.state.kvrag.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise ApiError(
            401,
            "missing or wrong API key: send `Authorization: Bearer <KVRAG_API_KEY>`",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


State = Annotated[AppState, Depends(get_state)]
