"""Connection limits uvicorn does not have: per-client caps, idle/slow clients, clients that stop reading.

``guarded_protocol(limits)`` returns a subclass of uvicorn's h11 protocol (one connection = one
instance) that adds, per ``ServerLimits``:

- **Connection caps.** A new connection beyond ``max_connections_per_client`` from one address,
  or beyond ``max_connections`` in all, is answered 429/503 (OpenAI's error shape) and closed at
  once, so one client's hundreds of sockets cost the others nothing.
- **Idle timeout.** A connection with no request in progress is closed when a complete request
  head has not arrived ``idle_timeout_s`` after it opened or after its last response: idle
  sockets and clients that trickle their headers a byte at a time are dropped. (uvicorn's own
  keep-alive timer is cancelled by any byte received, so it does not cover the second case.)
- **Write timeout.** When the transport's buffer is full because the client stopped reading (its
  socket buffers full too), the connection is aborted after ``write_timeout_s``; the aborted
  stream's request is cancelled in the engine like any disconnect.

``uvicorn_config`` builds the uvicorn settings from the same limits (keep-alive, header size,
concurrency).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from slimline.serve.guard import error_body
from slimline.serve.limits import ServerLimits

log = logging.getLogger(__name__)
# At most one warning per client address per this many seconds about refused connections.
WARN_EVERY_S = 60.0


class ClientTable:
    """Open connections per client address, shared by every connection of one server."""

    def __init__(self) -> None:
        self.open: Counter[str] = Counter()
        self.warned: dict[str, float] = {}

    def warn_once(self, client: str, message: str) -> None:
        """Log ``message`` unless this client was warned about within WARN_EVERY_S."""
        now = time.monotonic()
        if now - self.warned.get(client, -WARN_EVERY_S) >= WARN_EVERY_S:
            self.warned[client] = now
            log.warning("%s: %s", client, message)


def refusal_bytes(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response refusing a connection before it sent a request (it is then closed)."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    reason = {429: b"Too Many Requests", 503: b"Service Unavailable"}[status]
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
        status,
        reason,
        len(body),
    )
    return head + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection limits of the module docstring (see ``guarded_protocol``)."""

    limits: ServerLimits = ServerLimits()
    clients: ClientTable = ClientTable()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Admit the connection or refuse it at once; arm the idle timer."""
        super().connection_made(transport)
        self.counted: str | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None
        client = self.client[0] if self.client else "unknown"
        refusal = self.refusal(client)
        if refusal is not None:
            status, message, code = refusal
            self.clients.warn_once(client, f"connection refused ({status}): {message}")
            transport.write(refusal_bytes(status, message, code))
            transport.close()
            return
        self.counted = client
        self.clients.open[client] += 1
        self.arm_idle_timer()

    def refusal(self, client: str) -> tuple[int, str, str] | None:
        """(status, message, code) refusing a new connection from ``client``, or None to admit it."""
        if self.clients.open[client] >= self.limits.max_connections_per_client:
            limit = self.limits.max_connections_per_client
            return 429, f"too many open connections from {client} (limit {limit})", "too_many_connections"
        if self.clients.open.total() >= self.limits.max_connections:
            return 503, "the server has too many open connections; try again later", "server_busy"
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Release this connection's place and its timers."""
        for timer in (self.idle_timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        if self.counted is not None:
            self.clients.open[self.counted] -= 1
            if self.clients.open[self.counted] <= 0:
                del self.clients.open[self.counted]
            self.counted = None
        super().connection_lost(exc)

    # -- idle and slow clients ----------------------------------------------------------------

    def arm_idle_timer(self) -> None:
        """(Re)start the wait for the next complete request head."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_later(self.limits.idle_timeout_s, self.close_if_idle)

    def handle_events(self) -> None:
        """Parse what arrived; a request that started (its head complete) stops the idle timer."""
        before = self.cycle
        super().handle_events()
        if self.cycle is not before and self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def on_response_complete(self) -> None:
        """After a response the connection is idle again until the next request head."""
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.arm_idle_timer()

    def close_if_idle(self) -> None:
        """Close a connection that has no request in progress (never one whose response is under way)."""
        self.idle_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:  # half a request head arrived: nothing to finish politely
            pass
        self.transport.close()

    # -- clients that stop reading ------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport's buffer is full: start the write timeout."""
        super().pause_writing()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.limits.write_timeout_s, self.abort_stalled)

    def resume_writing(self) -> None:
        """The client read again: stop the write timeout."""
        super().resume_writing()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def abort_stalled(self) -> None:
        """Drop a connection whose client has not read for ``write_timeout_s``."""
        self.write_timer = None
        client = self.client[0] if self.client else "unknown"
        self.clients.warn_once(client, f"dropped a connection that read nothing for {self.limits.write_timeout_s:g} s")
        self.transport.abort()


def guarded_protocol(limits: ServerLimits) -> type[GuardedH11Protocol]:
    """A protocol class for one server: its limits and its own table of open connections per client."""
    return type("ServerH11Protocol", (GuardedH11Protocol,), {"limits": limits, "clients": ClientTable()})


def uvicorn_config(app: Any, host: str, port: int, limits: ServerLimits, **options: Any) -> uvicorn.Config:
    """The uvicorn settings for ``app`` under ``limits`` (more uvicorn options pass through)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.idle_timeout_s,  # type: ignore[arg-type]  # uvicorn passes it to call_later
        h11_max_incomplete_event_size=limits.max_header_bytes,
        **options,
    )
