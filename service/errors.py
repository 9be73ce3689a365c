"""HTTP errors: typed library errors mapped to status codes, one JSON shape, never a stack trace.

Every error body is `{"error": {"message", "type", "code"}}` (OpenAI's shape, so its clients show the
message). Library errors users can cause map to 4xx; an unexpected exception is logged with its trace
and answered 500 with a generic message.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvrag.errors import (
    CollectionNotFoundError,
    CorruptIndexError,
    DimensionMismatchError,
    InvalidInputError,
    KvragError,
    ModelNotFoundError,
)

log = logging.getLogger("kvrag.service")


class ApiError(Exception):
    """An error with its HTTP status, raised by routes and dependencies."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
        self.headers = headers or {}


class LimitExceeded(ApiError):
    """A request over a configured limit: 413 for sizes of the body, 422 for values in it."""

    def __init__(self, what: str, value: int, limit: int, setting: str, *, status: int = 422):
        super().__init__(
            status,
            f"{what} is {value}; the limit is {limit} (KVRAG_{setting.upper()})",
            code="limit_exceeded",
        )


class ClientGone(ApiError):
    """The client closed the connection before its answer was ready (nginx's 499): nobody reads this."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the request", code="client_closed")


class Busy(ApiError):
    """Every model slot is taken and the queue is full (or the wait ran out)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(
            503, message, type="server_busy", code="busy", headers={"Retry-After": str(retry_after)}
        )


def _body(status: int, message: str, type_: str, code: str | None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, **extra}}


def error_response(status: int, message: str, type_: str, code: str | None = None, headers=None, **extra):
    return JSONResponse(_body(status, message, type_, code, **extra), status_code=status, headers=headers)


_LIBRARY = [
    (CollectionNotFoundError, 404, "not_found"),
    (DimensionMismatchError, 422, "invalid_request_error"),
    (InvalidInputError, 422, "invalid_request_error"),
    (ModelNotFoundError, 503, "model_unavailable"),
    (CorruptIndexError, 500, "index_corrupt"),
]


def classify(exc: KvragError) -> tuple[int, str]:
    """The HTTP status and error type of a library error."""
    for cls, status, type_ in _LIBRARY:
        if isinstance(exc, cls):
            return status, type_
    return 400, "invalid_request_error"


def scrub(message: str, home) -> str:
    """A message with the server's data directory named `$KVRAG_HOME`: clients need not know where
    the server keeps its files (library messages name paths for the command line's sake)."""
    home = str(home).rstrip("/")
    return message.replace(home, "$KVRAG_HOME") if len(home) > 1 else message


def _home(request: Request):
    state = getattr(request.app.state, "kvrag", None)
    return state.settings.root if state is not None else ""


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, scrub(exc.message, _home(request)), exc.type, exc.code, exc.headers)

    @app.exception_handler(KvragError)
    async def _library(request: Request, exc: KvragError):
        status, type_ = classify(exc)
        return error_response(status, scrub(str(exc), _home(request)), type_)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        details = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            details.append({"param": loc or None, "message": e.get("msg", "invalid value")})
        first = details[0] if details else {"param": None, "message": "invalid request"}
        message = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
        return error_response(422, message, "invalid_request_error", "invalid_value", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", None, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "server_error")
