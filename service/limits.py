"""Checks every request passes before any route sees it, outermost first: the `Host` header, the
API key, then the body (framing, size, arrival time). Each is ASGI middleware, so a request that
fails one is answered before its body is read or parsed."""

from __future__ import annotations

import asyncio
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvrag.service.errors import error_response

# paths anyone may call: liveness and readiness probes, and the API's own description
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether a bind address is a loopback one (only this machine can connect)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _header(scope: Scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope.get("headers", ()) if k == name]


def host_name(value: str) -> str:
    """The host part of a `Host` header value, lower-cased: `[::1]:8000` -> `::1`, `a.b.:80` -> `a.b`."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else ""
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class HostGuardMiddleware:
    """400 for a request whose `Host` is not one of `allowed`.

    A server on loopback without an API key trusts whoever can reach it, which DNS rebinding extends
    to any web page a local browser opens (the page's own name resolves to 127.0.0.1): the page's
    requests carry that name as `Host`, which this check refuses.
    """

    def __init__(self, app: ASGIApp, allowed: frozenset[str]):
        self.app, self.allowed = app, frozenset(host_name(h) for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            values = _header(scope, b"host")
            host = host_name(values[0].decode("latin-1")) if len(values) == 1 else None
            if host not in self.allowed:
                shown = "missing" if not values else "repeated" if len(values) > 1 else repr(host)
                await error_response(
                    400,
                    f"Host header {shown} is not served here (allowed: {', '.join(sorted(self.allowed))};"
                    " KVRAG_ALLOWED_HOSTS)",
                    "invalid_request_error",
                    "invalid_host",
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` matches (constant-time), for every path but the
    public ones; checked before the body is read."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            values = _header(scope, b"authorization")
            scheme, _, token = (values[0].decode("latin-1") if len(values) == 1 else "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                await error_response(
                    401,
                    "missing or wrong API key: send `Authorization: Bearer <KVRAG_API_KEY>`",
                    "authentication_error",
                    "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"},
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole body before the app does, counting the bytes that actually arrive: 413 past
    `max_bytes` (whatever Content-Length claims), 400 for ambiguous framing (Content-Length and
    Transfer-Encoding both, or several Content-Lengths), 408 when the body takes longer than
    `timeout_s` to arrive (a client trickling bytes to hold a connection)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def _too_large(self, size: int | None = None):
        got = f"{size} bytes" if size is not None else f"more than {self.max_bytes} bytes"
        return error_response(
            413,
            f"the request body is {got}; the limit is {self.max_bytes} bytes (KVRAG_MAX_BODY_BYTES)",
            "invalid_request_error",
            "limit_exceeded",
        )

    @staticmethod
    def _bad(message: str):
        return error_response(400, message, "invalid_request_error", "bad_framing")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = _header(scope, b"content-length")
        if lengths and _header(scope, b"transfer-encoding"):
            await self._bad("send Content-Length or Transfer-Encoding, not both")(scope, receive, send)
            return
        declared = None
        if lengths:
            if len(set(lengths)) > 1 or not lengths[0].strip().isdigit():
                await self._bad("the Content-Length header is not one byte count")(scope, receive, send)
                return
            declared = int(lengths[0])
            if declared > self.max_bytes:
                await self._too_large(declared)(scope, receive, send)
                return
        chunks, seen = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client went away
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    if seen > self.max_bytes:
                        await self._too_large()(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await error_response(
                408,
                f"the request body did not arrive within {self.timeout_s:g} s (KVRAG_BODY_TIMEOUT_S)",
                "invalid_request_error",
                "timeout",
            )(scope, receive, send)
            return
        if declared is not None and seen != declared:
            await self._bad(f"Content-Length says {declared} bytes, the body has {seen}")(
                scope, receive, send
            )
            return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
