"""uvicorn's HTTP/1.1 protocol with a deadline for request headers.

uvicorn closes idle keep-alive connections but has no limit on how long a request's headers may
take: a client sending one header byte every few seconds (slowloris) holds its connection, and
enough of them hold every connection the server allows. Here the headers of each request must be
complete within `header_timeout_s` of the connection opening or of the previous response; else the
client gets 408 and the connection is closed.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 33\r\nconnection: close\r\n\r\nthe request headers came too slow"
)


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """An `H11Protocol` class (for `uvicorn.run(http=...)`) enforcing `header_timeout_s`."""
    if not header_timeout_s > 0:
        raise ValueError("header_timeout_s must be > 0")

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self.conn.our_state is h11.IDLE:
                    self.transport.write(_TIMEOUT_RESPONSE)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # their_state leaves IDLE once a request's headers are parsed; it is IDLE again
            # between requests on a kept-alive connection, where the next headers start the clock
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
