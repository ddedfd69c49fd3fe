"""uvicorn's h11 protocol with a time limit on request headers: a connection that sends no complete
request line and headers within ``header_timeout`` seconds of connecting (or of its previous answer)
is closed, so idle or trickling sockets cannot hold the connection limit forever (slowloris)."""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """:class:`H11Protocol` closing connections whose headers do not arrive in time (see :func:`with_header_timeout`)."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _header_timed_out(self) -> None:
        # IDLE: no complete request since the timer was armed (a request in progress is not IDLE)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(seconds: float) -> type[Any]:
    """A :class:`TimedH11Protocol` subclass for ``uvicorn.run(http=...)`` with ``header_timeout=seconds``."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": seconds})
