"""Upstream HTTP client candidates side by side: `python -m bench.clients` (see `--help`).

Issue 14: which client should make the gateway's sub-requests and proxied calls? This script starts
a fast local upstream as its own process on 127.0.0.1 (bench/upstream.py's raw-protocol server,
answering a 1 KiB body, and a raw-protocol stream server) and measures, in this process, for each
candidate client:

- (a) sequential GETs of a 1 KiB answer, (b) GETs from 50 concurrent workers sharing one pool of 50
  connections, (c) a streamed 20 MiB answer read in 64 KiB chunks;
- calls/s (MB/s for the stream) and the CPU this client process spent (time.process_time, all its
  threads: the Rust clients' runtime threads count) per call (per MiB);
- candidates alternate within each round (A B C D E, A B C D E, ...); the table shows the median
  over rounds and the min-max, on the default asyncio loop and on uvloop.

Then it probes each candidate's behaviour against a tiny raw-socket server in this process (the
`--strictness` mode runs only that): malformed responses (bad or conflicting framing, invalid
status lines...), header order and duplicates, decompression, redirects, chunked bodies both ways,
stale keep-alive retries, read and total timeouts, backpressure. With the requirements read from
each library's source, that fills the feature matrix. The table goes to stdout and
bench/results/clients.md.

A candidate whose library is not installed is skipped with a message; the candidate libraries are
not project dependencies (`pip install aiosonic pyreqwest uvloop` to run them all).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import gzip
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "clients.md"
HOST = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB

HeaderList = tuple[tuple[str, str], ...]
Body = bytes | AsyncIterator[bytes] | None
# what a batch sub-request sends (the gateway forwards a handful of client headers plus its own)
CALL_HEADERS: HeaderList = (
    ("Accept", "application/json"),
    ("X-Request-Id", "0123456789abcdef"),
    ("X-Forwarded-For", "127.0.0.1"),
)
MAX_RESPONSE = 10 * MiB  # the cap on a buffered sub-response (batch.limits.max_response_bytes)


@dataclass(frozen=True)
class Timeouts:
    connect: float
    read: float
    total: float


BENCH_TIMEOUTS = Timeouts(connect=5.0, read=30.0, total=30.0)
PROBE_TIMEOUTS = Timeouts(connect=1.0, read=0.4, total=1.2)


class TooLarge(Exception):
    """A response body over the cap (the gateway's `oversize` error)."""


# -- the upstream (a separate process: `python -m bench.clients --serve`) -------------------------


def _serve() -> None:
    """The 1 KiB-answer server (bench/upstream.py's FastHTTP, bigger body) and a raw stream one."""
    from bench import upstream

    body = b'{"data":"' + b"x" * (KiB - 11) + b'"}'  # 1 KiB of JSON
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    class KiBHTTP(upstream.FastHTTP):
        def _answer(self, payload: bytes, close: bool) -> None:
            super()._answer(response if payload is upstream._RESPONSE else payload, close)

    blob = memoryview(bytes(range(256)) * (80 * KiB))  # 20 MiB, sliced (no copy) per answer

    class StreamHTTP(asyncio.Protocol):
        """GET /bytes/N: N bytes (N <= 20 MiB) in one transport.write: the kernel and the client's
        reads pace it, at almost no CPU here (the aiohttp stream app costs more than the clients)."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport, self.buf = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                head, self.buf = self.buf[:end], self.buf[end + 4:]
                size = min(int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1]), len(blob))
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                     b"Content-Length: %d\r\n\r\n" % size)
                self.transport.write(blob[:size])

    async def serve() -> None:
        import signal

        loop = asyncio.get_running_loop()
        fast = await loop.create_server(KiBHTTP, HOST, 0, backlog=1024)
        stream = await loop.create_server(StreamHTTP, HOST, 0)
        port = {name: server.sockets[0].getsockname()[1] for name, server in
                (("fast", fast), ("stream", stream))}
        print(json.dumps({**port, "body": len(body)}), flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        fast.close()
        stream.close()

    asyncio.run(serve())


@asynccontextmanager
async def upstream_process() -> AsyncIterator[dict[str, int]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.clients", "--serve", cwd=ROOT, stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if not line:
            raise RuntimeError("the upstream process did not start")
        yield json.loads(line)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# -- the candidates -------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: HeaderList
    body: bytes


class Reader(Protocol):
    async def read(self, n: int) -> bytes: ...


class Candidate(Protocol):
    name: str

    async def start(self) -> None: ...

    async def call(self, method: str, target: str, headers: HeaderList, body: Body) -> Answer: ...

    def stream(self, target: str) -> AbstractAsyncContextManager[Reader]: ...

    async def close(self) -> None: ...


class Unavailable(Exception):
    """The candidate's library is missing or does not work here: the candidate is skipped."""


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Unavailable(f"{name} is not installed ({exc})") from None


def _capped(so_far: int, more: int) -> None:
    if so_far + more > MAX_RESPONSE:
        raise TooLarge(f"body over {MAX_RESPONSE} bytes")


_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class AiohttpGateway:
    """aiohttp exactly as gateway/upstream.py uses it (UpstreamPool.start, _request, _read_capped,
    stream): a ClientTimeout and the header list built per call, iter_any into a bytearray."""

    name = "aiohttp-gateway"

    def __init__(self, port: int, limit: int, timeouts: Timeouts) -> None:
        self.aiohttp = _module("aiohttp")
        self.yarl = _module("yarl")
        self.base, self.limit, self.t = f"http://{HOST}:{port}", limit, timeouts

    async def start(self) -> None:
        aiohttp, t = self.aiohttp, self.t
        connector = aiohttp.TCPConnector(
            limit=self.limit, limit_per_host=self.limit, keepalive_timeout=30, ssl=True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS, trust_env=False,
        )

    async def call(self, method: str, target: str, headers: HeaderList, body: Body) -> Answer:
        t = self.t
        url = self.yarl.URL(self.base + target)  # the gateway's UpstreamCall carries a yarl URL
        timeout = self.aiohttp.ClientTimeout(total=min(t.total, t.total), sock_connect=t.connect)
        async with self.session.request(
            method, url, headers=list(headers), data=body, allow_redirects=False,
            server_hostname=None, timeout=timeout,
        ) as response:
            buffer = bytearray()
            async for chunk in response.content.iter_any():
                _capped(len(buffer), len(chunk))
                buffer.extend(chunk)
            return Answer(response.status, tuple(response.headers.items()), bytes(buffer))

    @asynccontextmanager
    async def stream(self, target: str) -> AsyncIterator[Reader]:
        t = self.t
        timeout = self.aiohttp.ClientTimeout(total=None, sock_connect=t.connect, sock_read=t.total)
        async with self.session.request(
            "GET", self.yarl.URL(self.base + target), headers=list(CALL_HEADERS), data=None,
            allow_redirects=False, timeout=timeout, server_hostname=None,
        ) as response:
            yield response.content

    async def close(self) -> None:
        await self.session.close()


class AiohttpTuned(AiohttpGateway):
    """aiohttp as fast as it goes with the same features: one ClientTimeout (connect + per-read +
    total) on the session and no per-call kwargs beyond the required ones, the body read in one
    `read()` when its Content-Length is within the cap (iter_any only for chunked bodies), a
    bigger read buffer for streams, DNS cache without expiry, and no idempotent-retry after a
    request was sent (`_retry_connection`, private). Variants (`--candidates aiohttp-tuned/X`)
    undo one choice each so that what helps can be measured: `iter_any`, `per-call-timeout`,
    `yarl-url` (build a yarl URL per call instead of passing the string), `small-buffer`."""

    name = "aiohttp-tuned"

    def __init__(self, port: int, limit: int, timeouts: Timeouts, variant: str = "") -> None:
        super().__init__(port, limit, timeouts)
        if variant not in ("", "iter_any", "per-call-timeout", "yarl-url", "small-buffer"):
            raise Unavailable(f"unknown aiohttp-tuned variant {variant!r}")
        self.variant = variant
        if variant:
            self.name = f"aiohttp-tuned/{variant}"

    async def start(self) -> None:
        aiohttp, t = self.aiohttp, self.t
        connector = aiohttp.TCPConnector(
            limit=self.limit, limit_per_host=self.limit, keepalive_timeout=30, ssl=True,
            ttl_dns_cache=None,
        )
        self.timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.read)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False, read_bufsize=(64 if self.variant == "small-buffer" else 256) * KiB,
        )
        self.session._retry_connection = False
        self.stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect, sock_read=t.read)

    async def call(self, method: str, target: str, headers: HeaderList, body: Body) -> Answer:
        url: Any = self.base + target
        if self.variant == "yarl-url":
            url = self.yarl.URL(url)
        if self.variant == "per-call-timeout":
            request = self.session.request(
                method, url, headers=headers, data=body, allow_redirects=False,
                timeout=self.aiohttp.ClientTimeout(total=self.t.total, sock_connect=self.t.connect),
            )
        else:
            request = self.session.request(method, url, headers=headers, data=body, allow_redirects=False)
        async with request as response:
            length = response.content_length
            if length is not None and self.variant != "iter_any":
                _capped(0, length)
                data = await response.read()
            else:
                buffer = bytearray()
                async for chunk in response.content.iter_any():
                    _capped(len(buffer), len(chunk))
                    buffer.extend(chunk)
                data = bytes(buffer)
            return Answer(response.status, tuple(response.headers.items()), data)

    @asynccontextmanager
    async def stream(self, target: str) -> AsyncIterator[Reader]:
        async with self.session.request(
            "GET", self.base + target, headers=CALL_HEADERS, allow_redirects=False,
            timeout=self.stream_timeout,
        ) as response:
            yield response.content


