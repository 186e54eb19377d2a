"""Helpers (no tests here) for the lean client's conformance tests: loopback servers that read
requests with h11 (an independent parser) and answer raw bytes chosen by the test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

Answer = bytes | Callable[[asyncio.StreamWriter], Awaitable[None]] | None
"""Raw bytes to write, a coroutine doing anything, or None: close without answering."""


@dataclass
class Received:
    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class ScriptedServer:
    """Answers each request (across connections) with the next scripted answer; after the last
    one, the connection is closed. Keeps every request h11 read, with its connection number."""

    answers: list[Answer]
    close_after_each: bool = False
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    errors: list[Exception] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        assert not self.errors, self.errors

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        leftover = b""
        try:
            while self.answers:
                got = await read_request(reader, leftover)
                if got is None:
                    return
                request, body, leftover = got
                self.requests.append(Received(
                    number, request.method, request.target, list(request.headers), body
                ))
                answer = self.answers.pop(0)
                if answer is None:
                    return
                if isinstance(answer, bytes):
                    writer.write(answer)
                    await writer.drain()
                else:
                    await answer(writer)
                if self.close_after_each:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a broken test server must show
            self.errors.append(exc)
        finally:
            writer.close()
            self._tasks.discard(task)


async def read_request(
    reader: asyncio.StreamReader, leftover: bytes = b""
) -> tuple[h11.Request, bytes, bytes] | None:
    """One request read by h11 (None on a clean close before it), its body and the bytes after it."""
    conn = h11.Connection(h11.SERVER)
    if leftover:
        conn.receive_data(leftover)
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body), conn.trailing_data[0]
