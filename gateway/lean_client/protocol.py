"""One HTTP/1.1 client connection as an asyncio Protocol: the response parser (httptools/llhttp) plus
the strict checks llhttp leaves out, the body buffer with read backpressure, write flow control.

It holds one exchange at a time; the pool (pool.py) decides when it is reused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from gateway.lean_client.errors import ConnectionReset, InvalidResponse, LeanError, ReadTimeout

IDLE: Final = 0
"""No exchange: in the pool, or fresh."""
HEAD: Final = 1
"""A request was started: waiting for the final response head (1xx interim ones are skipped)."""
BODY: Final = 2
"""The final head arrived: its body is arriving."""
DONE: Final = 3
"""The final response is complete (its body may still be buffered)."""

HIGH_WATER: Final = 128 * 1024
"""Unread body bytes above which the socket is not read any more (until below LOW_WATER)."""
LOW_WATER: Final = 32 * 1024

_PREFIX: Final = b"HTTP/"


class _Abort(Exception):
    """Raised from a parser callback to stop llhttp on purpose (the reason is on the connection)."""


class Connection(asyncio.Protocol):
    """One connection; `begin()` an exchange, write the request, `wait()` for progress."""

    __slots__ = (
        "_chunk_data", "_eof_body", "_head_bytes", "_head_fields", "_in_chunk", "_interim", "_max_head",
        "_max_headers", "_parser", "_prefix", "_reading_paused", "_reason", "_stopped", "_trailer_bytes",
        "_trailer_fields",
        "_waiter", "body_bytes", "buffered", "chunks", "content_length", "dead", "error", "head_only",
        "idle_since", "keep_alive", "loop", "phase", "raw_headers", "request_close", "request_done", "status",
        "transport", "version", "write_paused", "wrote",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_head_bytes: int, max_headers: int) -> None:
        self.loop = loop
        self._max_head = max_head_bytes
        self._max_headers = max_headers
        self.transport: asyncio.Transport | None = None
        self._parser = HttpResponseParser(self)
        self.dead = False
        """Closed, broken or poisoned: never reused."""
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self.write_paused = False
        self._reading_paused = False
        self.chunks: deque[bytes] = deque()
        self._reset()

    def _reset(self) -> None:
        self.phase = IDLE
        self.error: LeanError | None = None
        self.wrote = False
        self.head_only = False
        self.request_close = False
        self.request_done = False
        self.status = 0
        self._reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.version = ""
        self.keep_alive = False
        self.content_length: int | None = None
        self._eof_body = False
        self._interim = False
        self._stopped = False
        self._head_bytes = 0
        self._prefix: bytes | None = b""
        self.buffered = 0
        self.body_bytes = 0
        self._in_chunk = False
        self._chunk_data = 0
        self._trailer_bytes = 0
        self._head_fields = 0
        self._trailer_fields = 0

    # --- the exchange, for the pool

    def begin(self, *, head_only: bool, request_close: bool) -> None:
        """Start an exchange on an idle connection (the request is written next)."""
        self._reset()
        self.chunks.clear()
        self.phase = HEAD
        self.head_only = head_only
        self.request_close = request_close

    @property
    def reason(self) -> bytes:
        return self._reason

    def usable(self) -> bool:
        return not self.dead and self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.wrote = True
        self.transport.write(data)

    def reusable(self) -> bool:
        """The exchange ended cleanly and both sides keep the connection open."""
        return (
            self.phase == DONE and self.keep_alive and self.request_done and self.error is None
            and not self.chunks and self.usable()
        )

    def close(self) -> None:
        self.dead = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (after a timeout or a cancelled exchange)."""
        self.dead = True
        if self.transport is not None:
            self.transport.abort()

    async def wait(self, timeout: float | None) -> None:
        """Until something happens (head, body bytes, completion, writable again, failure), or
        ReadTimeout after `timeout` seconds (the connection is then broken)."""
        if self.error is not None:
            raise self.error
        waiter = self.loop.create_future()
        self._waiter = waiter
        timer = None if timeout is None else self.loop.call_later(timeout, self._expire)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self.error is not None:
            raise self.error

    def take(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` of the buffered body (b"" when none is buffered)."""
        if not self.chunks:
            return b""
        data = self.chunks.popleft()
        if len(data) > max_bytes:
            self.chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        self.buffered -= len(data)
        if self._reading_paused and self.buffered <= LOW_WATER:
            self._resume_reading()
        return data

    def take_all(self) -> list[bytes]:
        parts = list(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self._reading_paused:
            self._resume_reading()
        return parts

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expire(self) -> None:
        if self.write_paused:
            what = "the request to be written"
        else:
            what = "the response head" if self.phase == HEAD else "the response body"
        self.fail(ReadTimeout(f"timed out waiting for {what}", sent=self.wrote))
        self.abort()

    def fail(self, error: LeanError) -> None:
        """The exchange failed: keep the first error, wake the waiter, close the connection."""
        if self.error is None:
            self.error = error
        self.keep_alive = False
        self.close()
        self._wake()

    # --- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_by_peer()
        self.dead = True
        self._wake()

    def eof_received(self) -> bool:
        self._closed_by_peer()
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def _closed_by_peer(self) -> None:
        self.dead = True
        self.keep_alive = False
        phase = self.phase
        if phase == BODY and self._eof_body:
            self.phase = DONE  # a body delimited by the end of the connection: complete
            self._wake()
        elif phase in (HEAD, BODY):
            where = "before the response head" if phase == HEAD else "in the middle of the response body"
            self.fail(ConnectionReset(f"the server closed the connection {where}", sent=self.wrote))

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase != HEAD and phase != BODY:  # unsolicited bytes (idle, or after the response)
            self.keep_alive = False
            self.close()
            return
        if self._prefix is not None and not self._check_prefix(data):
            return
        before = self.body_bytes
        if self.head_only and phase == HEAD:
            self._feed_head_only(data)
        else:
            self._feed(data)
        if self.error is not None:
            return
        if self.phase == HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self.fail(InvalidResponse(
                    f"the response head is over {self._max_head} bytes", sent=self.wrote
                ))
        elif self.phase == BODY and self._in_chunk and self._chunk_data == 0:
            # in the last chunk's trailers (or a chunk header's extensions): llhttp holds them
            self._trailer_bytes += len(data) - (self.body_bytes - before)
            if self._trailer_bytes > self._max_head:
                self.fail(InvalidResponse(
                    f"the response trailers are over {self._max_head} bytes", sent=self.wrote
                ))
        else:
            self._trailer_bytes = 0

    def _check_prefix(self, data: bytes) -> bool:
        """The first response must start with `HTTP/` (llhttp also takes RTSP/ and ICE/)."""
        assert self._prefix is not None
        seen = (self._prefix + data[:8]).lstrip(b"\r\n")
        if len(seen) >= len(_PREFIX):
            if seen.startswith(_PREFIX):
                self._prefix = None
                return True
        elif _PREFIX.startswith(seen):
            self._prefix = seen
            return True
        self.fail(InvalidResponse("the response does not start with HTTP/", sent=self.wrote))
        return False

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            if self._stopped:  # stopped on purpose by a callback (it set what follows)
                return
            if self.phase == DONE:  # bytes after the complete response: poisoned, not an error
                self.keep_alive = False
                self.close()
                return
            self.fail(InvalidResponse(f"invalid response: {exc}", sent=self.wrote))

    def _feed_head_only(self, data: bytes) -> None:
        """A response to HEAD: llhttp would wait for a body, so the head is fed up to each LF and
        the parser stopped when the head is complete; what follows it is known exactly."""
        start = 0
        while True:
            end = data.find(b"\n", start) + 1
            piece = data[start:end] if end else data[start:]
            self._feed(piece)
            if self.error is not None or self.phase != HEAD:
                if self.phase == DONE and end and end < len(data):
                    self.keep_alive = False  # bytes after the head of a HEAD answer: garbage
                    self.close()
                return
            if not end or end >= len(data):
                return
            start = end

    # --- parser callbacks (httptools)

    def on_message_begin(self) -> None:
        if self.phase == DONE:  # a second message where none was asked for: poisoned
            self.keep_alive = False
            self.close()
            self._stopped = True
            raise _Abort

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 4
        if self.phase == BODY:  # trailers: dropped, bounded like a head
            self._trailer_fields += size
            if self._trailer_fields > self._max_head:
                self._stop(InvalidResponse(f"the response trailers are over {self._max_head} bytes",
                                           sent=self.wrote))
            return
        self._head_fields += size
        if self._head_fields > self._max_head:
            self._stop(InvalidResponse(f"the response head is over {self._max_head} bytes", sent=self.wrote))
        if len(self.raw_headers) >= self._max_headers:
            self._stop(InvalidResponse(f"the response has over {self._max_headers} header fields",
                                       sent=self.wrote))
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._stop(InvalidResponse(f"the response is HTTP/{version}", sent=self.wrote))
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 100 Continue, 103 Early Hints...: skipped (llhttp knows no body)
            return
        # a reason phrase is informative only: any bytes llhttp accepts pass here, and callers
        # that show it replace one holding control characters (gateway.headers.safe_reason)
        self.status = status
        self.version = version
        self._analyze(version, status)
        if status == 101:  # a final 101: returned as is, the rest is another protocol
            self.keep_alive = False
            self._done_now()
        elif self.head_only:
            if self.keep_alive:
                self._parser = HttpResponseParser(self)  # this one is stopped mid-message
            self._done_now()
        else:
            self.phase = BODY
            self._wake()

    def _analyze(self, version: str, status: int) -> None:
        """Framing and keep-alive from the final head (llhttp has checked Content-Length)."""
        te: list[bytes] = []
        tokens: set[bytes] = set()
        for name, value in self.raw_headers:
            size = len(name)
            if size == 14 and name.lower() == b"content-length":
                self.content_length = int(value.strip())
            elif size == 17 and name.lower() == b"transfer-encoding":
                te.append(value)
            elif size == 10 and name.lower() == b"connection":
                tokens.update(t.strip().lower() for t in value.split(b","))
        if te and (len(te) > 1 or te[0].strip().lower() != b"chunked"):
            self._stop(InvalidResponse("a Transfer-Encoding other than chunked", sent=self.wrote))
        bodyless = self.head_only or status in (204, 304)
        if bodyless:
            self.content_length = 0
        self._eof_body = not bodyless and not te and self.content_length is None
        if version == "1.1":
            alive = b"close" not in tokens
        else:
            alive = b"keep-alive" in tokens and b"close" not in tokens
        self.keep_alive = alive and not self._eof_body and not self.request_close

    def _done_now(self) -> None:
        """The response ends with its head (HEAD, 101): stop llhttp before it looks for a body."""
        self.phase = DONE
        self._wake()
        self._stopped = True
        raise _Abort

    def _stop(self, error: LeanError) -> None:
        self._stopped = True
        self.fail(error)
        raise _Abort

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        size = len(body)
        self.buffered += size
        self.body_bytes += size
        self._chunk_data += size
        if self.buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_chunk_header(self) -> None:
        self._in_chunk = True
        self._chunk_data = 0

    def on_chunk_complete(self) -> None:
        self._in_chunk = False

    def on_message_complete(self) -> None:
        if self._interim:  # the interim answer is over: the next message is the real one
            self._interim = False
            self.raw_headers = []
            self._reason = b""
            return
        self.phase = DONE
        self._wake()
