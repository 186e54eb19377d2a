"""Whole `gateway serve` processes sharing one PostgreSQL journal (short leases): one is SIGKILLed
or SIGSTOPped while it holds an atomic batch, and another takes the batch over and rolls it back.

The upstream (a demo service in this process) counts every forward and undo call, so "exactly once"
and "no further call" are checked where they would do harm.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestServer

from gateway.demo.launcher import demo_config_data
from gateway.demo.services import FaultRule
from tests.conftest import state_of
from tests.test_shutdown import free_port, start_gateway

pytestmark = pytest.mark.slow
LEASE = 1.5
AUTH = {"Authorization": "Bearer takeover", "X-Batch-Atomic": "true"}


def replica_config(legacy: TestServer, ledger: TestServer, pg_url: str) -> dict[str, Any]:
    config = demo_config_data(
        str(legacy.make_url("")).rstrip("/"), str(ledger.make_url("")).rstrip("/"), port=free_port()
    )
    config["journal"] = {"url": pg_url, "lease_seconds": LEASE}
    return config


async def start_replica(legacy: TestServer, ledger: TestServer, pg_url: str, directory: Path) -> tuple[
    asyncio.subprocess.Process, str
]:
    directory.mkdir()
    return await start_gateway(replica_config(legacy, ledger, pg_url), directory)


def seed(legacy: TestServer) -> None:
    for n in (1, 2):
        state_of(legacy).store.create({"item": f"order {n}", "qty": n})


def batch(*items: tuple[str, str, dict[str, Any] | None]) -> dict[str, Any]:
    return {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": method, "operation": path, "body": body}} for method, path, body in items
    ]}}


def calls_with_key(server: TestServer, batch_id: str) -> list[tuple[str, str, str]]:
    """(method, path, Idempotency-Key) of every call the upstream got for this batch."""
    found = []
    for call in state_of(server).calls:
        key = dict(call["headers"]).get("Idempotency-Key", "")
        if key.startswith(f"{batch_id}."):
            found.append((call["method"], call["path"], key))
    return found


def undo_keys(server: TestServer, batch_id: str) -> list[str]:
    return sorted(key for _m, _p, key in calls_with_key(server, batch_id) if key.endswith(".undo"))


async def until_in_flight(server: TestServer, method: str, path: str) -> None:
    for _ in range(200):
        state = state_of(server)
        if state.in_flight and state.calls and (state.calls[-1]["method"], state.calls[-1]["path"]) == (
            method, path
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{method} {path} never reached the upstream")


async def looked_up(base: str, request_id: str, state: str, seconds: float = 30) -> dict[str, Any]:
    """Poll another replica's lookup (by X-Request-ID) until the batch reaches `state`."""
    found: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        for _ in range(int(seconds * 10)):
            try:
                async with session.get(f"{base}/_gateway/batches", params={"request_id": request_id},
                                       headers=AUTH) as response:
                    if response.status == 200:
                        found = await response.json()
                        if found["state"] == state:
                            return found
            except aiohttp.ClientConnectionError:  # (workers: none listening for a moment)
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"batch of {request_id} did not become {state}: {found}")


async def stop(*processes: asyncio.subprocess.Process) -> None:
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        await asyncio.wait_for(process.wait(), 30)


async def test_a_killed_replicas_batch_is_rolled_back_by_another_exactly_once(
    legacy: TestServer, ledger: TestServer, pg_url: str, tmp_path: Path
) -> None:
    seed(legacy)
    before = copy.deepcopy(state_of(legacy).store.records)
    (a, a_base), (b, b_base), (c, _c_base) = [
        await start_replica(legacy, ledger, pg_url, tmp_path / name) for name in "abc"
    ]
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/2", method="PATCH", delay_ms=500, times=1))
    document = batch(("POST", "/orders", {"item": "new"}), ("PUT", "/orders/1", {"item": "changed"}),
                     ("PATCH", "/orders/2", {"qty": 9}))
    async with aiohttp.ClientSession() as session:
        sending = asyncio.ensure_future(session.post(
            f"{a_base}/batch/v1", json=document, headers={**AUTH, "X-Request-ID": "kill-1"}
        ))
        await until_in_flight(legacy, "PATCH", "/orders/2")
        a.kill()  # SIGKILL while the batch holds three changes, the last one in flight
        with pytest.raises(aiohttp.ClientError):
            await sending
    await a.wait()
    found = await looked_up(b_base, "kill-1", "rolled_back")
    batch_id = found["batch_id"]
    assert state_of(legacy).store.records == before  # every change undone
    assert undo_keys(legacy, batch_id) == [f"{batch_id}.{n}.undo" for n in range(3)]  # each once
    restarted, _ = await start_replica(legacy, ledger, pg_url, tmp_path / "a2")  # the killed one is back
    await asyncio.sleep(3 * LEASE)  # several takeover rounds on every replica
    assert undo_keys(legacy, batch_id) == [f"{batch_id}.{n}.undo" for n in range(3)]  # not twice
    assert state_of(legacy).store.records == before
    logs = "".join((tmp_path / name / "gateway.log").read_text() for name in ("b", "c"))
    assert logs.count("batches_taken_over") == 1  # one replica claimed it
    await stop(b, c, restarted)


