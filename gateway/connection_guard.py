"""Client connection limits aiohttp's server lacks: a header read timeout and a cap on open connections.

A connection that started a request must finish its headers within `listen.header_timeout`; when
`listen.max_connections` are open, the one idle or stuck in its headers longest makes room. Requests
aiohttp cannot parse are answered with problem+json and one log line.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import BadHttp, GatewayError
from gateway.headers import new_request_id
from gateway.problem import PROBLEM_JSON, problem_body

log = structlog.get_logger("gateway.connections")

FD_RESERVE = 64
"""File descriptors kept for the journal, upstream connections, logs and the listening socket."""


class RateLimitedLog:
    """One line per kind of event and interval; the rest are counted into the next line."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def log(self, level: str, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(event, -self._interval) < self._interval:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._last[event] = now
        getattr(log, level)(event, suppressed_since_last=self._suppressed.pop(event, 0), **fields)


class ConnectionGuard:
    """Shared by every connection of one server: the limits, and the log of what they closed."""

    def __init__(
        self, header_timeout: float, max_connections: int, backlog: int,
        on_protocol_error: Callable[[int], None] | None = None,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        """The effective cap and backlog also fit the file descriptor limit: asyncio accepts up
        to `backlog` connections in one go before any is closed, so both must fit together
        (else accept() fails with EMFILE and asyncio stops accepting for a whole second)."""
        self.header_timeout = header_timeout
        self.on_protocol_error = on_protocol_error
        self.on_limit = on_limit or (lambda key: None)
        """Called with the config key of a connection limit each time it closes a connection."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        available = max_connections + backlog if soft == resource.RLIM_INFINITY else soft - FD_RESERVE
        self.backlog = max(16, min(backlog, available // 4))
        self.max_connections = max(16, min(max_connections, available - self.backlog))
        self.log = RateLimitedLog()
        self.closed = {"header_timeout": 0, "evicted": 0, "refused": 0}
        self._open: dict[GuardedRequestHandler, None] = {}
        """Open connections, oldest first (dicts keep insertion order)."""

    def install(self, server: web.Server) -> None:
        """Make `server` build guarded connections (aiohttp has no hook for this)."""
        server.__class__ = _GuardedServer
        server._gateway_guard = self  # type: ignore[attr-defined]

    def opened(self, handler: GuardedRequestHandler) -> None:
        """Register a new connection; over the cap, close the one waiting longest (oldest first)."""
        self._open[handler] = None
        if len(self._open) <= self.max_connections:
            return
        victim = next((c for c in self._open if c is not handler and c.waiting), None)
        if victim is not None:
            self.closed["evicted"] += 1
            self.on_limit("listen.max_connections")
            waited = round(time.monotonic() - victim.waiting_since, 1)
            self.log.warning("connection_evicted", reason="listen.max_connections reached",
                             limit=self.max_connections, waited_s=waited)
            self.lost(victim)
            victim.force_close()
        else:
            self.closed["refused"] += 1
            self.on_limit("listen.max_connections")
            self.log.warning("connection_refused", reason="listen.max_connections reached, all busy",
                             limit=self.max_connections)
            self.lost(handler)
            handler.force_close()

    def lost(self, handler: GuardedRequestHandler) -> None:
        self._open.pop(handler, None)

    def busy(self) -> int:
        """Connections in the middle of a request (the shutdown waits for these)."""
        return sum(1 for connection in self._open if not connection.waiting)


class _GuardedServer(web.Server):
    _gateway_guard: ConnectionGuard

    def __call__(self) -> RequestHandler:
        # aiohttp 3.14's Server keeps the handler arguments in _kwargs and its loop in _loop
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol plus a header timer and the connection cap."""

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard: ConnectionGuard = manager._gateway_guard  # type: ignore[attr-defined]
        self._header_timer: asyncio.TimerHandle | None = None
        self.waiting_since = time.monotonic()

    @property
    def waiting(self) -> bool:
        """Not handling a request: idle between requests, or still receiving one's headers."""
        return self._current_request is None and not self._messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard.opened(self)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._stop_header_timer()  # a whole request arrived
        elif self._header_timer is None and self.waiting:
            self.waiting_since = time.monotonic()
            loop = asyncio.get_running_loop()
            self._header_timer = loop.call_later(self._guard.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.waiting:
            return
        self._guard.closed["header_timeout"] += 1
        self._guard.on_limit("listen.header_timeout")
        self._guard.log.warning("connection_closed", reason="listen.header_timeout",
                                seconds=self._guard.header_timeout)
        self.force_close()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        self._guard.lost(self)
        super().connection_lost(exc)

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or handle: problem+json and one
        structured log line with a request id, instead of text/plain and a traceback."""
        request_id = new_request_id()
        detail = " ".join(str(message or exc or HTTPStatus(status).phrase).split())[:300]
        # the access line of a request the app never answered: a 4xx is one aiohttp could not
        # parse (its method and path are unknown); a 5xx is the gateway's own failure, with the
        # traceback in the `exception` field (a separate event: a burst of 4xx never hides it)
        level, event, fields = "warning", "protocol_error", {}
        if status >= 500:
            level, event = "error", "request_failed"
            fields = {"method": request.method, "path": request.path, "exc_info": exc}
        self._guard.log.log(level, event, request_id=request_id, kind="protocol_error", status=status,
                            status_origin="gateway", client=request.remote,
                            error=type(exc).__name__, detail=detail, **fields)
        if self._guard.on_protocol_error is not None:
            self._guard.on_protocol_error(status)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed")
        error: GatewayError = BadHttp(detail) if status < 500 else GatewayError("the gateway failed")
        error.status = status
        body = problem_body(error, request_id=request_id, instance=request.rel_url.raw_path)
        response = web.Response(status=status, body=body, content_type=PROBLEM_JSON)
        response.headers["X-Request-ID"] = request_id
        response.force_close()
        return response