class _ChunkReader:
    """read(n) over a source of chunks of whatever size (not re-cut: the bench only counts)."""

    def __init__(self, next_chunk: Callable[[], Awaitable[Any]]) -> None:
        self.next_chunk = next_chunk

    async def read(self, n: int) -> bytes:
        chunk = await self.next_chunk()
        return b"" if chunk is None else chunk


class LeanHttptools:
    """The lean client on httptools (gateway/lean_client/, being written alongside this bench)."""

    name = "lean-httptools"

    def __init__(self, port: int, limit: int, timeouts: Timeouts) -> None:
        module = _module("gateway.lean_client")
        if not hasattr(module, "LeanPool"):
            raise Unavailable("gateway.lean_client has no LeanPool yet")
        self.pool = module.LeanPool(HOST, port, ssl=None, server_hostname=None, limit=limit)
        self.t = timeouts

    async def start(self) -> None:
        start = getattr(self.pool, "start", None)
        if start is not None:
            await _maybe_await(start())

    def _request(self, method: str, target: str, headers: HeaderList, body: Body) -> Any:
        t = self.t
        return self.pool.request(
            method, target, headers, body,
            connect_timeout=t.connect, read_timeout=t.read, total_timeout=t.total,
        )

    async def call(self, method: str, target: str, headers: HeaderList, body: Body) -> Answer:
        response = await self._request(method, target, headers, body)
        try:
            data = await response.read_all(MAX_RESPONSE)
            return Answer(response.status, tuple(response.headers), bytes(data))
        finally:
            await _maybe_await(response.release())

    @asynccontextmanager
    async def stream(self, target: str) -> AsyncIterator[Reader]:
        response = await self._request("GET", target, CALL_HEADERS, None)
        try:
            yield _ChunkReader(lambda: response.read_chunk(64 * KiB))
        finally:
            await _maybe_await(response.release())

    async def close(self) -> None:
        close = getattr(self.pool, "close", None) or getattr(self.pool, "aclose", None)
        if close is not None:
            await _maybe_await(close())


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Aiosonic:
    """aiosonic's HTTPClient, one pool (PoolConfig.size) per upstream; bodies read with
    `stream=True` + read_chunks (the non-streamed path always decompresses gzip/deflate)."""

    name = "aiosonic"

    def __init__(self, port: int, limit: int, timeouts: Timeouts) -> None:
        self.aiosonic = _module("aiosonic")
        self.connectors = _module("aiosonic.connectors")
        self.pools = _module("aiosonic.pools")
        self.timeout_module = _module("aiosonic.timeout")
        self.base, self.limit, self.t = f"http://{HOST}:{port}", limit, timeouts

    async def start(self) -> None:
        t = self.t
        timeouts = self.timeout_module.Timeouts(
            sock_connect=t.connect, sock_read=t.read, request_timeout=t.total,
        )
        connector = self.connectors.TCPConnector(
            pool_configs={":default": self.pools.PoolConfig(size=self.limit, max_conn_requests=None)},
            timeouts=timeouts,
        )
        self.client = self.aiosonic.HTTPClient(
            connector=connector, handle_cookies=False, follow=False, trust_env=False,
        )

    async def call(self, method: str, target: str, headers: HeaderList, body: Body) -> Answer:
        response = await self.client.request(
            self.base + target, method, headers=list(headers), data=body, stream=True,
        )
        try:
            buffer = bytearray(response.body)  # a body already read with the headers, or b""
            # read_chunks() on an answer with no body left (Content-Length: 0, a 204...) would
            # parse the next bytes as chunked: only call it with a body pending (private method)
            if response._has_pending_body():
                async for chunk in response.read_chunks():
                    _capped(len(buffer), len(chunk))
                    buffer.extend(chunk)
            return Answer(response.status_code, tuple(response.raw_headers), bytes(buffer))
        finally:
            await response.aclose()

    @asynccontextmanager
    async def stream(self, target: str) -> AsyncIterator[Reader]:
        async with self.client.stream("GET", self.base + target, headers=list(CALL_HEADERS)) as response:
            chunks = response.read_chunks()
            yield _ChunkReader(lambda: anext(chunks, None))

    async def close(self) -> None:
        await self.client.aclose()


