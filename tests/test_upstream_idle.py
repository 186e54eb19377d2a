"""`upstreams.<n>.timeouts.idle`: a kept-alive upstream connection unused this long is closed by
the gateway (so it is the gateway, not the upstream, that closes first), with either client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import parse_config

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def counting_upstream(aiohttp_server: Any) -> tuple[TestServer, set[int]]:
    peers: set[int] = set()

    async def answer(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        peers.add(peer[1] if peer else 0)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    server: TestServer = await aiohttp_server(app)
    return server, peers


@pytest.mark.parametrize("client", ["lean", "aiohttp"])
@pytest.mark.parametrize(("idle", "connections"), [(0.2, 2), (30.0, 1)])
async def test_an_idle_upstream_connection_is_closed_after_timeouts_idle(
    aiohttp_client: Any, counting_upstream: tuple[TestServer, set[int]], tmp_path: Path,
    client: str, idle: float, connections: int,
) -> None:
    server, peers = counting_upstream
    config = parse_config({
        "upstreams": {"u": {"url": str(server.make_url("")).rstrip("/"), "client": client,
                            "timeouts": {"idle": idle}}},
        "routes": [{"prefix": "/x", "upstream": "u"}],
        "journal": {"path": str(tmp_path / "journal.sqlite3")},
    })
    gateway: Client = await aiohttp_client(create_app(config))
    for pause in (1.0, 0.0):
        async with gateway.get("/x/1") as response:
            assert response.status == 200
        await asyncio.sleep(pause)
    assert len(peers) == connections
