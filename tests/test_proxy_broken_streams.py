"""A proxied stream that breaks mid-body: blame the side that broke, and never fake a complete body.

A client that goes away is logged as such (not as an upstream failure); an upstream that drops the
connection mid-body leaves the client with a truncated response, not a complete one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.config import parse_config

Client = TestClient[web.Request, web.Application]


def _breaking_off(declared: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler that declares `declared` body bytes, sends 1000, then drops the connection."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = declared
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.sleep(0.05)
        if request.transport is not None:
            request.transport.close()
        return response

    return handler


_half_body = _breaking_off(1_000_000)  # streamed through
_short_body = _breaking_off(2000)  # small: read whole before it is relayed


@pytest.fixture
async def breaking_gateway(aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path) -> Client:
    upstream_app = web.Application()
    upstream_app.router.add_get("/half", _half_body)
    upstream_app.router.add_get("/half/small", _short_body)
    upstream: TestServer = await aiohttp_server(upstream_app)
    config = parse_config(
        {
            "upstreams": {"u": {"url": str(upstream.make_url("")).rstrip("/")}},
            "routes": [{"prefix": "/half", "upstream": "u"}],
            "journal": {"path": str(tmp_path / "journal.sqlite3")},
        }
    )
    client: Client = await aiohttp_client(create_app(config))
    return client


async def test_an_upstream_that_breaks_mid_body_gives_the_client_a_truncated_body(
    breaking_gateway: Client,
) -> None:
    with capture_logs() as logs:
        response = await breaking_gateway.get("/half")
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(10):  # a gateway that kept the body open would hang here
                await response.read()
        for _ in range(100):
            if any(e["event"] == "upstream_stream_broken" for e in logs):
                break
            await asyncio.sleep(0.02)
    events = [entry["event"] for entry in logs]
    assert "upstream_stream_broken" in events
    assert "request_rejected" not in events
    assert (await breaking_gateway.get("/_gateway/healthz")).status == 200


async def test_a_client_that_goes_away_mid_download_is_not_blamed_on_the_upstream(
    gateway: Client,
) -> None:
    with capture_logs() as logs:
        response = await gateway.get("/legacy/bytes/200000000")
        assert response.status == 200
        await response.content.read(65536)
        response.close()
        for _ in range(250):
            if any(e["event"] == "client_disconnected" for e in logs):
                break
            await asyncio.sleep(0.02)
    events = [entry["event"] for entry in logs]
    assert "client_disconnected" in events
    assert "request_rejected" not in events and "upstream_stream_broken" not in events
    assert (await gateway.get("/orders")).status == 200


async def test_a_small_answer_that_breaks_off_before_it_is_relayed_is_a_502(
    breaking_gateway: Client,
) -> None:
    """A small answer is read whole first: when it breaks off, nothing was sent to the client
    yet, so it gets an honest 502 problem instead of a truncated 200."""
    with capture_logs() as logs:
        async with breaking_gateway.get("/half/small") as response:
            assert response.status == 502
            assert response.content_type == "application/problem+json"
            assert "'u'" in (await response.json())["detail"]
    assert any(entry["event"] == "upstream_stream_broken" for entry in logs)
