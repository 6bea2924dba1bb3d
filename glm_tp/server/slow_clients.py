"""Connections that send nothing, or their request headers a byte at a time, are closed (slowloris).

uvicorn times out idle keep-alive connections only after a response, and not at all while request
headers trickle in: each such connection would hold a socket and memory forever. This HTTP protocol
gives every connection `read_timeout_s` from its opening (or its last response) to its next request's
complete headers; the body's own time limit is the route's (app.py).
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def protocol(read_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers."""
    class HeadersInTime(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete and self.deadline is not None:
                self.deadline.cancel()  # the headers are in: the route times the body
                self.deadline = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets its own time

        def connection_lost(self, exc: Exception | None) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(read_timeout_s, self._too_slow)

        def _too_slow(self) -> None:
            self.deadline = None
            if self.cycle is None or self.cycle.response_complete:  # no request is being answered
                if not self.transport.is_closing():
                    self.transport.write(TIMED_OUT)
                    self.transport.close()

    return HeadersInTime
