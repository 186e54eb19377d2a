"""Cheap connections cannot pin an upstream's pool (issue 10 finding 2).

Raw sockets play the attackers (a client library would send the body it promised): requests with
`Expect: 100-continue` that never send their body, and uploads dribbling a byte every 2 s. Small
bodies are read whole before an upstream connection is taken, `Expect` is never forwarded, a full
pool answers 503 quickly, and a stalled body answers 408.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestServer

from tests.conftest import MakeGateway, state_of


async def open_raw(port: int, head: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode())
    await writer.drain()
    return reader, writer


def request_head(method: str, path: str, *extra: str) -> str:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: gateway", *extra, "", ""])


async def dribble(writer: asyncio.StreamWriter, every: float, count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(every)
        writer.write(b"x")
        await writer.drain()


async def test_expect_and_slow_uploads_do_not_delay_a_normal_request(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    """100 `Expect: 100-continue` requests that never send their body plus 60 uploads sending a
    byte every 2 s (on a pool of 100 connections): a normal GET still answers within 1 s."""
    client = await make_gateway({"proxy": {"body_timeout": 30}})
    port = client.port
    assert port is not None
    sockets = []
    for _ in range(100):
        sockets.append(await open_raw(port, request_head(
            "POST", "/echo/expect", "Content-Length: 10", "Expect: 100-continue")))
    dribblers = []
    for _ in range(60):
        reader, writer = await open_raw(port, request_head("POST", "/echo/slow", "Content-Length: 100"))
        sockets.append((reader, writer))
        dribblers.append(asyncio.create_task(dribble(writer, 2.0, 3)))
    await asyncio.sleep(0.5)  # all 160 are in the gateway, waiting for their bodies

    started = time.monotonic()
    async with client.get("/echo/normal") as response:
        assert response.status == 200
    took = time.monotonic() - started

    assert took < 1.0, f"a normal GET took {took:.2f} s"
    paths = [call["path"] for call in state_of(legacy).calls]
    assert "/echo/expect" not in paths and "/echo/slow" not in paths  # no upstream call was made
    expect_reader, _ = sockets[0]
    interim = await asyncio.wait_for(expect_reader.readline(), 1)
    assert interim == b"HTTP/1.1 100 Continue\r\n"  # the gateway answered Expect itself
    for task in dribblers:
        task.cancel()
    for _, writer in sockets:
        writer.close()


async def test_expect_is_answered_by_the_gateway_and_never_forwarded(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    client = await make_gateway()
    port = client.port
    assert port is not None
    reader, writer = await open_raw(port, request_head(
        "POST", "/echo/e", "Content-Length: 5", "Expect: 100-continue", "Content-Type: text/plain"))
    assert await asyncio.wait_for(reader.readline(), 2) == b"HTTP/1.1 100 Continue\r\n"
    await reader.readline()
    writer.write(b"hello")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200")
    [call] = [c for c in state_of(legacy).calls if c["path"] == "/echo/e"]
    assert "expect" not in {name.lower() for name, _ in call["headers"]}


async def test_a_body_that_never_arrives_answers_408_without_an_upstream_call(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    client = await make_gateway({"proxy": {"body_timeout": 0.5}})
    port = client.port
    assert port is not None
    reader, writer = await open_raw(port, request_head("PUT", "/echo/late", "Content-Length: 50"))
    writer.write(b"only part")
    started = time.monotonic()
    status = await asyncio.wait_for(reader.readline(), 5)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 408"), status
    assert b"application/problem+json" in head
    assert 0.4 < time.monotonic() - started < 3
    assert not [c for c in state_of(legacy).calls if c["path"] == "/echo/late"]


async def test_a_streamed_body_that_stalls_is_abandoned_with_408(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    """A body over proxy.buffer_bytes streams to the upstream; a pause over body_idle_timeout
    ends the call (the upstream connection is dropped, not left waiting)."""
    client = await make_gateway({"proxy": {"buffer_bytes": 1024, "body_idle_timeout": 0.5}})
    port = client.port
    assert port is not None
    reader, writer = await open_raw(port, request_head("POST", "/legacy/upload", "Content-Length: 100000"))
    writer.write(b"y" * 5000)
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 408"), status


async def test_a_full_pool_answers_503_quickly(make_gateway: MakeGateway, legacy: TestServer) -> None:
    client = await make_gateway({"upstreams": {"legacy": {"pool_size": 2, "timeouts": {"pool": 0.3}}}})
    held = [asyncio.create_task(client.get("/echo/hold?delay_ms=1500")) for _ in range(2)]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    async with client.get("/echo/third") as response:
        problem = await response.json()
        status = response.status
    took = time.monotonic() - started
    for task in held:
        (await task).release()
    assert status == 503 and problem["type"].endswith("upstream-busy"), problem
    assert "pool_size 2" in problem["detail"]
    assert took < 1.0

