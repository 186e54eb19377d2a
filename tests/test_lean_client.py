"""Conformance of gateway.lean_client against real loopback servers: an aiohttp app for the normal
cases, h11-reading servers answering raw (often broken) bytes for the strict ones, TLS by trustme."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme
from aiohttp import web

from gateway.lean_client import (
    BodyMismatch,
    ConnectError,
    ConnectionReset,
    InvalidResponse,
    LeanPool,
    ReadTimeout,
    RequestNotSent,
    ResponseTooLarge,
    TLSError,
)
from gateway.lean_client.protocol import HIGH_WATER
from tests.test_lean_client_servers import ScriptedServer


def pool_for(port: int, limit: int = 4, **kwargs: object) -> LeanPool:
    return LeanPool("127.0.0.1", port, ssl=None, server_hostname=None, limit=limit, **kwargs)  # type: ignore[arg-type]


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


# --- a well-behaved server (aiohttp)


@pytest.fixture
async def app_port() -> AsyncIterator[tuple[int, dict[str, object]]]:
    seen: dict[str, object] = {"peers": set(), "requests": []}

    async def echo(request: web.Request) -> web.StreamResponse:
        seen["peers"].add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr,attr-defined]
        body = await request.read()
        seen["requests"].append((request.method, request.raw_path, list(request.raw_headers), body))  # type: ignore[attr-defined]
        return web.Response(body=b"echo:" + body, headers={"X-Method": request.method})

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["n"])
        response = web.StreamResponse()
        if request.query.get("chunked"):
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        await response.prepare(request)
        block = bytes(range(256)) * 256
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/big/{n}", big)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, seen
    await runner.cleanup()


async def test_get_post_and_keep_alive_reuse(app_port: tuple[int, dict[str, object]]) -> None:
    port, seen = app_port
    pool = pool_for(port)
    r = await pool.request("GET", "/a?x=1%202", [("X-Test", "v")], None, read_timeout=5)
    assert (r.status, r.reason, r.version) == (200, "OK", "1.1")
    assert ("X-Method", "GET") in r.headers
    assert await r.read_all(100) == b"echo:"
    r = await pool.request("POST", "/b", [("Content-Type", "text/plain")], b"payload", read_timeout=5)
    assert await r.read_all(100) == b"echo:payload"
    for _ in range(5):
        async with await pool.request("GET", "/c", [], None, read_timeout=5) as r:
            assert await r.read_all(100) == b"echo:"
    assert len(seen["peers"]) == 1  # type: ignore[arg-type]
    method, path, headers, body = seen["requests"][1]  # type: ignore[index]
    assert (method, path, body) == ("POST", "/b", b"payload")
    assert (b"Content-Length", b"7") in headers and (b"Host", f"127.0.0.1:{port}".encode()) in headers
    assert seen["requests"][0][1] == "/a?x=1%202"  # type: ignore[index]
    assert (pool.open_connections, pool.idle_connections) == (1, 1)
    await pool.close()


async def test_chunked_request_body_from_an_iterator(app_port: tuple[int, dict[str, object]]) -> None:
    port, seen = app_port

    async def parts() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([65 + i % 26]) * 1000

    pool = pool_for(port)
    r = await pool.request("PUT", "/up", [], parts(), read_timeout=5)
    expected = b"".join(bytes([65 + i % 26]) * 1000 for i in range(50))
    assert await r.read_all(10**6) == b"echo:" + expected
    headers = seen["requests"][0][2]  # type: ignore[index]
    assert (b"Transfer-Encoding", b"chunked") in headers
    assert not any(name == b"Content-Length" for name, _ in headers)
    await pool.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_streamed_response_with_backpressure(
    app_port: tuple[int, dict[str, object]], chunked: bool
) -> None:
    port, _ = app_port
    size = 8 * 1024 * 1024
    pool = pool_for(port)
    target = f"/big/{size}" + ("?chunked=1" if chunked else "")
    r = await pool.request("GET", target, [], None, read_timeout=5)
    await asyncio.sleep(0.3)  # nothing read: the socket is not read past the high-water mark
    conn = r._conn
    assert conn is not None and conn.buffered <= HIGH_WATER + 256 * 1024
    received = bytearray()
    while chunk := await r.read_chunk(100_000):
        assert len(chunk) <= 100_000
        received += chunk
    assert len(received) == size
    assert received[:512] == bytes(range(256)) * 2
    assert pool.idle_connections == 1  # read to the end: back in the pool
    await pool.close()


async def test_oversized_body_is_refused(app_port: tuple[int, dict[str, object]]) -> None:
    port, _ = app_port
    pool = pool_for(port)
    r = await pool.request("GET", "/big/5000", [], None, read_timeout=5)
    with pytest.raises(ResponseTooLarge) as caught:
        await r.read_all(4999)
    assert caught.value.sent and caught.value.kind == "oversize"
    r = await pool.request("GET", "/big/5000?chunked=1", [], None, read_timeout=5)
    with pytest.raises(ResponseTooLarge):
        await r.read_all(4999)
    assert pool.open_connections == 1  # both oversized ones were closed, not reused
    await pool.close()


async def test_the_limit_caps_open_connections(app_port: tuple[int, dict[str, object]]) -> None:
    port, seen = app_port
    pool = pool_for(port, limit=2)
    peak = 0

    async def one() -> bytes:
        nonlocal peak
        r = await pool.request("GET", "/x", [], None, read_timeout=5)
        peak = max(peak, pool.open_connections)
        await asyncio.sleep(0.01)
        return await r.read_all(100)

    assert await asyncio.gather(*(one() for _ in range(10))) == [b"echo:"] * 10
    assert peak == 2 and len(seen["peers"]) == 2  # type: ignore[arg-type]
    await pool.close()


async def test_a_body_not_read_to_the_end_closes_the_connection(
    app_port: tuple[int, dict[str, object]],
) -> None:
    port, _ = app_port
    pool = pool_for(port)
    async with await pool.request("GET", "/big/1000000", [], None, read_timeout=5) as r:
        assert len(await r.read_chunk(10)) == 10
    assert pool.open_connections == 0
    r = await pool.request("GET", "/x", [], None, read_timeout=5)
    assert await r.read_all(100) == b"echo:"
    assert pool.open_connections == 1
    await pool.close()


# --- requests refused before a byte is written


@pytest.mark.parametrize("headers, target", [
    ([("X-A", "a\r\nX-Injected: 1")], "/"),
    ([("X-A", "a\nb")], "/"),
    ([("X-A", "a\x00b")], "/"),
    ([("X A", "b")], "/"),
    ([("X-A:", "b")], "/"),
    ([], "/a b"),
    ([], "http://x/"),
    ([], "/\r\n"),
])
async def test_invalid_fields_are_refused_unsent(
    headers: list[tuple[str, str]], target: str
) -> None:
    async with ScriptedServer([OK]) as server:
        pool = pool_for(server.port)
        with pytest.raises(RequestNotSent) as caught:
            await pool.request("GET", target, headers, None)
        assert caught.value.sent is False and caught.value.kind == "not_sent"
        assert server.connections == 0
        await pool.close()


# --- strict parsing


INVALID = {
    "status line": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "short status": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "http/2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "rtsp": b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "not http": b"SSH-2.0-OpenSSH\r\n\r\n",
    "duplicate CL": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
    "CL list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nhi",
    "bad CL": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nhi",
    "CL and TE": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nhi\r\n0\r\n\r\n",
    "TE gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhi",
    "TE twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\n",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n",
    "chunk overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n",
    "chunk without CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiX0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "space in name": b"HTTP/1.1 200 OK\r\nX Y: a\r\nContent-Length: 0\r\n\r\n",
    "NUL in value": b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "oversized head": b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
    "too many headers": b"HTTP/1.1 200 OK\r\n" + b"X: a\r\n" * 300 + b"Content-Length: 0\r\n\r\n",
    "huge trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: "
                     + b"a" * 70_000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", list(INVALID))
async def test_invalid_responses_are_refused(name: str) -> None:
    async with ScriptedServer([INVALID[name]]) as server:
        pool = pool_for(server.port)
        with pytest.raises(InvalidResponse) as caught:
            r = await pool.request("GET", "/", [], None, read_timeout=5)
            await r.read_all(10**6)
        assert caught.value.sent is True and caught.value.kind == "invalid_response"
        assert pool.open_connections == 0
        await pool.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Le",
])
async def test_truncated_answers_are_resets(answer: bytes) -> None:
    async with ScriptedServer([answer]) as server:
        pool = pool_for(server.port)
        with pytest.raises(ConnectionReset) as caught:
            r = await pool.request("GET", "/", [], None, read_timeout=5)
            await r.read_all(1000)
        assert caught.value.sent is True and caught.value.kind == "reset"
        assert len(server.requests) == 1
        await pool.close()


async def test_garbage_after_the_body_poisons_the_connection() -> None:
    async with ScriptedServer([OK + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", OK]) as server:
        pool = pool_for(server.port)
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert await r.read_all(10) == b"hi"  # the answer itself is complete
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert await r.read_all(10) == b"hi"
        assert [req.connection for req in server.requests] == [1, 2]
        await pool.close()


async def test_interim_answers_are_skipped_and_101_is_final() -> None:
    answers: list[bytes | None] = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n\x00\x01raw",
        OK,
    ]
    async with ScriptedServer(answers) as server:  # type: ignore[arg-type]
        pool = pool_for(server.port)
        r = await pool.request("POST", "/", [], b"x", read_timeout=5)
        assert (r.status, r.reason, r.headers) == (201, "Created", [("Content-Length", "3")])
        assert await r.read_all(10) == b"new"
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert r.status == 101 and ("Upgrade", "x") in r.headers
        assert await r.read_all(10) == b""
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert await r.read_all(10) == b"hi"
        assert [req.connection for req in server.requests] == [1, 1, 2]
        await pool.close()


async def test_bodyless_answers_and_head() -> None:
    answers: list[bytes | None] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",  # to HEAD
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nHEAD",  # the 200's body: HEAD was not reused wrongly
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nGARBAGE",  # to HEAD, then garbage
        OK,
    ]
    async with ScriptedServer(answers) as server:  # type: ignore[arg-type]
        pool = pool_for(server.port)
        r = await pool.request("HEAD", "/", [], None, read_timeout=5)
        assert (r.status, r.content_length) == (200, 0)
        assert ("Content-Length", "1000") in r.headers and await r.read_all(10) == b""
        for status in (204, 304):
            r = await pool.request("GET", "/", [], None, read_timeout=5)
            assert r.status == status and await r.read_all(10) == b""
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert await r.read_all(10) == b"HEAD"
        r = await pool.request("HEAD", "/", [], None, read_timeout=5)
        assert r.status == 200 and await r.read_all(10) == b""
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert await r.read_all(10) == b"hi"
        assert [req.connection for req in server.requests] == [1, 1, 1, 1, 1, 2]
        await pool.close()


@pytest.mark.parametrize("answer, request_headers", [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi", []),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", []),
    (OK, [("Connection", "close")]),
])
async def test_connection_close_rules(answer: bytes, request_headers: list[tuple[str, str]]) -> None:
    async with ScriptedServer([answer, OK]) as server:
        pool = pool_for(server.port)
        r = await pool.request("GET", "/", request_headers, None, read_timeout=5)
        assert await r.read_all(10) == b"hi"
        assert pool.open_connections == 0
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert await r.read_all(10) == b"hi"
        assert [req.connection for req in server.requests] == [1, 2]
        await pool.close()


async def test_http10_keep_alive_is_reused_and_eof_bodies_end_at_close() -> None:
    answers: list[bytes | None] = [
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
    ]
    async with ScriptedServer(answers, ) as server:  # type: ignore[arg-type]
        pool = pool_for(server.port)
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert r.version == "1.0" and await r.read_all(10) == b"hi"
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert await r.read_all(100) == b"until the end"  # the server closes after its last answer
        assert [req.connection for req in server.requests] == [1, 1]
        assert pool.open_connections == 0
        await pool.close()


# --- timeouts, connect errors, stale connections


async def test_slow_headers_are_a_read_timeout() -> None:
    async def slow(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(20):
            await asyncio.sleep(0.05)
            writer.write(b"X: y\r\n")

    async with ScriptedServer([slow]) as server:
        pool = pool_for(server.port)
        with pytest.raises(ReadTimeout) as caught:
            await pool.request("GET", "/", [], None, read_timeout=0.3)
        assert caught.value.sent is True and caught.value.kind == "timeout"
        assert pool.open_connections == 0
        await pool.close()


async def test_total_timeout_covers_the_body() -> None:
    async def dribble(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            await asyncio.sleep(0.02)
            writer.write(b"x")

    async with ScriptedServer([dribble]) as server:
        pool = pool_for(server.port)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ReadTimeout):
            r = await pool.request("GET", "/", [], None, read_timeout=1, total_timeout=0.3)
            await r.read_all(1000)
        assert asyncio.get_running_loop().time() - started < 1
        await pool.close()


async def test_connect_to_a_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = pool_for(port)
    with pytest.raises(ConnectError) as caught:
        await pool.request("GET", "/", [], None, connect_timeout=2)
    assert caught.value.sent is False and caught.value.kind == "connect"
    assert pool.open_connections == 0
    await pool.close()


async def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async with ScriptedServer([OK, OK], close_after_each=True) as server:
        pool = pool_for(server.port)
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert await r.read_all(10) == b"hi"
        assert pool.idle_connections == 1  # it looked reusable
        await asyncio.sleep(0.1)  # the server closes it meanwhile
        r = await pool.request("GET", "/", [], None, read_timeout=5)
        assert await r.read_all(10) == b"hi"
        assert [req.connection for req in server.requests] == [1, 2]  # one request each
        await pool.close()


async def test_closed_after_the_request_is_a_reset_and_never_retried() -> None:
    async with ScriptedServer([None, OK]) as server:
        pool = pool_for(server.port)
        with pytest.raises(ConnectionReset) as caught:
            await pool.request("POST", "/", [], b"once", read_timeout=5)
        assert caught.value.sent is True
        await asyncio.sleep(0.05)
        assert len(server.requests) == 1 and server.connections == 1
        await pool.close()


async def test_streamed_body_with_content_length_and_mismatch() -> None:
    async def parts(*chunks: bytes) -> AsyncIterator[bytes]:
        for part in chunks:
            yield part

    async with ScriptedServer([OK, OK]) as server:
        pool = pool_for(server.port)
        r = await pool.request("PUT", "/", [("Content-Length", "6")], parts(b"abc", b"def"), read_timeout=5)
        assert await r.read_all(10) == b"hi"
        assert server.requests[0].body == b"abcdef"
        assert (b"content-length", b"6") in server.requests[0].headers
        assert not any(name == b"transfer-encoding" for name, _ in server.requests[0].headers)
        with pytest.raises(BodyMismatch):
            await pool.request("PUT", "/", [("Content-Length", "2")], parts(b"abc"), read_timeout=5)
        await pool.close()


# --- TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_with_a_private_ca_and_a_wrong_hostname(ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("upstream.test").configure_cert(server_context)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    try:
        pool = LeanPool("127.0.0.1", port, ssl=client_context, server_hostname="upstream.test", limit=2)
        r = await pool.request("GET", "/", [], None, read_timeout=5, connect_timeout=5)
        assert await r.read_all(10) == b"hi"
        await pool.close()
        wrong = LeanPool("127.0.0.1", port, ssl=client_context, server_hostname="other.test", limit=2)
        with pytest.raises(TLSError) as caught:
            await wrong.request("GET", "/", [], None, read_timeout=5, connect_timeout=5)
        assert caught.value.sent is False and caught.value.kind == "tls"
        assert wrong.open_connections == 0
        await wrong.close()
    finally:
        server.close()
        await server.wait_closed()