class Pyreqwest:
    """pyreqwest (Rust: reqwest/hyper on a tokio runtime thread), one Client per upstream."""

    name = "pyreqwest"

    def __init__(self, port: int, limit: int, timeouts: Timeouts) -> None:
        self.client_module = _module("pyreqwest.client")
        self.base, self.limit, self.t = f"http://{HOST}:{port}", limit, timeouts

    async def start(self) -> None:
        t = self.t
        self.client = (
            self.client_module.ClientBuilder()
            .max_connections(self.limit).pool_max_idle_per_host(self.limit)
            .gzip(False).brotli(False).zstd(False).deflate(False)
            .follow_redirects(False).referer(False).http1_only()
            .connect_timeout(timedelta(seconds=t.connect)).read_timeout(timedelta(seconds=t.read))
            .timeout(timedelta(seconds=t.total))
            .build()
        )

    def _builder(self, method: str, target: str, headers: HeaderList, body: Body) -> Any:
        builder = self.client.request(method, self.base + target).headers(list(headers))
        if isinstance(body, bytes):
            builder = builder.body_bytes(body)
        elif body is not None:
            builder = builder.body_stream(body)
        return builder

    async def call(self, method: str, target: str, headers: HeaderList, body: Body) -> Answer:
        async with self._builder(method, target, headers, body).build_streamed() as response:
            reader = response.body_reader
            buffer = bytearray()
            while (chunk := await reader.read_chunk()) is not None:
                _capped(len(buffer), len(chunk))
                buffer.extend(chunk)
            return Answer(response.status, tuple(response.headers.items()), bytes(buffer))

    @asynccontextmanager
    async def stream(self, target: str) -> AsyncIterator[Reader]:
        request = self._builder("GET", target, CALL_HEADERS, None).build_streamed()
        async with request as response:
            reader = response.body_reader
            yield _ChunkReader(lambda: reader.read(64 * KiB))

    async def close(self) -> None:
        await self.client.close()


Factory = Callable[[int, int, Timeouts], Candidate]


def _tuned(variant: str) -> Factory:
    return lambda port, limit, timeouts: AiohttpTuned(port, limit, timeouts, variant)


FACTORIES: dict[str, Factory] = {
    "aiohttp-gateway": AiohttpGateway,
    "aiohttp-tuned": AiohttpTuned,
    "lean-httptools": LeanHttptools,
    "aiosonic": Aiosonic,
    "pyreqwest": Pyreqwest,
}
VARIANTS = {
    f"aiohttp-tuned/{v}": _tuned(v) for v in ("iter_any", "per-call-timeout", "yarl-url", "small-buffer")
}
DEFAULT = list(FACTORIES)


def make(name: str, port: int, limit: int, timeouts: Timeouts) -> Candidate:
    factory = FACTORIES.get(name) or VARIANTS.get(name)
    if factory is None:
        raise Unavailable(f"unknown candidate {name!r}")
    return factory(port, limit, timeouts)


