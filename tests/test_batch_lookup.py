"""`GET /_gateway/batches/{id}`: an atomic batch's outcome and per-call rollback status, for its owner.

Real loopback upstreams and gateway (conftest). The owner is the HMAC of the `Authorization` the
batch was sent with; anything else (other credentials, none, unknown or pruned id) is one 404.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from gateway.atomicity.journal import SqliteJournal
from gateway.atomicity.state import BatchState
from gateway.demo.services import FaultRule
from gateway.runtime import GATEWAY
from tests.conftest import MakeGateway, deep_merge, state_of
from tests.test_atomic_fault_matrix import (
    ATOMIC,
    FAST_ROLLBACK,
    LEGACY_CALLS,
    SPANNING_CALLS,
    Call,
    fault_rule,
    json_document,
    records,
    seed,
    send_multipart,
)
from tests.test_journal_hardening import assert_in_no_journal_file, journal_path, received, until

Client = TestClient[web.Request, web.Application]
LOOKUP = "/_gateway/batches/"


def credentials() -> dict[str, str]:
    return {"Authorization": f"Bearer {secrets.token_hex(16)}"}


async def send_atomic(
    client: Client, calls: Sequence[Call], fmt: str, auth: dict[str, str]
) -> tuple[str, str, dict[int, tuple[str, str]]]:
    """(batch id, outcome, position -> (rollback status, detail)) of an atomic batch's answer."""
    if fmt == "multipart":
        report = await send_multipart(client, calls, {}, auth)
        per_item = dict(enumerate(zip(report.statuses, report.details, strict=True)))
        return report.batch_id, report.outcome, per_item
    document = json_document(calls, "Serial", {})
    async with client.post("/batch/v1", json=document, headers={**ATOMIC, **auth}) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    per_item = {}
    for position, node in enumerate(answer["Batch"]["items"]):
        [fields] = node["SingleItem"].values()
        per_item[position] = (fields["rollback"], fields.get("rollback_detail") or "")
    return answer["batch_id"], answer["atomic"]["outcome"], per_item


