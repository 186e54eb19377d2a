"""`listen.workers: N`: a supervisor recovers once, then N processes serve one port (SO_REUSEPORT).

SIGTERM stops them all cleanly. (A worker that dies is replaced: tests/test_operations.py.)
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp.test_utils import TestServer

from gateway.demo.launcher import demo_config_data
from tests.test_shutdown import free_port, start_gateway


def config_with_workers(legacy: TestServer, ledger: TestServer, tmp_path: Path) -> dict[str, Any]:
    config = demo_config_data(
        str(legacy.make_url("")).rstrip("/"), str(ledger.make_url("")).rstrip("/"),
        port=free_port(), journal=str(tmp_path / "journal.sqlite3"),
    )
    config["listen"]["workers"] = 2
    return config


async def wait_for_workers(pid: int, count: int) -> list[psutil.Process]:
    for _ in range(100):
        children: list[psutil.Process] = psutil.Process(pid).children()
        if len(children) == count:
            return children
        await asyncio.sleep(0.1)
    raise AssertionError("workers did not start")


async def test_two_workers_serve_one_port_and_stop_on_sigterm(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    process, base = await start_gateway(config_with_workers(legacy, ledger, tmp_path), tmp_path)
    workers = await wait_for_workers(process.pid, 2)
    async with aiohttp.ClientSession() as session:
        for index in range(20):
            async with session.post(f"{base}/orders", json={"n": index}) as response:
                assert response.status == 201
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 20) == 0
    assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