async def test_a_paused_replica_sends_nothing_more_for_a_batch_taken_over_and_reports_it_lost(
    legacy: TestServer, ledger: TestServer, pg_url: str, tmp_path: Path
) -> None:
    seed(legacy)
    before = copy.deepcopy(state_of(legacy).store.records)
    (a, a_base), (b, b_base) = [await start_replica(legacy, ledger, pg_url, tmp_path / name) for name in "ab"]
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/1", method="PUT", delay_ms=300, times=1))
    document = batch(("PUT", "/orders/1", {"item": "changed"}), ("PATCH", "/orders/2", {"qty": 9}))
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sending = asyncio.ensure_future(session.post(
            f"{a_base}/batch/v1", json=document, headers={**AUTH, "X-Request-ID": "stop-1"}
        ))
        await until_in_flight(legacy, "PUT", "/orders/1")
        os.kill(a.pid, signal.SIGSTOP)  # paused (GC, VM freeze) with its PUT in flight
        try:
            found = await looked_up(b_base, "stop-1", "rolled_back")
            batch_id = found["batch_id"]
            assert state_of(legacy).store.records == before
        finally:
            os.kill(a.pid, signal.SIGCONT)
        response = await sending
        problem = await response.json(content_type=None)
        assert response.status == 503, problem
        assert problem["type"].endswith("batch-lost") and response.headers["X-Batch-Id"] == batch_id
        await asyncio.sleep(1.0)
        assert calls_with_key(legacy, batch_id) == [  # B's undo, and nothing more from A
            ("PUT", "/orders/1", f"{batch_id}.0"), ("PUT", "/orders/1", f"{batch_id}.0.undo"),
        ]
        assert state_of(legacy).store.records == before
        assert '"batch_lost"' in (tmp_path / "a" / "gateway.log").read_text()
        async with session.post(f"{a_base}/batch/v1", json=batch(("PUT", "/orders/1", {"item": "again"})),
                                headers=AUTH) as again:  # new batches go on under a new epoch
            assert again.status == 200 and (await again.json())["atomic"]["outcome"] == "committed"
    await stop(a, b)


async def test_a_dead_workers_batch_is_recovered_at_once_not_after_its_lease(
    legacy: TestServer, ledger: TestServer, pg_url: str, tmp_path: Path
) -> None:
    """`listen.workers: 2`: each worker is an instance of its own; the supervisor ends a dead
    worker's lease as it sees it die, so its batch is rolled back long before the lease would end."""
    seed(legacy)
    before = copy.deepcopy(state_of(legacy).store.records)
    config = replica_config(legacy, ledger, pg_url)
    config["journal"]["lease_seconds"] = 60
    config["listen"]["workers"] = 2
    supervisor, base = await start_gateway(config, tmp_path)
    for _ in range(200):  # both workers listening, so one is left when the other is killed
        if (tmp_path / "gateway.log").read_text().count('"event":"listening"') == 2:
            break
        await asyncio.sleep(0.05)
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/2", method="PATCH", delay_ms=300, times=1))
    document = batch(("PUT", "/orders/1", {"item": "changed"}), ("PATCH", "/orders/2", {"qty": 9}))
    async with aiohttp.ClientSession() as session:
        sending = asyncio.ensure_future(session.post(
            f"{base}/batch/v1", json=document, headers={**AUTH, "X-Request-ID": "worker-1"}
        ))
        await until_in_flight(legacy, "PATCH", "/orders/2")
        legacy_port = legacy.port
        holders = [
            child for child in psutil.Process(supervisor.pid).children()
            if any(c.raddr and c.raddr.port == legacy_port for c in child.net_connections(kind="tcp"))
        ]
        assert len(holders) == 1
        holders[0].kill()
        with pytest.raises(aiohttp.ClientError):
            await sending
    started = time.monotonic()
    found = await looked_up(base, "worker-1", "rolled_back", seconds=20)
    assert time.monotonic() - started < 20 < config["journal"]["lease_seconds"]
    assert state_of(legacy).store.records == before
    assert undo_keys(legacy, found["batch_id"]) == [f"{found['batch_id']}.{n}.undo" for n in range(2)]
    await stop(supervisor)
