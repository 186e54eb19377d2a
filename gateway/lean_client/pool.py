"""The keep-alive pool of one upstream (LeanPool) and the response it hands out (LeanResponse):
connection cap, connect/read/total timeouts, the request writer and the stale keep-alive retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from gateway.lean_client.errors import (
    BodyMismatch,
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    ReadTimeout,
    RequestNotSent,
    ResponseTooLarge,
    TLSError,
)
from gateway.lean_client.protocol import DONE, HEAD, IDLE, Connection
from gateway.lean_client.wire import CHUNKED, LAST_CHUNK, build_head, chunk

Body = bytes | AsyncIterator[bytes] | None


class LeanPool:
    """Keep-alive HTTP/1.1 connections to one host:port, at most `limit` open (busy + idle).

    One request at a time per connection (no pipelining). An idle connection is reused newest
    first and closed after `keepalive_timeout` seconds idle.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: _ssl.SSLContext | None,
        server_hostname: str | None,
        limit: int,
        keepalive_timeout: float = 30.0,
        host_header: str | None = None,
        max_head_bytes: int = 64 * 1024,
        max_headers: int = 256,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._host, self._port = host, port
        self._ssl = ssl
        self._server_hostname = server_hostname if ssl is not None else None
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._max_head = max_head_bytes
        self._max_headers = max_headers
        if host_header is None:
            name = f"[{host}]" if ":" in host else host
            default = 443 if ssl is not None else 80
            host_header = name if port == default else f"{name}:{port}"
        self._host_header = host_header
        self._idle: list[Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open or being opened (busy + idle)."""
        return self._open

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: Body = None,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> LeanResponse:
        """Send one request and return once the final response head is in (LeanError otherwise).

        `read_timeout` bounds the wait for the head, for each body read and for each write that
        cannot progress; `total_timeout` bounds everything from this call to the body's end.
        Exceptions raised by a streamed `body` itself propagate as they are (connection closed).
        """
        loop = asyncio.get_running_loop()
        deadline = None if total_timeout is None else loop.time() + total_timeout
        streamed = body is not None and not isinstance(body, bytes)
        head, length, close = build_head(
            method, target, headers, self._host_header, None if streamed else body, streamed  # type: ignore[arg-type]
        )
        fresh = False
        while True:
            conn = await self._acquire(loop, deadline, connect_timeout, fresh)
            if conn.usable():
                break
            self._drop(conn)  # closed before a byte was written: once more on a new connection
            if fresh:
                raise ConnectionReset("the connection closed before the request was written", sent=False)
            fresh = True
        try:
            conn.begin(head_only=method == "HEAD", request_close=close)
            if streamed:
                await self._send_stream(loop, conn, head, length, body, read_timeout, deadline)  # type: ignore[arg-type]
            else:
                conn.write(head + body if body else head)  # type: ignore[operator]
                conn.request_done = True
            while conn.phase == HEAD:
                await conn.wait(_timeout(loop, read_timeout, deadline, conn.wrote))
        except BaseException:
            self._drop(conn)
            raise
        response = LeanResponse(self, conn, read_timeout, deadline)
        if conn.phase == DONE and not conn.chunks:
            response._finish()  # no body (HEAD, 204, 304, 101, Content-Length: 0): given back now
        return response

    async def _send_stream(
        self, loop: asyncio.AbstractEventLoop, conn: Connection, head: bytes, length: int | None,
        body: AsyncIterator[bytes], read_timeout: float | None, deadline: float | None,
    ) -> None:
        """Write the head, then the body as it comes (chunked, or exactly `length` bytes), waiting
        while the socket's buffer is full; stops early when the response head arrives first."""
        conn.write(head)
        remaining = 0 if length is None else length
        finished = False
        try:
            async with asyncio.timeout_at(deadline) as scope:
                async for piece in body:
                    if not piece:
                        continue
                    if conn.phase != HEAD or conn.error is not None:
                        break  # answered (or failed) before the body was all sent
                    if length == CHUNKED:
                        conn.write(chunk(piece))
                    else:
                        if len(piece) > remaining:
                            raise BodyMismatch("the request body is longer than its Content-Length",
                                               sent=True)
                        remaining -= len(piece)
                        conn.write(piece)
                    while conn.write_paused and conn.phase == HEAD:
                        await conn.wait(_timeout(loop, read_timeout, None, True))
                else:
                    finished = True
        except TimeoutError:
            if scope.expired():
                raise ReadTimeout("the request body was not sent within the total timeout",
                                  sent=True) from None
            raise
        if not finished:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
            return
        if length == CHUNKED:
            conn.write(LAST_CHUNK)
        elif remaining:
            raise BodyMismatch("the request body is shorter than its Content-Length", sent=True)
        conn.request_done = True

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, deadline: float | None, connect_timeout: float | None,
        fresh: bool,
    ) -> Connection:
        while True:
            if self._closed:
                raise RequestNotSent("the connection pool is closed")
            idle = self._idle
            if not fresh and idle:
                now = loop.time()
                while idle:
                    conn = idle.pop()
                    if conn.usable() and now - conn.idle_since < self._keepalive:
                        return conn
                    self._drop(conn)
            if self._open < self._limit:
                self._open += 1
                try:
                    return await self._connect(loop, deadline, connect_timeout)
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            if fresh and idle:
                self._drop(idle.pop(0))  # room for the new connection the retry needs
                continue
            await self._wait_for_slot(loop, deadline)

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, but leaving: the wake goes to the next one
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout("no pooled connection became free in time", sent=False) from None
            raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, deadline: float | None, connect_timeout: float | None
    ) -> Connection:
        conn = Connection(loop, max_head_bytes=self._max_head, max_headers=self._max_headers)
        timeout = _timeout(loop, connect_timeout, deadline, False, connecting=True)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: conn, self._host, self._port, ssl=self._ssl,
                    server_hostname=self._server_hostname,
                )
        except TimeoutError:
            raise ConnectTimeout(f"connecting took over {timeout} s", sent=False) from None
        except _ssl.SSLError as exc:  # certificate and hostname errors are SSLErrors too
            raise TLSError(f"TLS handshake failed: {exc}", sent=False) from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect: {exc}", sent=False) from exc
        return conn

    def _release(self, conn: Connection) -> None:
        """Back to the pool if the exchange ended cleanly and the connection is reusable, else closed."""
        if not self._closed and conn.reusable():
            loop = conn.loop
            conn.phase = IDLE
            conn.idle_since = loop.time()
            self._idle.append(conn)
            if self._sweeper is None:
                self._sweeper = loop.call_later(self._keepalive, self._sweep)
        else:
            conn.abort()
            self._open -= 1
        if self._waiters:
            self._wake_one()

    def _drop(self, conn: Connection) -> None:
        conn.abort()
        self._open -= 1
        if self._waiters:
            self._wake_one()

    def _sweep(self) -> None:
        """Close the connections idle for keepalive_timeout (and those the server closed)."""
        self._sweeper = None
        if not self._idle:
            return
        loop = self._idle[0].loop
        now = loop.time()
        keep = [c for c in self._idle if c.usable() and now - c.idle_since < self._keepalive]
        for conn in self._idle:
            if conn not in keep:
                self._drop(conn)
        self._idle[:] = keep
        if keep:
            first = min(c.idle_since for c in keep)
            self._sweeper = loop.call_at(first + self._keepalive, self._sweep)

    async def close(self) -> None:
        """Close the idle connections now and every busy one when its response is released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self._idle:
            conn.abort()
            self._open -= 1
        self._idle.clear()
        while self._waiters:
            self._wake_one()


def _timeout(
    loop: asyncio.AbstractEventLoop, per_step: float | None, deadline: float | None, sent: bool,
    *, connecting: bool = False,
) -> float | None:
    """The time left for one wait: the step's own limit within the total deadline."""
    if deadline is None:
        return per_step
    left = deadline - loop.time()
    if left <= 0:
        if connecting:
            raise ConnectTimeout("the total timeout passed before connecting", sent=False)
        raise ReadTimeout("the total timeout passed", sent=sent)
    return left if per_step is None or per_step > left else per_step