# -- measuring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    rounds: int
    sequential: int
    concurrent: int
    workers: int
    stream_bytes: int
    stream_reps: int


FULL = Sizes(rounds=7, sequential=2000, concurrent=5000, workers=50, stream_bytes=20 * MiB, stream_reps=4)
QUICK = Sizes(rounds=1, sequential=100, concurrent=200, workers=10, stream_bytes=MiB, stream_reps=1)


@dataclass
class Sample:
    rate: float  # calls/s, or MB/s for the stream
    cpu: float  # µs per call, or µs per MiB


@dataclass
class Results:
    """samples[loop][scenario][candidate] -> one Sample per round."""

    samples: dict[str, dict[str, dict[str, list[Sample]]]] = field(default_factory=dict)

    def add(self, loop: str, scenario: str, candidate: str, sample: Sample) -> None:
        self.samples.setdefault(loop, {}).setdefault(scenario, {}).setdefault(candidate, []).append(sample)


async def _sequential(client: Candidate, n: int) -> None:
    for _ in range(n):
        answer = await client.call("GET", "/", CALL_HEADERS, None)
        if answer.status != 200:
            raise RuntimeError(f"status {answer.status}")


async def _concurrent(client: Candidate, n: int, workers: int) -> None:
    async def worker(count: int) -> None:
        for _ in range(count):
            answer = await client.call("GET", "/", CALL_HEADERS, None)
            if answer.status != 200:
                raise RuntimeError(f"status {answer.status}")

    share, extra = divmod(n, workers)
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(workers)))


async def _stream(client: Candidate, size: int, reps: int) -> None:
    for _ in range(reps):
        received = 0
        async with client.stream(f"/bytes/{size}") as reader:
            while chunk := await reader.read(64 * KiB):
                received += len(chunk)
        if received != size:
            raise RuntimeError(f"stream gave {received} of {size} bytes")


async def _measure(run: Callable[[], Awaitable[None]], units: float, per: float) -> Sample:
    """Run once; rate in units/s, CPU of this process per `per` units (µs)."""
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await run()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return Sample(rate=units / wall, cpu=cpu * 1e6 / (units / per))


SCENARIOS = ("sequential", "concurrent", "stream")


async def bench_loop(loop_name: str, names: list[str], sizes: Sizes, results: Results,
                     skipped: dict[str, str]) -> None:
    async with upstream_process() as ports:
        clients: dict[str, dict[str, Candidate]] = {}
        for name in names:
            try:
                pair = {
                    "fast": make(name, ports["fast"], sizes.workers, BENCH_TIMEOUTS),
                    "stream": make(name, ports["stream"], 4, BENCH_TIMEOUTS),
                }
                for client in pair.values():
                    await client.start()
                # warm-up: open the pool, fill caches
                await _concurrent(pair["fast"], sizes.workers * 4, sizes.workers)
                await _stream(pair["stream"], MiB, 1)
                clients[name] = pair
            except Unavailable as exc:
                skipped.setdefault(name, str(exc))
            except Exception as exc:
                skipped.setdefault(name, f"failed on {loop_name}: {type(exc).__name__}: {exc}")
        try:
            for round_no in range(sizes.rounds):
                for scenario in SCENARIOS:
                    for name, pair in clients.items():
                        sample = await _run_scenario(scenario, pair, sizes)
                        results.add(loop_name, scenario, name, sample)
                print(f"  {loop_name}: round {round_no + 1}/{sizes.rounds} done", file=sys.stderr)
        finally:
            for pair in clients.values():
                for client in pair.values():
                    with suppress(Exception):
                        await client.close()


async def _run_scenario(scenario: str, pair: dict[str, Candidate], sizes: Sizes) -> Sample:
    if scenario == "sequential":
        return await _measure(lambda: _sequential(pair["fast"], sizes.sequential), sizes.sequential, 1)
    if scenario == "concurrent":
        return await _measure(
            lambda: _concurrent(pair["fast"], sizes.concurrent, sizes.workers), sizes.concurrent, 1
        )
    total = sizes.stream_bytes * sizes.stream_reps
    sample = await _measure(
        lambda: _stream(pair["stream"], sizes.stream_bytes, sizes.stream_reps), total / MiB, 1
    )
    sample.rate *= MiB / 1e6  # MiB/s -> MB/s
    return sample


# -- probing behaviour (the raw-socket server) ----------------------------------------------------


