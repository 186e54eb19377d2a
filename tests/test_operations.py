"""Operations (issue 12): a shutdown that keeps its deadline, and a supervisor whose workers never
outlive it and are replaced (after their unfinished batches are recovered) when they die.

The gateway runs as real processes; upstreams are in-process demo servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestServer

from gateway.atomicity.journal import SqliteJournal
from gateway.atomicity.state import BatchState
from gateway.demo.launcher import demo_config_data
from gateway.demo.services import FaultRule
from tests.conftest import state_of
from tests.test_shutdown import free_port, start_gateway
from tests.test_workers import wait_for_workers

pytestmark = pytest.mark.slow


def config_for(legacy: TestServer, ledger: TestServer, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    config = demo_config_data(
        str(legacy.make_url("")).rstrip("/"), str(ledger.make_url("")).rstrip("/"),
        port=free_port(), journal=str(tmp_path / "journal.sqlite3"),
    )
    config.update(extra)
    return config


ATOMIC_HELD = {"Batch": {"batch_execution_type": "Serial", "items": [
    {"SingleItem": {"method": "POST", "operation": "/orders", "body": {"item": "first"}}},
    {"SingleItem": {"method": "PUT", "operation": "/orders/77", "body": {"item": "held"}}},
]}}


async def test_a_shutdown_with_a_long_request_in_flight_ends_within_the_grace(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    """shutdown_grace 5 and a 20 s request: the process is gone within 6 s (it was ~3 x grace)."""
    process, base = await start_gateway(config_for(legacy, ledger, tmp_path, shutdown_grace=5), tmp_path)
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(session.get(f"{base}/echo/slow?delay_ms=20000"))
        while not any(c["path"].startswith("/echo/slow") for c in state_of(legacy).calls):
            await asyncio.sleep(0.02)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 15)
        took = time.monotonic() - started
        slow.cancel()
    assert took < 6.0, f"shutdown took {took:.1f} s"


async def test_an_atomic_batch_still_running_at_the_deadline_is_answered_with_its_id(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    """The client gets 503 naming the batch (and X-Batch-Id) instead of an empty reply; the next
    start-up's recovery finishes the batch from the journal."""
    state_of(legacy).store.create({"item": "seventy-seven"})  # id 1
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/77", method="PUT", delay_ms=30_000))
    config = config_for(legacy, ledger, tmp_path, shutdown_grace=3)
    process, base = await start_gateway(config, tmp_path)
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(
            session.post(f"{base}/batch/v1", json=ATOMIC_HELD, headers={"X-Batch-Atomic": "true"})
        )
        while not any(c["path"] == "/orders/77" and c["method"] == "PUT" for c in state_of(legacy).calls):
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        response = await asyncio.wait_for(pending, 10)
        problem = await response.json(content_type=None)
        batch_id = response.headers.get("X-Batch-Id")
        response.release()
    await asyncio.wait_for(process.wait(), 10)
    assert response.status == 503 and problem["type"].endswith("shutting-down")
    assert batch_id is not None and batch_id in problem["detail"]
    state_of(legacy).faults.clear()
    restarted, _ = await start_gateway(config, tmp_path)  # start-up recovery rolls it back
    restarted.send_signal(signal.SIGTERM)
    await asyncio.wait_for(restarted.wait(), 10)
    journal = SqliteJournal(config["journal"]["path"])
    await journal.open()
    try:
        batch = await journal.batch(batch_id)
    finally:
        await journal.close()
    assert batch is not None and batch.state is BatchState.ROLLED_BACK
    assert [r["item"] for r in state_of(legacy).store.records.values()] == ["seventy-seven"]


async def test_readiness_fails_at_once_while_the_listener_drains(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    config = config_for(legacy, ledger, tmp_path, drain_delay=1.5, shutdown_grace=2)
    process, base = await start_gateway(config, tmp_path)
    process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/_gateway/readyz") as response:
            ready_status = response.status
        async with session.get(f"{base}/echo/still-served") as response:
            served = response.status
    started = time.monotonic()
    await asyncio.wait_for(process.wait(), 10)
    assert ready_status == 503  # out of rotation
    assert served == 200  # but the listener still answers during the drain delay
    assert time.monotonic() - started < 1.5 + 2 + 1


# --- the supervisor ------------------------------------------------------------------------------


async def test_workers_never_outlive_a_killed_supervisor(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    config = config_for(legacy, ledger, tmp_path)
    config["listen"]["workers"] = 2
    process, _ = await start_gateway(config, tmp_path)
    workers = await wait_for_workers(process.pid, 2)
    process.send_signal(signal.SIGKILL)
    await asyncio.wait_for(process.wait(), 10)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "a worker outlived its supervisor"


async def test_sighup_with_workers_keeps_them_under_the_supervisor(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    config = config_for(legacy, ledger, tmp_path)
    config["listen"]["workers"] = 2
    process, base = await start_gateway(config, tmp_path)
    workers = await wait_for_workers(process.pid, 2)
    process.send_signal(signal.SIGHUP)
    await asyncio.sleep(1.0)
    assert process.returncode is None
    assert sorted(w.pid for w in psutil.Process(process.pid).children()) == sorted(w.pid for w in workers)
    async with aiohttp.ClientSession() as session, session.get(f"{base}/echo/after-hup") as response:
        assert response.status == 200
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 20) == 0
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive


async def test_a_worker_killed_mid_batch_is_replaced_after_its_batch_is_recovered(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    state_of(legacy).store.create({"item": "seventy-seven"})
    held = FaultRule(path_prefix="/orders/77", method="PUT", delay_ms=30_000, times=1)
    state_of(legacy).faults.append(held)
    config = config_for(legacy, ledger, tmp_path)
    config["listen"]["workers"] = 2
    process, base = await start_gateway(config, tmp_path)
    workers = await wait_for_workers(process.pid, 2)
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(
            session.post(f"{base}/batch/v1", json=ATOMIC_HELD, headers={"X-Batch-Atomic": "true"})
        )
        while not any(c["path"] == "/orders/77" and c["method"] == "PUT" for c in state_of(legacy).calls):
            await asyncio.sleep(0.02)
        busy = next(w for w in workers if any(  # the worker holding the call to the upstream
            c.raddr and c.raddr.port == legacy.port for c in w.net_connections(kind="tcp")
        ))
        os.kill(busy.pid, signal.SIGKILL)
        with contextlib.suppress(aiohttp.ClientError):
            await asyncio.wait_for(pending, 10)
        # the other worker keeps serving; the dead one is replaced within the restart backoff
        for _ in range(100):
            children = psutil.Process(process.pid).children()
            if len(children) == 2 and busy.pid not in {c.pid for c in children}:
                break
            await asyncio.sleep(0.1)
        async with session.get(f"{base}/echo/after") as response:
            assert response.status == 200
    assert len(psutil.Process(process.pid).children()) == 2
    # the dead worker's batch was rolled back before it was replaced: the created order is gone
    assert [r["item"] for r in state_of(legacy).store.records.values()] == ["seventy-seven"]
    assert process.returncode is None
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 20) == 0
