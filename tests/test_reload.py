"""Reloading the config (issue 12 part 1): SIGHUP (or a watched file) switches new requests to the new
config at once; requests and batches in flight finish on the old one; unchanged upstreams keep their
pools; an invalid file changes nothing and is logged and counted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from gateway.demo.launcher import demo_config_data
from gateway.reload import reload_config
from gateway.runtime import GATEWAY, GATEWAY_REF
from tests.conftest import MakeGateway, state_of
from tests.test_shutdown import free_port, start_gateway


def config_data(
    legacy: TestServer, ledger: TestServer, tmp_path: Path, port: int | None = None
) -> dict[str, Any]:
    """The demo config; `port` None keeps the in-process gateway's (make_gateway's) listen block."""
    return demo_config_data(
        str(legacy.make_url("")).rstrip("/"), str(ledger.make_url("")).rstrip("/"),
        port=8080 if port is None else port, journal=str(tmp_path / "journal.sqlite3"),
    )


async def test_a_reload_keeps_unchanged_pools_and_pins_requests_in_flight(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    client = await make_gateway()
    app = client.app
    old = app[GATEWAY_REF].current
    data = config_data(legacy, ledger, tmp_path)
    data["routes"].append({"prefix": "/new-route", "upstream": "legacy", "strip_prefix": True})
    data["upstreams"]["ledger"]["timeouts"] = {"total": 12}  # a changed upstream gets a new pool
    path = tmp_path / "reloaded.yaml"
    path.write_text(yaml.safe_dump(data))

    slow = asyncio.ensure_future(client.get("/echo/slow?delay_ms=800"))
    while not any(c["path"].startswith("/echo/slow") for c in state_of(legacy).calls):
        await asyncio.sleep(0.02)
    assert await reload_config(app, str(path))
    new = app[GATEWAY_REF].current

    assert new is not old and new.config.upstreams["ledger"].timeouts.total == 12
    assert new.pool._sessions["legacy"] is old.pool._sessions["legacy"]  # no reconnect storm
    assert new.pool._sessions["ledger"] is not old.pool._sessions["ledger"]
    async with client.get("/new-route/echo/hello") as response:  # new requests: the new routes
        assert response.status == 200
    async with await slow as response:  # the one in flight finished on its own generation
        assert response.status == 200
    assert app[GATEWAY] is old  # what the app started with stays reachable for its cleanup


async def test_an_invalid_reload_changes_nothing(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    client = await make_gateway()
    app = client.app
    before = app[GATEWAY_REF].current
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: {legacy: {url: not-a-url}}\nroutes: []\n")
    assert not await reload_config(app, str(bad))
    data = config_data(legacy, ledger, tmp_path)
    data["listen"]["port"] += 1
    moved = tmp_path / "moved.yaml"
    moved.write_text(yaml.safe_dump(data))
    assert not await reload_config(app, str(moved))  # the socket can only change with a restart
    assert app[GATEWAY_REF].current is before
    async with client.get("/_gateway/metrics") as response:
        text = await response.text()
    assert 'gateway_config_reloads_total{result="failed"} 2.0' in text
    async with client.get("/echo/still") as response:
        assert response.status == 200


@pytest.mark.slow
async def test_sighup_adds_a_route_while_a_batch_is_in_flight_without_refusing_connections(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    data = config_data(legacy, ledger, tmp_path, port=free_port())
    process, base = await start_gateway(data, tmp_path)
    config_file = tmp_path / "gateway.yaml"
    batch = {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": "GET", "operation": "/echo/slow?delay_ms=1500"}},
        {"SingleItem": {"method": "GET", "operation": "/echo/second"}},
    ]}}
    refused = 0
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.post(f"{base}/batch/v1", json=batch))
        while not any(c["path"].startswith("/echo/slow") for c in state_of(legacy).calls):
            await asyncio.sleep(0.02)
        data["routes"].append({"prefix": "/added", "upstream": "legacy", "strip_prefix": True})
        config_file.write_text(yaml.safe_dump(data))
        process.send_signal(signal.SIGHUP)
        ends, added = time.monotonic() + 5, None
        while time.monotonic() < ends and added != 200:
            try:
                async with session.get(f"{base}/added/echo/x") as response:
                    added = response.status
            except aiohttp.ClientConnectionError:
                refused += 1
            await asyncio.sleep(0.05)
        async with await pending as response:
            answer = await response.json()
        bad = tmp_path / "gateway.yaml"
        bad.write_text("routes: [oops\n")
        process.send_signal(signal.SIGHUP)  # an invalid file: logged, and the gateway keeps serving
        await asyncio.sleep(0.5)
        async with session.get(f"{base}/added/echo/y") as response:
            still = response.status
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 20) == 0
    assert added == 200 and refused == 0
    assert [i["SingleItem"]["Result"]["status"] for i in answer["Batch"]["items"]] == [200, 200]
    assert still == 200
    events = {json.loads(line).get("event") for line in (tmp_path / "gateway.log").read_text().splitlines()
              if line.startswith("{")}
    assert {"config_reloaded", "reload_failed"} <= events


async def test_every_generation_s_sessions_are_closed_at_shutdown(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    """Two reloads that each change `ledger`, a request still running on the middle generation when
    the gateway stops (so its retirement never ran): no generation's session is left open."""
    client = await make_gateway()
    app = client.app
    sessions = [app[GATEWAY].pool._sessions["ledger"]]
    for total in (12, 13):
        data = config_data(legacy, ledger, tmp_path)
        data["upstreams"]["ledger"]["timeouts"] = {"total": total}
        path = tmp_path / f"reload-{total}.yaml"
        path.write_text(yaml.safe_dump(data))
        if total == 13:  # keep the middle generation busy through the shutdown
            held = asyncio.ensure_future(client.get("/ledger/echo/held?delay_ms=3000"))
            while not any(c["path"].startswith("/echo/held") for c in state_of(ledger).calls):
                await asyncio.sleep(0.02)
        assert await reload_config(app, str(path))
        sessions.append(app[GATEWAY_REF].current.pool._sessions["ledger"])
    await client.close()
    held.cancel()
    assert len({id(s) for s in sessions}) == 3
    assert all(session.closed for session in sessions)
