"""SIGTERM: the gateway stops accepting, lets an in-flight batch finish, then exits 0.

The gateway runs as a real subprocess; the upstream is an in-process demo server.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp.test_utils import TestServer

from gateway.demo.launcher import demo_config_data
from tests.conftest import state_of


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


STARTED: list[asyncio.subprocess.Process] = []
"""Every gateway process start_gateway made; tests/conftest.py kills what a test left running."""


async def start_gateway(config: dict[str, Any], tmp_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    with (tmp_path / "gateway.log").open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--log-json", "serve", "--config", str(path),
            stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )
    STARTED.append(process)
    base = f"http://127.0.0.1:{config['listen']['port']}"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"{base}/_gateway/readyz") as response:
                    if response.status == 200:
                        return process, base
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    process.kill()
    raise AssertionError("gateway did not become ready")


async def test_sigterm_lets_an_in_flight_batch_finish_then_exits(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    config = demo_config_data(
        str(legacy.make_url("")).rstrip("/"), str(ledger.make_url("")).rstrip("/"),
        port=free_port(), journal=str(tmp_path / "journal.sqlite3"),
    )
    config["shutdown_grace"] = 10
    process, base = await start_gateway(config, tmp_path)
    batch = {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": "GET", "operation": "/echo/slow?delay_ms=1500"}},
        {"SingleItem": {"method": "POST", "operation": "/orders", "body": {"item": "late"}}},
    ]}}
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.post(f"{base}/batch/v1", json=batch))
        while not any(call["path"].startswith("/echo/slow") for call in state_of(legacy).calls):
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with_refusal: int | str | None = None
        try:
            async with session.get(f"{base}/_gateway/healthz") as response:
                with_refusal = response.status
        except aiohttp.ClientConnectionError:
            with_refusal = "refused"
        response = await pending
        body = await response.json()
        response.release()
    assert await asyncio.wait_for(process.wait(), 15) == 0
    assert with_refusal == "refused"
    statuses = [item["SingleItem"]["Result"]["status"] for item in body["Batch"]["items"]]
    assert statuses == [200, 201]
    assert [r["item"] for r in state_of(legacy).store.records.values()] == ["late"]