async def lookup(client: Client, batch_id: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with client.get(LOOKUP + batch_id, headers=headers or {}) as response:
        body = await response.json(content_type=None)
        if response.status == 200:
            assert response.headers["Cache-Control"] == "no-store"
        else:
            assert response.content_type == "application/problem+json"
        return response.status, body


def position_of(where: str) -> int:
    """`/Batch/items/3/SingleItem` (JSON) or `part 4` (multipart) -> 3."""
    return int(where.split()[1]) - 1 if where.startswith("part ") else int(where.split("/")[3])


def assert_matches_answer(
    found: dict[str, Any], answered: dict[int, tuple[str, str]], calls: Sequence[Call]
) -> None:
    """Every compensated (legacy) call is listed with the answer's rollback status and detail."""
    legacy = [p for p, call in enumerate(calls) if call.upstream == "legacy" and answered[p][0] != "skipped"]
    assert [position_of(item["where"]) for item in found["items"]] == legacy
    for item in found["items"]:
        position = position_of(item["where"])
        call = calls[position]
        assert (item["method"], item["path"], item["upstream"]) == (call.method, call.path, "legacy")
        assert item["rollback"] == answered[position][0]
        if item["rollback"] in ("rolled_back", "rollback_failed"):
            assert item["detail"] == answered[position][1]
        assert set(item) == {"where", "method", "path", "upstream", "state", "rollback", "detail"}


# --- the owner sees what became of the batch ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "multipart"])
async def test_a_committed_batch_is_looked_up_with_the_credentials_that_sent_it(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, fmt: str
) -> None:
    seed(legacy, ledger)
    client = await make_gateway()
    auth = credentials()
    batch_id, outcome, answered = await send_atomic(client, SPANNING_CALLS, fmt, auth)
    assert outcome == "committed"

    status, found = await lookup(client, batch_id, auth)

    assert status == 200
    assert found["batch_id"] == batch_id and found["state"] == "committed"
    assert_matches_answer(found, answered, SPANNING_CALLS)
    assert {item["rollback"] for item in found["items"]} == {"executed"}
    assert {item["state"] for item in found["items"]} == {"done"}
    # the transactional calls are not journaled one by one: their upstream's transaction is reported
    assert found["transactions"] == [{"upstream": "ledger", "state": "committed"}]
    assert auth["Authorization"].split()[1] not in str(found)


@pytest.mark.parametrize("fmt", ["json", "multipart"])
async def test_a_rolled_back_batch_reports_each_call_as_the_answer_did(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, fmt: str
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    state_of(legacy).faults.append(fault_rule(SPANNING_CALLS[4], "500"))
    client = await make_gateway(FAST_ROLLBACK)
    auth = credentials()
    batch_id, outcome, answered = await send_atomic(client, SPANNING_CALLS, fmt, auth)
    assert outcome == "rolled_back" and records(legacy, ledger) == before

    status, found = await lookup(client, batch_id, auth)

    assert status == 200 and found["state"] == "rolled_back"
    assert_matches_answer(found, answered, SPANNING_CALLS)
    assert [item["rollback"] for item in found["items"]] == ["rolled_back", "rolled_back", "failed"]
    assert found["items"][2]["detail"] == "answered 500"
    assert found["items"][0]["detail"] == "DELETE /orders/4"
    assert found["transactions"] == [{"upstream": "ledger", "state": "rolled_back"}]
    assert "/Batch/items/4" in found["detail"] or fmt == "multipart"


async def test_an_undo_that_failed_is_reported_rollback_failed_with_the_answers_detail(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/4", method="DELETE", status=503))
    calls = (Call("legacy", "POST", "/orders", {"item": "stays"}),
             Call("legacy", "PUT", "/orders/1", {"item": "restored"}),
             Call("legacy", "GET", "/orders/404"))
    client = await make_gateway(FAST_ROLLBACK)
    auth = credentials()
    batch_id, outcome, answered = await send_atomic(client, calls, "json", auth)
    assert outcome == "rollback_incomplete"

    status, found = await lookup(client, batch_id, auth)

    assert status == 200 and found["state"] == "rollback_incomplete"
    # the GET is read-only and never journaled, so only the two compensated calls are listed
    assert [item["rollback"] for item in found["items"]] == ["rollback_failed", "rolled_back"]
    assert found["items"][0]["detail"] == answered[0][1]
    assert "undo failed after 3 attempts" in found["items"][0]["detail"]
    assert found["transactions"] == []


# --- anyone else gets one and the same 404 --------------------------------------------------------


async def test_other_credentials_none_and_unknown_ids_all_get_the_same_404(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    client = await make_gateway()
    auth = credentials()
    batch_id, outcome, _ = await send_atomic(client, LEGACY_CALLS[:2], "json", auth)
    assert outcome == "committed"
    anonymous_id, _, _ = await send_atomic(client, LEGACY_CALLS[:1], "json", {})

    answers = [
        await lookup(client, batch_id, credentials()),  # someone else's credentials
        await lookup(client, batch_id, {"Authorization": auth["Authorization"] + "x"}),
        await lookup(client, batch_id),  # no credentials
        await lookup(client, batch_id, {"Authorization": ""}),
        await lookup(client, "b" + secrets.token_hex(12), auth),  # unknown id
        await lookup(client, "not a batch id!", auth),
        await lookup(client, anonymous_id),  # sent without credentials: nobody may look it up
        await lookup(client, anonymous_id, auth),
    ]

    for status, body in answers:
        assert status == 404
        assert set(body) == {"type", "title", "status", "detail", "instance", "request_id"}
        same = {k: v for k, v in body.items() if k not in ("instance", "request_id")}
        assert same == {k: v for k, v in answers[0][1].items() if k not in ("instance", "request_id")}
    assert answers[0][1]["type"].endswith("/batch-not-found")
    # the owner still can
    assert (await lookup(client, batch_id, auth))[0] == 200


async def test_a_pruned_batch_is_the_same_404(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    client = await make_gateway()
    auth = credentials()
    batch_id, _, _ = await send_atomic(client, LEGACY_CALLS[:1], "json", auth)
    assert (await lookup(client, batch_id, auth))[0] == 200
    assert await client.app[GATEWAY].batches.journal.prune(-1) == 1
    status, body = await lookup(client, batch_id, auth)
    assert status == 404 and body["type"].endswith("/batch-not-found")


# --- a client that went away learns the outcome ---------------------------------------------------


async def test_a_client_that_dropped_its_connection_learns_the_outcome_by_lookup(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    # the second call is held, then fails: the batch rolls back after the client is gone
    state_of(legacy).faults.append(
        FaultRule(path_prefix="/orders/1", method="PUT", delay_ms=600, status=500, times=1)
    )
    calls = (Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("legacy", "PUT", "/orders/1", {"item": "held"}))
    client = await make_gateway(FAST_ROLLBACK)
    auth = credentials()
    sending = asyncio.create_task(send_atomic(client, calls, "json", auth))
    await until(lambda: received(legacy, "PUT", "/orders/1"), "the held call")
    # the id as the upstream saw it (`Idempotency-Key: <batch>.<position>`); a client has it from
    # X-Batch-Id (e.g. on a 503 at shutdown) or from its own logs
    [post] = [c for c in state_of(legacy).calls if c["method"] == "POST"]
    batch_id = dict(post["headers"])["Idempotency-Key"].split(".")[0]

    # while it runs: the create is executed, the held call's outcome is not known yet
    status, running = await lookup(client, batch_id, auth)
    assert status == 200 and running["state"] == "running"
    assert [(i["state"], i["rollback"]) for i in running["items"]] == [("done", "executed"),
                                                                      ("intent", "unknown")]

    sending.cancel()  # the client goes away mid-batch
    with pytest.raises(asyncio.CancelledError):
        await sending
    journal = client.app[GATEWAY].batches.journal

    async def final() -> bool:
        batch = await journal.batch(batch_id)
        return batch is not None and batch.state.final

    for _ in range(500):
        if await final():
            break
        await asyncio.sleep(0.01)
    status, found = await lookup(client, batch_id, auth)
    assert status == 200 and found["state"] == "rolled_back"
    assert [(i["method"], i["path"], i["state"], i["rollback"]) for i in found["items"]] == [
        ("POST", "/orders", "done", "rolled_back"), ("PUT", "/orders/1", "failed", "failed"),
    ]
    assert records(legacy, ledger) == before


# --- what the journal keeps of the credentials ----------------------------------------------------


async def test_the_owner_is_a_keyed_hash_and_the_token_is_in_no_journal_file(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    client = await make_gateway()
    auth = credentials()
    token = auth["Authorization"]
    batch_id, outcome, _ = await send_atomic(client, LEGACY_CALLS[:2], "json", auth)
    assert outcome == "committed"
    path = journal_path(client)
    with sqlite3.connect(path) as db:
        [(owner,)] = db.execute("SELECT owner FROM batches WHERE batch_id=?", (batch_id,)).fetchall()
        [(key,)] = db.execute("SELECT value FROM meta WHERE name='owner_key'").fetchall()
    assert len(owner) == 64 and int(owner, 16) >= 0
    assert owner not in (token, hashlib.sha256(token.encode()).hexdigest())
    assert len(bytes.fromhex(key)) == 32
    assert_in_no_journal_file(path, token, token.split()[1])


async def test_with_a_journal_key_the_owner_is_keyed_with_it(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(legacy, ledger)
    monkeypatch.setenv("LOOKUP_TEST_KEY", Fernet.generate_key().decode())
    client = await make_gateway(deep_merge(FAST_ROLLBACK, {"journal": {"key_env": "LOOKUP_TEST_KEY"}}))
    auth = credentials()
    batch_id, _, _ = await send_atomic(client, LEGACY_CALLS[:1], "json", auth)
    assert (await lookup(client, batch_id, auth))[0] == 200
    assert (await lookup(client, batch_id, credentials()))[0] == 404
    with sqlite3.connect(journal_path(client)) as db:
        assert db.execute("SELECT count(*) FROM meta").fetchall() == [(0,)]  # no key of its own


async def test_the_owner_key_is_kept_across_restarts_and_the_first_owner_stays(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    first = SqliteJournal(path)
    await first.open()
    owner = first.owner_of(["Bearer a"])
    assert owner is not None and owner == first.owner_of(["Bearer a"])
    assert first.owner_of(["Bearer b"]) != owner
    assert first.owner_of([]) is None and first.owner_of([""]) is None
    await first.batch_state("b1", BatchState.PLANNED, "1 calls", owner=owner)
    await first.batch_state("b1", BatchState.RUNNING, owner=first.owner_of(["Bearer b"]))
    await first.close()

    again = SqliteJournal(path)  # a restart, or another worker on the same file
    await again.open()
    try:
        assert again.owner_of(["Bearer a"]) == owner
        found = await again.lookup("b1", owner)
        assert found is not None and found.state is BatchState.RUNNING
        assert await again.lookup("b1", again.owner_of(["Bearer b"])) is None
        assert await again.lookup("b1", None) is None
        assert await again.lookup("nope", owner) is None
    finally:
        await again.close()


async def test_a_client_that_never_got_the_batch_id_finds_its_batch_by_its_own_request_id(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    """A client whose connection dropped before the answer knows its X-Request-ID, not the batch
    id: `GET {prefix}/batches?request_id=...` finds the batch, for the same credentials only."""
    seed(legacy, ledger)
    client = await make_gateway(FAST_ROLLBACK)
    auth = credentials()
    request_id = "client-chosen-" + secrets.token_hex(4)
    calls = (Call("legacy", "POST", "/orders", {"item": "new"}),)
    async with client.post("/batch/v1", json=json_document(calls, "Serial", {}),
                           headers={**ATOMIC, **auth, "X-Request-ID": request_id}) as response:
        batch_id = (await response.json())["batch_id"]

    async with client.get("/_gateway/batches", params={"request_id": request_id}, headers=auth) as response:
        found = await response.json()
        assert response.status == 200
    assert found["batch_id"] == batch_id and found["state"] == "committed"
    for other in (credentials(), {}):
        async with client.get("/_gateway/batches", params={"request_id": request_id},
                              headers=other) as response:
            assert response.status == 404
    async with client.get("/_gateway/batches", params={"request_id": "never-sent"}, headers=auth) as response:
        assert response.status == 404
