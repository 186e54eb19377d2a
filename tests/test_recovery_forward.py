"""Recovery past the commit point, and transactions that end on their own (issue 18).

A journal is written the way the coordinator writes it, up to the commit decision; the demo
`ledger` holds a real open transaction (begun over HTTP). Recovery then decides from the recorded
phase: re-send the commit (roll forward), or, when an idempotent upstream says the commit never
landed, roll the rest back; without idempotency keys an ambiguous refusal is left to an operator.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.atomicity.journal import SqliteJournal
from gateway.atomicity.plan import UndoKind, UndoSpec
from gateway.atomicity.recovery import with_recovery
from gateway.atomicity.state import BatchState
from gateway.atomicity.tx_calls import lifetime
from gateway.config import GatewayConfig
from gateway.demo.services import FaultRule
from gateway.runtime import GATEWAY
from tests.conftest import MakeConfig, MakeGateway, state_of

BATCH = "bforward00000000000000001"


async def begin_on(ledger: TestServer) -> str:
    async with aiohttp.ClientSession() as session, session.post(ledger.make_url("/tx")) as response:
        token: str = (await response.json())["token"]
    async with aiohttp.ClientSession() as session:
        await session.post(
            ledger.make_url("/accounts"), json={"owner": "staged"}, headers={"X-Transaction-Token": token}
        )
    return token


async def journal_up_to_commit(
    config: GatewayConfig, legacy: TestServer, token: str, *, tx_state: str = "open"
) -> None:
    """A batch that created /orders/1 on legacy (compensation) and staged an account in a ledger
    transaction, journaled as the coordinator does up to `committing`."""
    journal = SqliteJournal(config.journal.path)
    await journal.open()
    try:
        await journal.batch_state(BATCH, BatchState.PLANNED, "2 calls", headers=[["X-Tenant", "t1"]])
        await journal.batch_state(BATCH, BatchState.RUNNING)
        intent: dict[str, Any] = {
            "where": "/Batch/items/0/SingleItem", "upstream": "legacy", "method": "POST",
            "url": str(legacy.make_url("/orders")), "path": "/orders", "scope": "/orders",
            "headers": [], "body_b64": "", "undo": UndoSpec(kind=UndoKind.DELETE_CREATED).to_json(),
        }
        await journal.step_intent(BATCH, 0, intent)
        outcome = {"status": 201, "headers": [["Location", "/orders/1"]], "body_b64": ""}
        await journal.step_outcome(BATCH, 0, "done", outcome, 1)
        await journal.tx_state(BATCH, "ledger", "beginning", headers=[])
        await journal.tx_state(BATCH, "ledger", tx_state, token=token)
        await journal.batch_state(BATCH, BatchState.COMMITTING)
    finally:
        await journal.close()


async def final_state(config: GatewayConfig) -> tuple[BatchState, str]:
    journal = SqliteJournal(config.journal.path)
    await journal.open()
    try:
        batch = await journal.batch(BATCH)
    finally:
        await journal.close()
    assert batch is not None
    return batch.state, batch.detail or ""


async def test_a_batch_journaled_committing_is_rolled_forward(
    make_config: MakeConfig, legacy: TestServer, ledger: TestServer
) -> None:
    config = make_config()
    state_of(legacy).store.create({"item": "made by the batch"})
    token = await begin_on(ledger)
    await journal_up_to_commit(config, legacy, token)

    report = await with_recovery(config)

    assert report.outcomes == {BATCH: BatchState.COMMITTED} and report.clean
    assert state_of(ledger).transactions == {}
    assert [r["owner"] for r in state_of(ledger).store.records.values()] == ["staged"]
    assert "1" in state_of(legacy).store.records  # the compensated create is kept, not undone
    [commit] = [c for c in state_of(ledger).calls if c["path"].endswith("/commit")]
    assert dict(commit["headers"])["Idempotency-Key"] == f"{BATCH}.tx.ledger.commit"
    assert (await final_state(config))[0] is BatchState.COMMITTED


async def test_a_commit_an_idempotent_upstream_refuses_never_landed_so_the_rest_rolls_back(
    make_config: MakeConfig, legacy: TestServer, ledger: TestServer
) -> None:
    config = make_config({"upstreams": {"ledger": {"idempotency_keys": True}}})
    state_of(legacy).store.create({"item": "made by the batch"})
    await journal_up_to_commit(config, legacy, "expired-token")  # the ledger knows no such tx

    report = await with_recovery(config)

    assert report.outcomes == {BATCH: BatchState.ROLLED_BACK}, report.needs_operator
    assert state_of(legacy).store.records == {}  # the create was undone
    deletes = [c for c in state_of(legacy).calls if c["method"] == "DELETE"]
    assert [c["path"] for c in deletes] == ["/orders/1"]


async def test_without_idempotency_keys_an_ambiguous_commit_is_left_to_an_operator(
    make_config: MakeConfig, legacy: TestServer, ledger: TestServer
) -> None:
    """The commit may have landed before the crash (the transaction is gone either way): undoing
    the create could make the batch partial, so nothing is undone and the batch is flagged."""
    config = make_config()
    state_of(legacy).store.create({"item": "made by the batch"})
    await journal_up_to_commit(config, legacy, "gone-token")

    report = await with_recovery(config)

    assert report.outcomes == {BATCH: BatchState.ROLLBACK_INCOMPLETE}
    assert "may or may not have landed" in report.needs_operator[BATCH]
    assert "1" in state_of(legacy).store.records
    assert not [c for c in state_of(legacy).calls if c["method"] == "DELETE"]


@pytest.mark.parametrize("where", ["body", "query"])
async def test_the_begin_carries_the_transaction_lifetime_and_the_demo_ledger_expires_it(
    make_gateway: MakeGateway, ledger: TestServer, where: str
) -> None:
    begin: dict[str, Any] = (
        {"method": "POST", "path": "/tx", "body": {"timeout": "{timeout}"}} if where == "body"
        else {"method": "POST", "path": "/tx?timeout={timeout}"}
    )
    overrides = {"upstreams": {"ledger": {"transactions": {"begin": begin, "lifetime": 0.5}}}}
    client = await make_gateway(overrides)
    assert lifetime(client.app[GATEWAY].config, "ledger") == 1  # whole seconds, rounded up
    state_of(ledger).faults.append(FaultRule(path_prefix="/accounts", method="POST", delay_ms=1500, times=1))
    document = {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": "POST", "operation": "/accounts", "body": {"owner": "x"}}},
    ]}}
    async with client.post("/batch/v1", json=document, headers={"X-Batch-Atomic": "true"}) as response:
        answer = await response.json()
    [begin_call] = [c for c in state_of(ledger).calls if c["path"].split("?")[0] == "/tx"]
    if where == "query":
        assert begin_call["path"] == "/tx?timeout=1"
    # the transaction ended on its own while the call was held: the commit finds nothing
    assert answer["atomic"]["outcome"] != "committed"
    await asyncio.sleep(0)
    assert state_of(ledger).transactions == {}



async def test_before_the_commit_point_a_transaction_the_upstream_no_longer_knows_has_ended(
    make_config: MakeConfig, legacy: TestServer, ledger: TestServer
) -> None:
    """The batch never reached `committing`, so no commit was ever sent for its open transaction:
    a rollback answered 404 (it was rolled back before the crash, or expired) leaves nothing."""
    config = make_config()
    journal = SqliteJournal(config.journal.path)
    await journal.open()
    try:
        await journal.batch_state(BATCH, BatchState.PLANNED, "1 call", headers=[])
        await journal.batch_state(BATCH, BatchState.RUNNING)
        await journal.tx_state(BATCH, "ledger", "beginning", headers=[])
        await journal.tx_state(BATCH, "ledger", "open", token="already-rolled-back")
    finally:
        await journal.close()

    report = await with_recovery(config)

    assert report.outcomes == {BATCH: BatchState.ROLLED_BACK} and report.clean
    assert {c["path"] for c in state_of(ledger).calls} == {"/tx/already-rolled-back/rollback"}