class LeanResponse:
    """The final response: status, reason, headers (raw order, latin-1), then its body on demand.

    Its connection goes back to the pool as soon as the body is read to the end; `release()`
    (or leaving `async with`) before that closes it instead.
    """

    __slots__ = ("_complete", "_conn", "_deadline", "_pool", "_read_timeout", "headers", "reason",
                 "status", "version")

    def __init__(
        self, pool: LeanPool, conn: Connection, read_timeout: float | None, deadline: float | None
    ) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._complete = False
        self.status: int = conn.status
        self.reason: str = conn.reason.decode("latin-1")
        self.headers: list[tuple[str, str]] = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in conn.raw_headers
        ]
        self.version: str = conn.version
        """"1.1" or "1.0"."""

    @property
    def content_length(self) -> int | None:
        """The declared body length (0 for a response that cannot have a body)."""
        return self._conn.content_length if self._conn is not None else 0 if self._complete else None

    async def read_chunk(self, max_bytes: int = 64 * 1024) -> bytes:
        """The next body bytes (at most `max_bytes`), b"" at the end."""
        conn = self._conn
        if conn is None:
            return self._ended()
        try:
            while True:
                data = conn.take(max_bytes)
                if data:
                    return data
                if conn.phase == DONE:
                    self._finish()
                    return b""
                await conn.wait(self._wait_time(conn))
        except BaseException:
            self.release()
            raise

    async def read_all(self, limit: int) -> bytes:
        """The whole body, or ResponseTooLarge once it is over `limit` bytes (connection closed)."""
        conn = self._conn
        if conn is None:
            return self._ended()
        parts: list[bytes] = []
        size = 0
        try:
            if conn.content_length is not None and conn.content_length > limit:
                raise ResponseTooLarge(
                    f"the response declares {conn.content_length} bytes, over {limit}", sent=True
                )
            while True:
                if conn.chunks:
                    for part in conn.take_all():
                        size += len(part)
                        parts.append(part)
                    if size > limit:
                        raise ResponseTooLarge(f"the response body is over {limit} bytes", sent=True)
                if conn.phase == DONE:
                    self._finish()
                    return parts[0] if len(parts) == 1 else b"".join(parts)
                await conn.wait(self._wait_time(conn))
        except BaseException:
            self.release()
            raise

    def _wait_time(self, conn: Connection) -> float | None:
        return _timeout(conn.loop, self._read_timeout, self._deadline, True)

    def _ended(self) -> bytes:
        if self._complete:
            return b""
        raise ConnectionReset("the response was released before its body was read", sent=True)

    def _finish(self) -> None:
        self._complete = True
        self.release()

    def release(self) -> None:
        """Give the connection back (reused only if the body was read to the end and both sides
        keep it alive), else close it. Idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool._release(conn)

    async def __aenter__(self) -> LeanResponse:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
