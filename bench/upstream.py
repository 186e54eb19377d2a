"""The benchmark's upstream, run as its own process: `python bench/upstream.py`.

Three listeners on loopback, one event loop, ports printed as one JSON line on stdout:

- `fast`: a minimal HTTP/1.1 keep-alive server on a raw asyncio Protocol. Any path answers 200 with
  a small JSON body; `?delay_ms=N` answers after N ms (a timer, no task). It costs a few µs per
  request, so the figures measure the gateway (or nginx), not the upstream's own framework.
- `stream`: aiohttp, `GET /bytes/{n}` streams n bytes, `POST /upload` reads and counts a body.
- `legacy`: the demo `legacy_app` (CRUD on /orders) so atomic batches get inferred compensations.

Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from urllib.parse import parse_qs

from aiohttp import web

_BODY = b'{"ok":true}'
_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_BODY)).encode()
    + b"\r\n\r\n"
)
_RESPONSE = _HEAD + _BODY
_BAD = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class FastHTTP(asyncio.Protocol):
    """HTTP/1.1 with Content-Length bodies, keep-alive, one request at a time per connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: tuple[bytes, bytes, int, bool] | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while self.transport is not None and not self.busy:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(self.buf[:end]).split(b"\r\n")
                del self.buf[: end + 4]
                method, target = lines[0].split(b" ", 2)[:2]
                length, close = 0, False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection":
                        close = value.strip().lower() == b"close"
                    elif name == b"transfer-encoding":
                        self.transport.write(_BAD)
                        self.transport.close()
                        return
                self.head = (method, target, length, close)
            method, target, length, close = self.head
            if len(self.buf) < length:
                return
            del self.buf[:length]
            self.head = None
            delay = _delay_ms(target)
            payload = _HEAD if method == b"HEAD" else _RESPONSE
            if delay > 0:
                self.busy = True
                asyncio.get_running_loop().call_later(delay / 1000, self._answer, payload, close)
                return
            self._answer(payload, close)

    def _answer(self, payload: bytes, close: bool) -> None:
        self.busy = False
        if self.transport is None:
            return
        self.transport.write(payload)
        if close:
            self.transport.close()
            return
        if self.buf:
            self._process()


def _delay_ms(target: bytes) -> float:
    _, _, query = target.partition(b"?")
    if b"delay_ms" not in query:
        return 0.0
    values = parse_qs(query.decode("latin-1")).get("delay_ms")
    return float(values[0]) if values else 0.0


async def _download(request: web.Request) -> web.StreamResponse:
    remaining = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = remaining
    await response.prepare(request)
    chunk = bytes(range(256)) * 1024  # 256 KiB
    view = memoryview(chunk)
    while remaining > 0:
        await response.write(view[: min(len(chunk), remaining)])
        remaining -= len(chunk)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        size += len(chunk)
    return web.json_response({"bytes": size})


def stream_app() -> web.Application:
    app = web.Application()
    app.add_routes([web.get("/bytes/{n:[0-9]+}", _download), web.post("/upload", _upload)])
    return app


async def _serve(host: str) -> None:
    from gateway.demo.launcher import start_site
    from gateway.demo.services import legacy_app

    loop = asyncio.get_running_loop()
    fast = await loop.create_server(FastHTTP, host, 0, backlog=1024)
    stream_runner, stream_url = await start_site(stream_app(), host)
    legacy_runner, legacy_url = await start_site(legacy_app(), host)
    ports = {
        "fast": f"http://{host}:{fast.sockets[0].getsockname()[1]}",
        "stream": stream_url,
        "legacy": legacy_url,
    }
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    fast.close()
    await stream_runner.cleanup()
    await legacy_runner.cleanup()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"))
