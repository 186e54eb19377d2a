"""Gateways sharing a PostgreSQL journal, in one process: lookups and operator commands from any
replica, a batch fenced off mid-flight, and PostgreSQL going away and coming back.

The subprocess scenarios (SIGKILL, SIGSTOP of whole gateways) are in tests/test_pg_takeover.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import operator_commands
from gateway.atomicity.pg_journal import PostgresJournal
from gateway.atomicity.recovery import with_recovery
from gateway.demo.services import FaultRule
from gateway.runtime import GATEWAY
from tests.conftest import MakeConfig, MakeGateway, state_of
from tests.pg_cluster import running_cluster

Client = TestClient[web.Request, web.Application]
AUTH = {"Authorization": "Bearer replica-test", "X-Batch-Atomic": "true"}


@pytest.fixture
def journal_kind() -> str:
    return "postgres"


def batch(*items: tuple[str, str, dict[str, Any] | None]) -> dict[str, Any]:
    return {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": method, "operation": path, "body": body}} for method, path, body in items
    ]}}


def seed(legacy: TestServer) -> None:
    for n in (1, 2):
        state_of(legacy).store.create({"item": f"order {n}", "qty": n})


def calls(server: TestServer, method: str, path: str) -> list[dict[str, Any]]:
    return [c for c in state_of(server).calls if c["method"] == method and c["path"] == path]


def undo_calls(server: TestServer) -> list[str]:
    keys = [dict(c["headers"]).get("Idempotency-Key", "") for c in state_of(server).calls]
    return [key for key in keys if key.endswith(".undo")]


def journal_of(client: Client) -> PostgresJournal:
    journal = client.app[GATEWAY].batches.journal
    assert isinstance(journal, PostgresJournal)
    return journal


async def test_any_replica_looks_a_batch_up_and_lists_it_for_operators(
    make_gateway: MakeGateway, make_config: MakeConfig, legacy: TestServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(legacy)
    first, second = await make_gateway(), await make_gateway()
    document = batch(("PUT", "/orders/1", {"item": "x"}), ("PATCH", "/orders/404", {"qty": 1}))
    async with first.post("/batch/v1", json=document, headers=AUTH) as response:
        assert response.status == 200
        batch_id = (await response.json())["batch_id"]
    async with second.get(f"/_gateway/batches/{batch_id}", headers=AUTH) as response:
        assert response.status == 200
        found = await response.json()
    assert found["state"] == "rolled_back" and found["items"][0]["rollback"] == "rolled_back"
    other_owner = {"Authorization": "Bearer other"}
    async with second.get(f"/_gateway/batches/{batch_id}", headers=other_owner) as other:
        assert other.status == 404
    assert await operator_commands.show(make_config(), batch_id) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("{\n"):])  # after any log lines
    assert shown["state"] == "rolled_back"
    assert "replica-test" not in out  # the credentials were erased when it settled
    assert await operator_commands.list_batches(make_config(), everything=False) == 0  # none stuck


async def test_a_batch_whose_lease_lapses_mid_flight_is_stopped_and_taken_over_once(
    make_gateway: MakeGateway, make_config: MakeConfig, legacy: TestServer, pg_url: str,
) -> None:
    seed(legacy)
    client = await make_gateway()
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/1", method="PUT", delay_ms=800, times=1))
    document = batch(("PUT", "/orders/1", {"item": "changed"}), ("PATCH", "/orders/2", {"qty": 9}))
    sending = asyncio.ensure_future(client.post("/batch/v1", json=document, headers=AUTH))
    for _ in range(100):
        if state_of(legacy).in_flight:
            break
        await asyncio.sleep(0.02)
    conn = await asyncpg.connect(pg_url, server_settings={"search_path": "gateway"})
    try:  # the instance's lease ends while its PUT is in flight (as a pause past the lease would)
        await conn.execute("UPDATE instances SET lease_until = now() - interval '1 second' WHERE epoch = $1",
                           journal_of(client).lease.epoch)
    finally:
        await conn.close()
    response = await sending
    problem = await response.json(content_type=None)
    assert response.status == 503, problem
    assert problem["type"].endswith("batch-lost") and "taken over" in problem["detail"]
    batch_id = response.headers["X-Batch-Id"]
    assert calls(legacy, "PATCH", "/orders/2") == []  # no further forward call
    assert undo_calls(legacy) == []  # and no rollback from the instance that lost it
    assert state_of(legacy).store.records["1"]["item"] == "changed"
    report = await with_recovery(make_config())  # another instance: takes it over, rolls it back
    for _ in range(50):  # (or this gateway's own takeover loop did, now that its run ended)
        async with client.get(f"/_gateway/batches/{batch_id}", headers=AUTH) as looked:
            if (await looked.json())["state"] == "rolled_back":
                break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"not rolled back: {report}")
    assert state_of(legacy).store.records["1"]["item"] == "order 1"
    assert undo_calls(legacy) == [f"{batch_id}.0.undo"]  # exactly once


async def test_without_postgres_atomic_batches_answer_503_before_any_call_and_the_rest_works(
    make_gateway: MakeGateway, legacy: TestServer,
) -> None:
    seed(legacy)
    with running_cluster() as cluster:  # its own server: this test stops it
        client = await make_gateway({"journal": {"url": cluster.create_database()}})
        document = batch(("PUT", "/orders/1", {"item": "changed"}))
        cluster.stop()
        state_of(legacy).calls.clear()
        async with client.post("/batch/v1", json=document, headers=AUTH) as response:
            assert response.status == 503
            assert (await response.json())["type"].endswith("journal-unavailable")
        assert state_of(legacy).calls == []  # nothing was called
        async with client.post("/batch/v1", json=document) as plain:
            assert plain.status == 200
        async with client.get("/orders/1") as proxied:
            assert proxied.status == 200 and (await proxied.json())["item"] == "changed"
        async with client.get("/_gateway/readyz") as ready:
            assert ready.status == 503 and (await ready.json())["journal"] == "unusable"
        cluster.start()
        for _ in range(50):  # the pool reconnects on its own
            async with client.post("/batch/v1", json=document, headers=AUTH) as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.2)
        assert response.status == 200
        async with client.get("/_gateway/readyz") as ready:
            assert ready.status == 200
