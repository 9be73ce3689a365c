"""Dependencies injected into routes: the app state (the API key is checked before, by
`service.limits.ApiKeyMiddleware`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from kvrag.service.errors import ApiError
from kvrag.service.state import AppState


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


State = Annotated[AppState, Depends(get_state)]
