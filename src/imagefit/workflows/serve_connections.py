"""The connections ``imagefit serve`` keeps open. uvicorn closes a connection only when it has
been silent after a response (its keep-alive timeout), never one that connects and sends
nothing or sends its request's headers a byte at a time; and its ``limit_concurrency`` counts
such connections, so 300 silent ones had every request, /health too, answered 503. Here a
connection that waits for a request is closed after the idle timeout, and a new connection
beyond the bound closes the one that has waited longest (as nginx reuses its idle keep-alive
connections): silent connections can neither pile up nor lock anyone out. Imported only when
serving (uvicorn is an optional extra)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class IdleConnections:
    """A server's connections that wait for a request, the one waiting longest first; how
    long one may wait and how many connections may be open."""

    def __init__(self, idle_timeout: float, max_connections: int) -> None:
        self.idle_timeout, self.max_connections = idle_timeout, max_connections
        self.waiting: dict[IdleClosingProtocol, None] = {}


class IdleClosingProtocol(H11Protocol):
    """uvicorn's h11 protocol that closes its connection when it has waited ``idle_timeout``
    seconds for a request's headers, counted from when it connected or its last response
    ended; any bytes short of whole headers do not restart the count."""

    def __init__(self, *args: Any, idle: IdleConnections, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle = idle
        self.idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.idle.max_connections and self.idle.waiting:
            next(iter(self.idle.waiting)).close_idle()
        self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._in_request():
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_request():
            self._wait()

    def close_idle(self) -> None:
        self._stop_waiting()
        self.transport.close()

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _wait(self) -> None:
        self._stop_waiting()
        self.idle.waiting[self] = None
        self.idle_timer = self.loop.call_later(self.idle.idle_timeout, self.close_idle)

    def _stop_waiting(self) -> None:
        self.idle.waiting.pop(self, None)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