def _response(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + b"\r\n" + body


GZ = gzip.compress(b"hello hello hello hello")
# name -> (raw answer, what a strict client does)
MALFORMED: dict[str, tuple[bytes, str]] = {
    "bad Content-Length": (_response("HTTP/1.1 200 OK\nContent-Length: 5x\n", b"hello"), "reject"),
    "negative Content-Length": (_response("HTTP/1.1 200 OK\nContent-Length: -5\n", b"hello"), "reject"),
    "two different Content-Lengths": (
        _response("HTTP/1.1 200 OK\nContent-Length: 5\nContent-Length: 7\n", b"hello.."), "reject"),
    "Content-Length + chunked": (
        _response("HTTP/1.1 200 OK\nContent-Length: 3\nTransfer-Encoding: chunked\n",
                  b"5\r\nhello\r\n0\r\n\r\n"), "reject"),
    "invalid status line (2x0)": (_response("HTTP/1.1 2x0 OK\nContent-Length: 5\n", b"hello"), "reject"),
    "not HTTP (HTTX/1.1)": (_response("HTTX/1.1 200 OK\nContent-Length: 5\n", b"hello"), "reject"),
    "space before colon": (_response("HTTP/1.1 200 OK\nContent-Length : 5\n", b"hello"), "reject"),
    "bad chunk size": (
        _response("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n", b"zz\r\nhello\r\n0\r\n\r\n"),
        "reject"),
    "truncated body (CL 100, 5 sent)": (_response("HTTP/1.1 200 OK\nContent-Length: 100\n", b"hello"),
                                        "reject"),
    "NUL in a header value": (_response("HTTP/1.1 200 OK\nX-A: a\x00b\nContent-Length: 5\n", b"hello"),
                              "reject"),
    "obs-fold header": (_response("HTTP/1.1 200 OK\nX-A: a\n  b\nContent-Length: 5\n", b"hello"),
                        "either"),
    "bare LF line ends": (b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello", "either"),
}
HEADERS_ANSWER = _response(
    "HTTP/1.1 200 OK\nX-B: 1\nx-a: 2\nX-B: 3\nSet-Cookie: a=1\nSet-Cookie: b=2\nContent-Length: 2\n", b"ok"
)
SPECIAL: dict[str, bytes] = {
    "/gzip": _response(f"HTTP/1.1 200 OK\nContent-Encoding: gzip\nContent-Length: {len(GZ)}\n", GZ),
    "/redirect": _response("HTTP/1.1 302 Found\nLocation: /elsewhere\nContent-Length: 0\n"),
    "/chunked": _response("HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n",
                          b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    "/headers": HEADERS_ANSWER,
}
OK2 = _response("HTTP/1.1 200 OK\nContent-Length: 2\n", b"ok")


class ProbeServer:
    """A raw HTTP/1.1 server: it reads a request (Content-Length or chunked body) and answers
    according to the path. It records what it received, per path."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[bytes, bytes]]] = {}
        self.stream_written = 0
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._track, HOST, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await self.handle(reader, writer)
        except asyncio.CancelledError:
            pass  # stop(): end quietly (3.11's start_server callback chokes on a cancelled handler)
        finally:
            self.handlers.discard(task)

    async def stop(self) -> None:
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        with suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                body = await self._read_body(head, reader)
                target = head.split(b" ", 2)[1].decode()
                self.seen.setdefault(target, []).append((head, body))
                keep = await self.answer(target, index, writer)
                index += 1
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_body(head: bytes, reader: asyncio.StreamReader) -> bytes:
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    return bytes(body)
                body += chunk[:-2]
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                return await reader.readexactly(int(line.split(b":")[1]))
        return b""

    async def answer(self, target: str, index: int, writer: asyncio.StreamWriter) -> bool:
        """Write the answer for `target`; False to close the connection afterwards."""
        if target.startswith("/malformed/"):
            writer.write(MALFORMED[_unslug(target.removeprefix("/malformed/"))][0])
            await writer.drain()
            return False
        if target in SPECIAL:
            writer.write(SPECIAL[target])
            return True
        if target == "/stale/first":  # answered as keep-alive, then the server closes when idle
            writer.write(OK2)
            await writer.drain()
            await asyncio.sleep(0.05)
            return False
        if target.startswith("/sent/") and target.endswith("/second") and index > 0:
            return False  # read on a reused connection, then dropped unanswered
        if target == "/stall":  # headers, then nothing
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(5)
            return False
        if target == "/trickle":  # a byte every 0.1 s for 3 s: per-read timeouts never fire
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
            for _ in range(30):
                await writer.drain()
                writer.write(b"x")
                await asyncio.sleep(0.1)
            await writer.drain()
            return False
        if target == "/big":  # 64 MiB as fast as the client takes it
            chunk = b"x" * MiB
            self.stream_written = 0
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * MiB))
            for _ in range(64):
                writer.write(chunk)
                await writer.drain()
                self.stream_written += len(chunk)
            return False
        writer.write(OK2)
        return True


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def _unslug(slug: str) -> str:
    for name in MALFORMED:
        if _slug(name) == slug:
            return name
    raise KeyError(slug)


@dataclass
class Probe:
    verdict: str  # yes / no / partial / info
    detail: str


def _error(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").replace("|", "/")
    return f"{type(exc).__name__}" + (f": {text[:60]}" if text else "")


async def _try(coro: Awaitable[Answer], timeout: float = 3.0) -> Answer | BaseException:
    try:
        return await asyncio.wait_for(coro, timeout)
    except Exception as exc:
        return exc


async def probe_candidate(name: str, server: ProbeServer, port: int) -> dict[str, Probe]:
    out: dict[str, Probe] = {}

    async def fresh(limit: int = 1) -> Candidate:
        client = make(name, port, limit, PROBE_TIMEOUTS)
        await client.start()
        return client

    # -- malformed answers
    rejected = total = 0
    details = []
    for bad, (_, expect) in MALFORMED.items():
        client = await fresh()
        result = await _try(client.call("GET", f"/malformed/{_slug(bad)}", (), None))
        await client.close()
        if isinstance(result, BaseException):
            details.append(f"{bad}: rejected ({type(result).__name__})")
            rejected += expect == "reject"
        else:
            details.append(f"{bad}: accepted ({result.status}, {result.body[:12]!r})")
        total += expect == "reject"
        out[f"malformed: {bad}"] = Probe(
            "info" if expect == "either" else ("yes" if isinstance(result, BaseException) else "no"),
            "rejected" if isinstance(result, BaseException) else f"accepted {result.status} "
            f"body={result.body[:12]!r}",
        )
    out["strict parsing"] = Probe(
        "yes" if rejected == total else "partial" if rejected >= total - 2 else "no",
        f"{rejected}/{total} malformed answers rejected",
    )

    client = await fresh(limit=4)
    try:
        # -- headers: order and duplicates, both ways
        sent = (("X-B", "1"), ("X-A", "2"), ("X-B", "3"))
        server.seen.pop("/headers", None)
        result = await _try(client.call("GET", "/headers", sent, None))
        if isinstance(result, BaseException):
            out["header order/duplicates"] = Probe("no", _error(result))
        else:
            head = server.seen["/headers"][0][0].decode("latin-1")
            wire = [line.split(":")[0] for line in head.split("\r\n")[1:] if line.lower().startswith("x-")]
            got = [(k, v) for k, v in result.headers if k.lower() in ("x-a", "x-b", "set-cookie")]
            want = [("X-B", "1"), ("x-a", "2"), ("X-B", "3"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
            folded = [(k.lower(), v) for k, v in got]
            expected = [(k.lower(), v) for k, v in want]
            in_order = wire == ["X-B", "X-A", "X-B"] and folded == expected
            all_kept = sorted(n.lower() for n in wire) == ["x-a", "x-b", "x-b"] and sorted(folded) == sorted(
                expected)
            out["header order/duplicates"] = Probe(
                "yes" if in_order else "partial" if all_kept else "no",
                f"sent X-B, X-A, X-B: on the wire {', '.join(wire)}; got "
                + ", ".join(f"{k}: {v}" for k, v in got)
                + ("" if in_order else " (order changed)" if all_kept else " (a header LOST)")
                + ("" if got == want else " (name case changed)"),
            )
        # -- no decompression
        result = await _try(client.call("GET", "/gzip", (), None))
        out["no auto-decompression"] = (
            Probe("no", _error(result)) if isinstance(result, BaseException)
            else Probe("yes", "gzip body passed through") if result.body == GZ
            else Probe("no", f"body changed to {result.body[:20]!r}")
        )
        # -- no redirects
        result = await _try(client.call("GET", "/redirect", (), None))
        out["no redirects"] = (
            Probe("no", _error(result)) if isinstance(result, BaseException)
            else Probe("yes" if result.status == 302 else "no", f"status {result.status}")
        )
        # -- chunked response, Content-Length and chunked request bodies
        result = await _try(client.call("GET", "/chunked", (), None))
        chunked_in = not isinstance(result, BaseException) and result.body == b"hello world"

        async def parts() -> AsyncIterator[bytes]:
            for part in (b"abc", b"def", b"ghi"):
                yield part

        server.seen.pop("/upload", None)
        server.seen.pop("/upload-cl", None)
        chunked_result = await _try(client.call("POST", "/upload", (), parts()))
        cl_result = await _try(client.call("POST", "/upload-cl", (), b"0123456789"))
        uploads = server.seen.get("/upload", [])
        chunked_out = (not isinstance(chunked_result, BaseException) and len(uploads) == 1
                       and b"transfer-encoding: chunked" in uploads[0][0].lower()
                       and uploads[0][1] == b"abcdefghi")
        cl_seen = server.seen.get("/upload-cl", [])
        cl_out = (not isinstance(cl_result, BaseException) and len(cl_seen) == 1
                  and b"content-length: 10" in cl_seen[0][0].lower())
        out["CL + chunked bodies both ways"] = Probe(
            "yes" if chunked_in and chunked_out and cl_out else "partial",
            f"chunked response {'ok' if chunked_in else 'FAILED'}, "
            f"chunked request from an async iterator {'ok' if chunked_out else 'FAILED'}"
            + ("" if chunked_out or not isinstance(chunked_result, BaseException)
               else f" ({_error(chunked_result)})")
            + f", Content-Length request {'ok' if cl_out else 'FAILED'}",
        )
    finally:
        await client.close()

    # -- stale keep-alive: closed while idle -> a new connection; dropped after sending -> no retry
    client = await fresh()
    try:
        await _try(client.call("GET", "/stale/first", (), None))
        await asyncio.sleep(0.2)
        idle = await _try(client.call("POST", "/stale/second", (), b"x"))
        reconnected = "reconnected" if not isinstance(idle, BaseException) else _error(idle)
        verdicts = [f"closed while idle: {reconnected}"]
        sends = {}
        for method in ("GET", "POST"):
            path = f"/sent/{method}/second"
            server.seen.pop(path, None)
            await _try(client.call(method, f"/sent/{method}/first", (), None))
            result = await _try(client.call(method, path, (), b"x" if method == "POST" else None))
            sends[method] = len(server.seen.get(path, []))
            verdicts.append(
                f"{method} dropped after sending: sent {sends[method]}x, "
                + ("error" if isinstance(result, BaseException) else f"status {result.status}")
            )
        good = not isinstance(idle, BaseException) and all(n == 1 for n in sends.values())
        out["stale keep-alive retry only when nothing sent"] = Probe(
            "yes" if good else "partial" if not isinstance(idle, BaseException) else "no",
            "; ".join(verdicts),
        )
    finally:
        await client.close()

    # -- timeouts: per-read (headers then nothing), total (a byte every 0.1 s)
    client = await fresh()
    try:
        started = time.perf_counter()
        stall = await _try(client.call("GET", "/stall", (), None))
        stall_s = time.perf_counter() - started
        started = time.perf_counter()
        trickle = await _try(client.call("GET", "/trickle", (), None))
        trickle_s = time.perf_counter() - started
    finally:
        await client.close()
    read_ok = isinstance(stall, BaseException) and stall_s < PROBE_TIMEOUTS.read + 0.4
    total_ok = isinstance(trickle, BaseException) and trickle_s < PROBE_TIMEOUTS.total + 0.5
    out["read/total timeouts (probed)"] = Probe(
        "yes" if read_ok and total_ok else "partial" if read_ok or total_ok else "no",
        f"stalled body: {_error(stall) if isinstance(stall, BaseException) else 'no error'} after "
        f"{stall_s:.2f} s (read {PROBE_TIMEOUTS.read} s); trickling body: "
        f"{_error(trickle) if isinstance(trickle, BaseException) else 'no error'} after "
        f"{trickle_s:.2f} s (total {PROBE_TIMEOUTS.total} s)",
    )

    # -- backpressure: read one chunk of a 64 MiB answer, then stop reading for 0.5 s
    client = make(name, port, 1, Timeouts(1.0, 10.0, 10.0))
    await client.start()
    try:
        async with client.stream("/big") as reader:
            await reader.read(64 * KiB)
            await asyncio.sleep(0.5)
            written = server.stream_written
        out["streaming with backpressure"] = Probe(
            "yes" if written < 16 * MiB else "no",
            f"server could write {written // MiB} MiB of 64 while the reader paused",
        )
    except Exception as exc:
        out["streaming with backpressure"] = Probe("no", _error(exc))
    finally:
        with suppress(Exception):
            await client.close()
    return out


async def run_probes(names: list[str], skipped: dict[str, str]) -> dict[str, dict[str, Probe]]:
    server = ProbeServer()
    port = await server.start()
    results: dict[str, dict[str, Probe]] = {}
    try:
        for name in names:
            try:
                make(name, port, 1, PROBE_TIMEOUTS)
            except Unavailable as exc:
                skipped.setdefault(name, str(exc))
                continue
            print(f"  probing {name}", file=sys.stderr)
            try:
                results[name] = await probe_candidate(name, server, port)
            except Exception as exc:
                skipped.setdefault(name, f"probes failed: {_error(exc)}")
    finally:
        await server.stop()
    return results


# -- what each library documents (read from its source; the probes check the rest) ----------------

STATIC: dict[str, dict[str, tuple[str, str]]] = {
    "keep-alive pool with per-upstream cap": {
        "aiohttp-gateway": ("yes", "TCPConnector(limit, limit_per_host), one session per upstream"),
        "aiohttp-tuned": ("yes", "same connector"),
        "lean-httptools": ("yes", "LeanPool(host, port, limit=N): one pool per upstream"),
        "aiosonic": ("yes", "PoolConfig(size) per 'scheme://host' key or one client per upstream; "
                     "recycles a connection every max_conn_requests (default 1000)"),
        "pyreqwest": ("partial", "max_connections caps in-flight requests per Client (so one Client per "
                      "upstream); pool_max_idle_per_host caps idle ones"),
    },
    "connect/read/total timeouts": {
        "aiohttp-gateway": ("yes", "ClientTimeout(sock_connect, sock_read, total), per session or call"),
        "aiohttp-tuned": ("yes", "same, one object on the session"),
        "lean-httptools": ("yes", "connect_timeout, read_timeout, total_timeout per request"),
        "aiosonic": ("partial", "Timeouts(sock_connect, sock_read, request_timeout): sock_read only guards "
                     "the status line, request_timeout ends when the headers are in (stream=True)"),
        "pyreqwest": ("yes", "connect_timeout, read_timeout (per read), timeout (total) per Client; "
                      "only the total per request"),
    },
    "stale keep-alive retry only when nothing sent": {
        "aiohttp-gateway": ("partial", "drops closed idle connections; retries GET/PUT/DELETE once after "
                            "ServerDisconnected even when sent (off only via private _retry_connection)"),
        "aiohttp-tuned": ("yes", "_retry_connection = False (private attribute): no resend"),
        "lean-httptools": ("?", "see the probe"),
        "aiosonic": ("partial", "retries idempotent methods with a replayable body up to 3 times on a "
                     "reused connection, whether sent or not"),
        "pyreqwest": ("partial", "hyper's pool retries only when the connection closed before the request "
                      "was written (retry_canceled_requests); not configurable here"),
    },
    "custom SSLContext + server_hostname": {
        "aiohttp-gateway": ("yes", "ssl=SSLContext on the connector, server_hostname= per request"),
        "aiohttp-tuned": ("yes", "same"),
        "lean-httptools": ("yes", "LeanPool(ssl=SSLContext, server_hostname=)"),
        "aiosonic": ("partial", "ssl=SSLContext per request; SNI is always the URL's host (no override "
                     "but a custom resolver)"),
        "pyreqwest": ("partial", "no ssl.SSLContext (Rust TLS stack): root certificates, client identity "
                      "PEM, min/max TLS version, tls_sni; resolve(name, ip, port) for SNI != address"),
    },
}


def feature_matrix(names: list[str], probes: dict[str, dict[str, Probe]]) -> list[str]:
    rows = [
        *STATIC,
        "CL + chunked bodies both ways", "streaming with backpressure", "no auto-decompression",
        "no redirects", "strict parsing", "header order/duplicates", "read/total timeouts (probed)",
        "stale keep-alive retry only when nothing sent (probed)",
    ]
    shown = [n for n in names if n in probes]
    lines = ["| requirement | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for row in rows:
        cells = []
        for name in shown:
            base = name.split("/")[0]
            if row in STATIC:
                verdict, why = STATIC[row].get(base, ("?", "not reviewed"))
                if row == "stale keep-alive retry only when nothing sent" and base == "lean-httptools":
                    probe = probes[name].get("stale keep-alive retry only when nothing sent")
                    verdict, why = (probe.verdict, "probed") if probe else (verdict, why)
            else:
                key = row.removesuffix(" (probed)") if row.startswith("stale") else row
                probe = probes[name].get(key)
                verdict, why = (probe.verdict, probe.detail) if probe else ("?", "not probed")
            cells.append(f"**{verdict}**: {why}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def malformed_table(names: list[str], probes: dict[str, dict[str, Probe]]) -> list[str]:
    shown = [n for n in names if n in probes]
    lines = ["| malformed answer | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for bad in MALFORMED:
        cells = [probes[n].get(f"malformed: {bad}", Probe("?", "?")).detail for n in shown]
        lines.append(f"| {bad} | " + " | ".join(cells) + " |")
    return lines


# -- reporting ------------------------------------------------------------------------------------


def _stat(values: Sequence[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def bench_table(results: Results, sizes: Sizes) -> list[str]:
    lines = [
        "| loop | scenario | candidate | rate, median (min-max) | client CPU, median (min-max) "
        "| CPU / aiohttp-gateway |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "sequential": (f"{sizes.sequential} sequential GETs (1 KiB)", "calls/s", "µs/call"),
        "concurrent": (f"{sizes.concurrent} GETs, {sizes.workers} concurrent", "calls/s", "µs/call"),
        "stream": (f"{sizes.stream_bytes // MiB} MiB stream x{sizes.stream_reps}, 64 KiB reads",
                   "MB/s", "µs/MiB"),
    }
    for loop, scenarios in results.samples.items():
        for scenario, by_candidate in scenarios.items():
            label, rate_unit, cpu_unit = labels[scenario]
            base = by_candidate.get("aiohttp-gateway")
            for name, samples in by_candidate.items():
                rates = [s.rate for s in samples]
                cpus = [s.cpu for s in samples]
                ratio = "-"
                if base is not None and name != "aiohttp-gateway":
                    ratios = [s.cpu / b.cpu for s, b in zip(samples, base, strict=False)]
                    ratio = _stat(ratios, ".2f")
                lines.append(
                    f"| {loop} | {label} | {name} | {_stat(rates, '.0f')} {rate_unit} "
                    f"| {_stat(cpus, '.0f')} {cpu_unit} | {ratio} |"
                )
    return lines


def _versions(names: list[str]) -> str:
    from importlib import metadata

    dists = {"aiohttp": "aiohttp", "aiosonic": "aiosonic", "pyreqwest": "pyreqwest",
             "httptools": "httptools", "uvloop": "uvloop"}
    found = []
    for dist in dists.values():
        with suppress(metadata.PackageNotFoundError):
            found.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(found)


def report(args: argparse.Namespace, sizes: Sizes, names: list[str], results: Results,
           probes: dict[str, dict[str, Probe]], skipped: dict[str, str], elapsed: float) -> str:
    lines = [
        "# Upstream client candidates (issue 14)",
        "",
        f"`python -m bench.clients{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {_versions(names)}; {elapsed:.0f} s.",
        "",
    ]
    if results.samples:
        lines += [
            f"Client CPU is this process's `time.process_time()` over the run (all threads), per call "
            f"or per MiB; the upstream is another process on 127.0.0.1. {sizes.rounds} rounds, the "
            "candidates alternating within each round; median (min-max) over rounds. The CPU ratio "
            "is taken within each round. The machine is shared: compare within a run.",
            "",
            *bench_table(results, sizes),
            "",
        ]
    if probes:
        lines += [
            "## Feature matrix",
            "",
            "The first rows come from each library's source and docs; the others were probed against a "
            "raw-socket server (`--strictness` runs only those). aiohttp-gateway's probed rows show "
            "the gateway's configuration (no per-read timeout on batch calls, aiohttp's default "
            "idempotent retry), not the limits of aiohttp, which aiohttp-tuned shows.",
            "",
            *feature_matrix(names, probes),
            "",
            "### Malformed answers",
            "",
            *malformed_table(names, probes),
            "",
        ]
    if skipped:
        lines += ["## Skipped or failed", ""] + [f"- {name}: {why}" for name, why in skipped.items()] + [""]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def _loops(requested: str) -> list[tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]]:
    loops: list[tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]] = []
    for name in requested.split(","):
        if name == "asyncio":
            loops.append(("asyncio", None))
        elif name == "uvloop":
            try:
                uvloop = importlib.import_module("uvloop")
            except ImportError:
                print("uvloop is not installed: its runs are skipped", file=sys.stderr)
                continue
            loops.append(("uvloop", uvloop.new_event_loop))
        else:
            raise SystemExit(f"unknown loop {name!r}")
    return loops


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, small sizes")
    parser.add_argument("--rounds", type=int, help="rounds (default 7, --quick 1)")
    parser.add_argument("--candidates", default=",".join(DEFAULT),
                        help=f"comma-separated, from {', '.join([*DEFAULT, *VARIANTS])}")
    parser.add_argument("--loops", default="asyncio,uvloop", help="asyncio,uvloop")
    parser.add_argument("--strictness", action="store_true", help="only the behaviour probes")
    parser.add_argument("--no-probes", action="store_true", help="only the measurements")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.serve:
        _serve()
        return 0
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = Sizes(args.rounds, sizes.sequential, sizes.concurrent, sizes.workers,
                      sizes.stream_bytes, sizes.stream_reps)
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    started = time.perf_counter()
    results = Results()
    skipped: dict[str, str] = {}
    probes: dict[str, dict[str, Probe]] = {}
    if not args.strictness:
        for loop_name, factory in _loops(args.loops):
            print(f"measuring on {loop_name}", file=sys.stderr)
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(bench_loop(loop_name, names, sizes, results, skipped))
    if not args.no_probes:
        print("probing behaviour", file=sys.stderr)
        probes = asyncio.run(run_probes(names, skipped))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    text = report(args, sizes, names, results, probes, skipped, time.perf_counter() - started)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
