"""Request limits that do not depend on a route: the body size."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: by Content-Length before reading, or while reading a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: int | None = None):
        got = f"{size} bytes" if size is not None else f"more than {self.max_bytes} bytes"
        return error_response(
            413,
            f"the request body is {got}; the limit is {self.max_bytes} bytes (KVRAG_MAX_BODY_BYTES)",
            "invalid_request_error",
            "limit_exceeded",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = -1
                if size < 0:
                    await error_response(
                        400, "the Content-Length header is not a byte count", "invalid_request_error"
                    )(scope, receive, send)
                    return
                if size > self.max_bytes:
                    await self._too_large(size)(scope, receive, send)
                    return
        # No Content-Length (chunked): read the body up to the limit first, then replay it.
        if not any(name == b"content-length" for name, _ in scope.get("headers", ())):
            chunks, seen = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # client went away
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen > self.max_bytes:
                    await self._too_large()(scope, receive, send)
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body, replayed = b"".join(chunks), False

            async def _replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, _replay, send)
            return
        await self.app(scope, receive, send)
