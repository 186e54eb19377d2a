"""Atomic batches against real upstreams (SPEC section 5): all-or-nothing, reported honestly.

The fault matrix: a batch of five mutating calls on the transactional upstream (`ledger`), on the
compensation upstream (`legacy`, POST/PUT/PATCH/DELETE on pre-seeded records) and spanning both;
the call at each position 1..5 fails (the upstream answers 500, or drops the connection), sent as
a JSON Serial, JSON Unordered and multipart batch. Afterwards every upstream's records equal what
they were before, no transaction is left open, and the answer reports each call.

Faults are targeted with the demo's fault rules (method + path), not the per-item `X-Demo-*`
headers: the gateway copies a call's headers onto the calls it derives from it (snapshot GET, undo,
transaction begin/commit/rollback), so a header would fault those too.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.atomicity.state import BatchState
from gateway.demo.launcher import demo_config_data
from gateway.demo.services import TOKEN_HEADER, FaultRule, ledger_app
from gateway.runtime import GATEWAY
from tests.conftest import MakeGateway, state_of

Client = TestClient[web.Request, web.Application]
ATOMIC = {"X-Batch-Atomic": "true"}
# fast backoff so a failing undo costs milliseconds, not seconds
FAST_ROLLBACK: dict[str, Any] = {
    "batch": {"rollback": {"attempts": 3, "initial_backoff": 0.005, "max_backoff": 0.02}}
}


@dataclass(frozen=True)
class Call:
    upstream: str  # "legacy" (compensation) or "ledger" (transaction tokens)
    method: str
    path: str
    body: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


LEGACY_CALLS = (
    Call("legacy", "POST", "/orders", {"item": "created"}),
    Call("legacy", "PUT", "/orders/1", {"item": "replaced"}),
    Call("legacy", "PATCH", "/orders/2", {"qty": 9}),
    Call("legacy", "DELETE", "/orders/3"),
    Call("legacy", "PUT", "/orders/9", {"item": "created by PUT"}),
)
LEDGER_CALLS = (
    Call("ledger", "POST", "/accounts", {"owner": "created"}),
    Call("ledger", "PUT", "/accounts/1", {"owner": "replaced"}),
    Call("ledger", "PATCH", "/accounts/2", {"balance": 9}),
    Call("ledger", "DELETE", "/accounts/3"),
    Call("ledger", "PUT", "/accounts/9", {"owner": "created by PUT"}),
)
SPANNING_CALLS = (
    Call("legacy", "POST", "/orders", {"item": "created"}),
    Call("ledger", "POST", "/accounts", {"owner": "created"}),
    Call("legacy", "PUT", "/orders/1", {"item": "replaced"}),
    Call("ledger", "PATCH", "/accounts/2", {"balance": 9}),
    Call("legacy", "DELETE", "/orders/3"),
)
UPSTREAM_SETS = {"ledger": LEDGER_CALLS, "legacy": LEGACY_CALLS, "spanning": SPANNING_CALLS}
FORMATS = ("json-serial", "json-unordered", "multipart", "multipart-unordered")


@pytest.fixture(params=["sqlite", "postgres"])
def journal_kind(request: pytest.FixtureRequest) -> str:
    """Every test here runs with the SQLite journal and with the PostgreSQL one (tests/conftest.py)."""
    return str(request.param)


# --- the world before a batch -------------------------------------------------------------------


def seed(legacy: TestServer, ledger: TestServer) -> None:
    """Three records on each upstream, ids 1..3, so the next created id is 4."""
    for n in (1, 2, 3):
        state_of(legacy).store.create({"item": f"order {n}", "qty": n})
        state_of(ledger).store.create({"owner": f"owner {n}", "balance": 100 * n})


def records(*servers: TestServer) -> list[dict[str, Any]]:
    return [copy.deepcopy(state_of(server).store.records) for server in servers]


def assert_no_open_transactions(*servers: TestServer) -> None:
    for server in servers:
        assert state_of(server).transactions == {}


def apply(before: dict[str, Any], calls: Sequence[Call], upstream: str) -> dict[str, Any]:
    """What an upstream's records are after the calls on it all took effect (one POST each)."""
    after = copy.deepcopy(before)
    for call in (c for c in calls if c.upstream == upstream):
        key = call.path.rsplit("/", 1)[1]
        if call.method == "POST":
            key = str(len(before) + 1)
            after[key] = {**(call.body or {}), "id": key}
        elif call.method == "PUT":
            after[key] = {**(call.body or {}), "id": key}
        elif call.method == "PATCH":
            after[key] = {**after[key], **(call.body or {})}
        else:
            del after[key]
    return after


def fault_rule(call: Call, fault: str) -> FaultRule:
    """A rule hitting just this forward call once (never its snapshot GET: another method).

    The gateway's client never re-sends a request once a byte of it was written (aiohttp's
    resent an idempotent PUT or DELETE after a drop), so one drop sticks; the undo (a later call)
    then goes through.
    """
    if fault == "500":
        return FaultRule(path_prefix=call.path, method=call.method, status=500, times=1)
    return FaultRule(path_prefix=call.path, method=call.method, drop="before", times=1)


def server_for(call: Call, legacy: TestServer, ledger: TestServer) -> TestServer:
    return legacy if call.upstream == "legacy" else ledger


# --- sending a batch in either format and reading the answer the same way ---------------------


@dataclass
class Report:
    batch_id: str
    outcome: str
    detail: str
    statuses: list[str]  # per item: executed | rolled_back | rollback_failed | failed | skipped
    http: list[int | None]  # per item: the call's status; None when skipped
    details: list[str]


def json_document(calls: Sequence[Call], mode: str, headers: dict[int, dict[str, str]]) -> Any:
    items = []
    for position, call in enumerate(calls):
        item: dict[str, Any] = {"method": call.method, "operation": call.path}
        if call.body is not None:
            item["body"] = call.body
        if position in headers:
            item["headers"] = headers[position]
        items.append({"SingleItem": item})
    return {"Batch": {"batch_execution_type": mode, "items": items}}


async def send_json(
    client: Client, calls: Sequence[Call], mode: str, headers: dict[int, dict[str, str]]
) -> Report:
    document = json_document(calls, mode, headers)
    async with client.post("/batch/v1", json=document, headers=ATOMIC) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
        assert response.headers["X-Batch-Outcome"] == answer["atomic"]["outcome"]
    statuses, http, details = [], [], []
    for node in answer["Batch"]["items"]:
        [(kind, fields)] = node["SingleItem"].items()
        statuses.append(fields["rollback"])
        http.append(fields["status"] if kind == "Result" else None)
        details.append(fields.get("rollback_detail") or fields.get("reason") or "")
    return Report(
        answer["batch_id"], answer["atomic"]["outcome"], answer["atomic"].get("detail", ""),
        statuses, http, details,
    )


def multipart_body(
    calls: Sequence[Call], headers: dict[int, dict[str, str]]
) -> tuple[bytes, str]:
    boundary = "atomic-matrix-boundary"
    chunks = []
    for position, call in enumerate(calls):
        body = b"" if call.body is None else json.dumps(call.body).encode()
        lines = [f"{call.method} {call.path} HTTP/1.1", "Host: gateway"]
        if call.body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.get(position, {}).items()]
        request = "\r\n".join([*lines, "", ""]).encode() + body
        head = f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <{position}>\r\n\r\n"
        chunks.append(head.encode() + request + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/mixed; boundary={boundary}"


async def send_multipart(
    client: Client, calls: Sequence[Call], headers: dict[int, dict[str, str]],
    extra: dict[str, str] | None = None,
) -> Report:
    """The multipart endpoint is atomic by default: no X-Batch-Atomic header is sent."""
    body, content_type = multipart_body(calls, headers)
    sent = {"Content-Type": content_type, **(extra or {})}
    async with client.post("/v1/api/batch", data=body, headers=sent) as response:
        payload = await response.read()
        assert response.status == 200, payload[:500]
        outer = response.headers
        answer_type = response.headers["Content-Type"]
    message = BytesParser(policy=compat32).parsebytes(
        f"Content-Type: {answer_type}\r\n\r\n".encode() + payload
    )
    statuses, http, details = [], [], []
    for part in message.get_payload():
        assert isinstance(part, Message)
        statuses.append(part["X-Batch-Item-Status"])
        details.append(part["X-Batch-Item-Detail"] or "")
        raw = part.get_payload(decode=True)
        assert isinstance(raw, bytes)
        status = int(raw.split(b" ", 2)[1])
        http.append(None if status == 424 else status)
    assert len(statuses) == len(calls)
    return Report(outer["X-Batch-Id"], outer["X-Batch-Outcome"], "", statuses, http, details)


async def send(
    client: Client, calls: Sequence[Call], fmt: str,
    headers: dict[int, dict[str, str]] | None = None,
) -> Report:
    if fmt.startswith("multipart"):
        unordered = {"X-Batch-Execution": "Unordered"} if fmt.endswith("unordered") else {}
        return await send_multipart(client, calls, headers or {}, unordered)
    mode = "Serial" if fmt == "json-serial" else "Unordered"
    return await send_json(client, calls, mode, headers or {})


async def journaled_state(client: Client, batch_id: str) -> BatchState:
    batch = await client.app[GATEWAY].batches.journal.batch(batch_id)
    assert batch is not None
    return batch.state


def keys_seen(*servers: TestServer) -> list[tuple[str, str, str | None]]:
    """(method, path, Idempotency-Key) of every call the upstreams received, in order."""
    seen = []
    for server in servers:
        for call in state_of(server).calls:
            key = dict((k.lower(), v) for k, v in call["headers"]).get("idempotency-key")
            seen.append((call["method"], call["path"], key))
    return seen


# --- the fault matrix -----------------------------------------------------------------------------


def expected_statuses(calls: Sequence[Call], failing: int, fault: str, fmt: str) -> list[str]:
    """Before the failure: rolled back. The failing call: failed if it answered 500; if its
    connection dropped its outcome is unknown, so it is rolled back too (transaction rollback,
    or its snapshot restored), except a create on the compensation upstream, whose id nobody
    knows: that one is rollback_failed. After it: skipped (Serial) or rolled back (Unordered)."""
    statuses = []
    for position, call in enumerate(calls):
        if position == failing and fault == "500":
            statuses.append("failed")
        elif position == failing:
            unknown_create = call.upstream == "legacy" and call.method == "POST"
            statuses.append("rollback_failed" if unknown_create else "rolled_back")
        elif position > failing and not fmt.endswith("unordered"):
            statuses.append("skipped")
        else:
            statuses.append("rolled_back")
    return statuses


MATRIX = [
    pytest.param(upstreams, fmt, fault, failing, id=f"{upstreams}-{fmt}-{fault}-at-{failing + 1}")
    for upstreams in UPSTREAM_SETS
    for fmt in FORMATS
    for fault in ("500", "drop")
    for failing in range(5)
]


@pytest.mark.parametrize(("upstreams", "fmt", "fault", "failing"), MATRIX)
async def test_a_failure_at_any_position_leaves_every_upstream_as_it_was(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer,
    upstreams: str, fmt: str, fault: str, failing: int,
) -> None:
    calls = UPSTREAM_SETS[upstreams]
    seed(legacy, ledger)
    before = records(legacy, ledger)
    bad = calls[failing]
    rule = fault_rule(bad, fault)
    state_of(server_for(bad, legacy, ledger)).faults.append(rule)
    client = await make_gateway(FAST_ROLLBACK)

    report = await send(client, calls, fmt)

    assert rule.times == 0, "the fault hit the forward call, once"

    # the upstreams are exactly as before, with no transaction left open
    assert records(legacy, ledger) == before
    assert_no_open_transactions(legacy, ledger)
    # the answer reports every call
    statuses = expected_statuses(calls, failing, fault, fmt)
    assert report.statuses == statuses
    incomplete = "rollback_failed" in statuses
    assert report.outcome == ("rollback_incomplete" if incomplete else "rolled_back")
    assert report.http[failing] == (500 if fault == "500" else 502)
    for position, status in enumerate(statuses):
        if status == "skipped":
            assert report.http[position] is None
        elif position != failing:
            assert report.http[position] in (200, 201, 204)
    if incomplete:
        assert "outcome unknown" in report.details[failing]
        if fmt.startswith("json"):
            assert f"/Batch/items/{failing}" in report.detail
    assert await journaled_state(client, report.batch_id) is BatchState(report.outcome)
    # forward calls carry <batch-id>.<position>: made up to the failure (Serial) or all of them
    forward = {key for _, _, key in keys_seen(legacy, ledger) if key and key.count(".") == 1}
    made = range(5) if fmt.endswith("unordered") else range(failing + 1)
    assert forward == {f"{report.batch_id}.{position}" for position in made}
    # every compensation-based call that was rolled back was undone by a `.undo` call
    undos = {key for _, _, key in keys_seen(legacy) if key and key.endswith(".undo")}
    for position, call in enumerate(calls):
        if call.upstream == "legacy" and statuses[position] == "rolled_back":
            assert f"{report.batch_id}.{position}.undo" in undos


# --- the happy path -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_batch_that_succeeds_commits_every_change(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, fmt: str
) -> None:
    seed(legacy, ledger)
    legacy_before, ledger_before = records(legacy, ledger)
    client = await make_gateway()

    report = await send(client, SPANNING_CALLS, fmt)

    assert report.outcome == "committed"
    assert report.statuses == ["executed"] * 5
    assert report.http == [201, 201, 200, 200, 204]
    assert state_of(legacy).store.records == apply(legacy_before, SPANNING_CALLS, "legacy")
    assert state_of(ledger).store.records == apply(ledger_before, SPANNING_CALLS, "ledger")
    assert_no_open_transactions(legacy, ledger)
    assert await journaled_state(client, report.batch_id) is BatchState.COMMITTED
    assert not any(key and key.endswith(".undo") for _, _, key in keys_seen(legacy, ledger))


async def test_safe_calls_need_no_undo_and_are_reported_executed(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/2", method="PATCH", status=500))
    client = await make_gateway()
    calls = (Call("legacy", "GET", "/orders/1"), Call("legacy", "POST", "/orders", {"item": "x"}),
             Call("legacy", "PATCH", "/orders/2", {"qty": 0}))
    report = await send(client, calls, "json-serial")
    assert report.statuses == ["executed", "rolled_back", "failed"]
    assert report.details[0] == "read-only call; nothing to roll back"
    assert records(legacy, ledger) == before


# --- Idempotency-Key and compensation order -----------------------------------------------------


async def test_forward_calls_and_undos_carry_idempotency_keys_and_undo_in_reverse_order(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    state_of(legacy).faults.append(fault_rule(LEGACY_CALLS[4], "500"))
    client = await make_gateway()
    report = await send(client, LEGACY_CALLS, "json-serial")
    bid = report.batch_id
    assert report.outcome == "rolled_back"

    calls = keys_seen(legacy)
    forward = [(m, p, k) for m, p, k in calls if k is not None and not k.endswith(".undo")]
    assert forward == [
        (call.method, call.path, f"{bid}.{position}") for position, call in enumerate(LEGACY_CALLS)
    ]
    snapshots = [(m, p, k) for m, p, k in calls if m == "GET"]
    assert snapshots == [("GET", p, None) for p in ("/orders/1", "/orders/2", "/orders/3", "/orders/9")]
    undos = [(m, p, k) for m, p, k in calls if k is not None and k.endswith(".undo")]
    assert undos == [  # reverse completion order: DELETE, PATCH, PUT, POST
        ("PUT", "/orders/3", f"{bid}.3.undo"),
        ("PUT", "/orders/2", f"{bid}.2.undo"),
        ("PUT", "/orders/1", f"{bid}.1.undo"),
        ("DELETE", "/orders/4", f"{bid}.0.undo"),
    ]


async def test_transactional_calls_carry_the_token_and_position_keys(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    client = await make_gateway()
    report = await send(client, SPANNING_CALLS, "json-serial")
    bid = report.batch_id
    ledger_calls = state_of(ledger).calls
    begin, *forward, commit = ledger_calls
    assert (begin["method"], begin["path"]) == ("POST", "/tx")
    assert dict(begin["headers"])["Idempotency-Key"] == f"{bid}.tx.ledger"
    token = dict(forward[0]["headers"])[TOKEN_HEADER]
    assert [(c["path"], dict(c["headers"])["Idempotency-Key"]) for c in forward] == [
        ("/accounts", f"{bid}.1"), ("/accounts/2", f"{bid}.3"),
    ]
    assert all(dict(c["headers"])[TOKEN_HEADER] == token for c in forward)
    assert commit["path"] == f"/tx/{token}/commit"


# --- compensations that fail ----------------------------------------------------------------------


@pytest.mark.parametrize("failures", [1, 2])
@pytest.mark.parametrize("fmt", ["json-serial", "multipart"])
async def test_an_undo_that_fails_then_succeeds_is_retried_and_reported_rolled_back(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, failures: int, fmt: str
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    # the batch's POST creates /orders/4; its undo (DELETE /orders/4) fails `failures` times
    undo_fault = FaultRule(path_prefix="/orders/4", method="DELETE", status=503, times=failures)
    state_of(legacy).faults.append(undo_fault)
    calls = (Call("legacy", "POST", "/orders", {"item": "x"}), Call("legacy", "GET", "/orders/404"))
    client = await make_gateway(FAST_ROLLBACK)

    report = await send(client, calls, fmt)

    assert report.outcome == "rolled_back"
    assert report.statuses == ["rolled_back", "failed"]
    assert report.http == [201, 404]
    assert records(legacy, ledger) == before
    undos = [c for c in keys_seen(legacy) if c[0] == "DELETE"]
    assert undos == [("DELETE", "/orders/4", f"{report.batch_id}.0.undo")] * (failures + 1)


@pytest.mark.parametrize("fmt", ["json-serial", "json-unordered", "multipart"])
async def test_an_undo_that_always_fails_is_reported_rollback_failed_never_rolled_back(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, fmt: str
) -> None:
    seed(legacy, ledger)
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/4", method="DELETE", status=503))
    calls = (
        Call("legacy", "POST", "/orders", {"item": "stays"}),
        Call("legacy", "PUT", "/orders/1", {"item": "restored"}),
        Call("legacy", "GET", "/orders/404"),
    )
    client = await make_gateway(FAST_ROLLBACK)

    report = await send(client, calls, fmt)

    assert report.outcome == "rollback_incomplete"
    assert report.statuses == ["rollback_failed", "rolled_back", "failed"]
    assert "undo failed after 3 attempts" in report.details[0]
    assert "503" in report.details[0]
    if fmt.startswith("json"):
        assert "/Batch/items/0" in report.detail
    # honest: the created order is still there, the PUT was reverted
    assert state_of(legacy).store.records["4"] == {"item": "stays", "id": "4"}
    assert state_of(legacy).store.records["1"] == {"item": "order 1", "qty": 1, "id": "1"}
    assert [c[0] for c in keys_seen(legacy)].count("DELETE") == 3
    journal = client.app[GATEWAY].batches.journal
    batch = await journal.batch(report.batch_id)
    assert batch is not None and batch.state is BatchState.ROLLBACK_INCOMPLETE
    assert {s.position: s.undo_state for s in batch.steps} == {0: "undo_failed", 1: "undone"}
    # nothing is left for recovery: the batch is final even though it is incomplete
    assert await journal.unfinished() == []


# --- the plan refuses what cannot be undone --------------------------------------------------------


async def test_an_uncompensable_call_is_rejected_with_422_before_any_upstream_call(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    client = await make_gateway({"upstreams": {"legacy": {"infer_compensations": False}}})
    calls = (
        Call("ledger", "POST", "/accounts", {"owner": "x"}),
        Call("legacy", "GET", "/orders"),
        Call("legacy", "POST", "/orders", {"item": "x"}),
    )
    document = json_document(calls, "Serial", {})
    async with client.post("/batch/v1", json=document, headers=ATOMIC) as response:
        assert response.status == 422
        assert response.content_type == "application/problem+json"
        problem = await response.json(content_type=None)
    assert problem["status"] == 422
    assert problem["pointer"] == "/Batch/items/2/SingleItem"
    assert "POST" in problem["detail"] and "legacy" in problem["detail"]

    body, content_type = multipart_body(calls, {})
    async with client.post("/v1/api/batch", data=body, headers={"Content-Type": content_type}) as r:
        assert r.status == 422
        problem = await r.json(content_type=None)
    assert "3" in problem["where"]  # names the third part
    assert state_of(legacy).calls == [] and state_of(ledger).calls == []

    # the same batch, not atomic, is simply run
    async with client.post("/batch/v1", json=document, headers={"X-Batch-Atomic": "false"}) as r:
        assert r.status == 200


async def test_a_declared_compensation_rule_is_used_instead_of_inference(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    rule = {
        "method": "POST", "path": "/orders",
        "undo": {"method": "DELETE", "path": "/orders/{response.body.id}"},
    }
    client = await make_gateway(
        {"upstreams": {"legacy": {"infer_compensations": False, "compensations": [rule]}}}
    )
    calls = (Call("legacy", "POST", "/orders", {"item": "x"}), Call("legacy", "GET", "/orders/404"))
    report = await send(client, calls, "json-serial")
    assert report.statuses == ["rolled_back", "failed"]
    assert report.details[0] == "DELETE /orders/4"
    assert records(legacy, ledger) == before


# --- unknown outcomes -----------------------------------------------------------------------------


async def test_a_put_whose_connection_dropped_after_it_took_effect_is_undone_from_its_snapshot(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    # the PUT takes effect, then the connection drops (aiohttp resends a PUT once: both drop)
    drop = FaultRule(path_prefix="/orders/1", method="PUT", drop="after", times=2)
    state_of(legacy).faults.append(drop)
    client = await make_gateway()
    calls = (Call("legacy", "POST", "/orders", {"item": "x"}),
             Call("legacy", "PUT", "/orders/1", {"item": "changed"}))
    document = json_document(calls, "Serial", {})
    async with client.post("/batch/v1", json=document, headers=ATOMIC) as response:
        answer = await response.json()
    failed = answer["Batch"]["items"][1]["SingleItem"]["Result"]
    assert failed["status"] == 502 and failed["maybe_executed"] is True
    assert failed["rollback"] == "rolled_back"
    assert answer["atomic"]["outcome"] == "rolled_back"
    puts = [c for c in keys_seen(legacy) if c[0] == "PUT"]
    assert puts[-1] == ("PUT", "/orders/1", f"{answer['batch_id']}.1.undo")
    assert records(legacy, ledger) == before


async def test_a_create_whose_connection_dropped_after_it_took_effect_is_reported_not_undone(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    state_of(legacy).faults.append(
        FaultRule(path_prefix="/orders", method="POST", drop="after", times=1)
    )
    client = await make_gateway()
    calls = (Call("legacy", "PUT", "/orders/1", {"item": "changed"}),
             Call("legacy", "POST", "/orders", {"item": "maybe"}))
    report = await send(client, calls, "json-serial")
    assert report.outcome == "rollback_incomplete"
    assert report.statuses == ["rolled_back", "rollback_failed"]
    assert "outcome unknown" in report.details[1]
    assert "/Batch/items/1" in report.detail
    # the truth the report admits: the order was created and is still there
    assert state_of(legacy).store.records["4"] == {"item": "maybe", "id": "4"}
    assert state_of(legacy).store.records["1"]["item"] == "order 1"


async def test_a_fault_header_on_a_create_fails_just_that_call(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    """`X-Demo-Fail` on an item: a POST derives no snapshot, and a failed call gets no undo."""
    seed(legacy, ledger)
    before = records(legacy, ledger)
    client = await make_gateway()
    calls = (Call("legacy", "PUT", "/orders/1", {"item": "changed"}),
             Call("legacy", "POST", "/orders", {"item": "x"}))
    for fmt in ("json-serial", "multipart"):
        report = await send(client, calls, fmt, headers={1: {"X-Demo-Fail": "500"}})
        assert report.statuses == ["rolled_back", "failed"]
        assert report.http == [200, 500]
        assert records(legacy, ledger) == before


# --- Unordered: calls in flight are awaited, then compensated ---------------------------------------


async def test_unordered_awaits_a_slow_call_in_flight_and_then_undoes_it(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    slow = FaultRule(path_prefix="/orders", method="POST", delay_ms=400, times=1)
    state_of(legacy).faults.append(slow)
    state_of(ledger).faults.append(FaultRule(path_prefix="/accounts/1", method="PUT", status=500))
    client = await make_gateway()
    calls = (Call("legacy", "POST", "/orders", {"item": "slow"}),
             Call("ledger", "PUT", "/accounts/1", {"owner": "fails"}),
             Call("ledger", "POST", "/accounts", {"owner": "x"}))
    started = time.monotonic()
    report = await send(client, calls, "json-unordered")
    assert time.monotonic() - started >= 0.4
    assert report.statuses == ["rolled_back", "failed", "rolled_back"]
    assert report.http == [201, 500, 201]
    assert ("DELETE", "/orders/4", f"{report.batch_id}.0.undo") in keys_seen(legacy)
    assert records(legacy, ledger) == before
    assert_no_open_transactions(legacy, ledger)


# --- commits: transactional upstreams last, failures reported honestly ---------------------------


TX_CALLS = (Call("legacy", "POST", "/orders", {"item": "x"}),
            Call("legacy", "PATCH", "/orders/2", {"qty": 0}),
            Call("ledger", "POST", "/accounts", {"owner": "x"}))


async def test_a_commit_that_fails_rolls_back_the_transaction_and_undoes_compensated_calls(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    state_of(ledger).faults.append(FaultRule(path_prefix="/tx/", status=500, times=1))
    client = await make_gateway()

    report = await send(client, TX_CALLS, "json-serial")

    assert report.outcome == "rolled_back"
    assert "commit on 'ledger' answered 500" in report.detail
    assert report.statuses == ["rolled_back", "rolled_back", "rolled_back"]
    tx_paths = [c["path"].rsplit("/", 1)[1] for c in state_of(ledger).calls if "/tx/" in c["path"]]
    assert tx_paths == ["commit", "rollback"]
    assert records(legacy, ledger) == before
    assert_no_open_transactions(legacy, ledger)


async def test_a_commit_whose_answer_is_lost_is_reported_incomplete_not_rolled_back(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    legacy_before, ledger_before = records(legacy, ledger)
    # the commit takes effect, then the connection drops: the rollback then finds no transaction
    state_of(ledger).faults.append(FaultRule(path_prefix="/tx/", drop="after", times=1))
    client = await make_gateway()

    report = await send(client, TX_CALLS, "json-serial")

    assert report.outcome == "rollback_incomplete"
    assert "ledger" in report.detail
    assert report.statuses == ["rolled_back", "rolled_back", "rollback_failed"]
    assert "rollback on 'ledger' answered 404" in report.details[2]
    assert state_of(legacy).store.records == legacy_before  # what could be undone was
    assert state_of(ledger).store.records == apply(ledger_before, TX_CALLS, "ledger")
    assert await journaled_state(client, report.batch_id) is BatchState.ROLLBACK_INCOMPLETE


async def test_a_second_commit_failing_after_the_first_succeeded_names_the_committed_one(
    aiohttp_server: Any, make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    other: TestServer = await aiohttp_server(ledger_app())
    base = demo_config_data("http://127.0.0.1:1", "http://127.0.0.1:2")
    second = {**base["upstreams"]["ledger"], "url": str(other.make_url("")).rstrip("/")}
    routes = [*base["routes"], {"prefix": "/other", "upstream": "other", "strip_prefix": True}]
    client = await make_gateway({"upstreams": {"other": second}, "routes": routes})
    state_of(other).faults.append(FaultRule(path_prefix="/tx/", status=500, times=1))
    calls = (Call("ledger", "POST", "/accounts", {"owner": "committed"}),
             Call("other", "POST", "/other/accounts", {"owner": "rolled back"}),
             Call("legacy", "POST", "/orders", {"item": "undone"}))
    legacy_before = records(legacy)[0]

    report = await send(client, calls, "json-serial")

    assert report.outcome == "rollback_incomplete"
    assert "ledger: its transaction was already committed" in report.detail
    assert report.statuses == ["rollback_failed", "rolled_back", "rolled_back"]
    assert report.details[0] == "its transaction was already committed"
    assert state_of(ledger).store.records["4"]["owner"] == "committed"
    assert state_of(other).store.records == {}
    assert state_of(legacy).store.records == legacy_before
    assert_no_open_transactions(legacy, ledger, other)


async def test_a_transaction_that_cannot_begin_fails_its_first_call_and_the_batch_rolls_back(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    state_of(ledger).faults.append(FaultRule(path_prefix="/tx", method="POST", status=503, times=1))
    client = await make_gateway()
    report = await send(client, TX_CALLS, "json-serial")
    assert report.outcome == "rolled_back"
    assert report.statuses == ["rolled_back", "rolled_back", "failed"]
    assert report.http[2] == 502
    assert [c["path"] for c in state_of(ledger).calls] == ["/tx"]  # the call itself was never sent
    assert records(legacy, ledger) == before


@pytest.mark.parametrize("failures", [1, 2])
async def test_a_transaction_rollback_that_fails_transiently_is_retried(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, failures: int
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    rollback_fault = FaultRule(path_prefix="/tx/", status=503, times=failures)
    state_of(ledger).faults.append(rollback_fault)
    client = await make_gateway(FAST_ROLLBACK)
    calls = (*LEDGER_CALLS[:2], Call("ledger", "GET", "/accounts/404"))
    report = await send(client, calls, "json-serial")
    assert report.outcome == "rolled_back", report.detail
    assert report.statuses == ["rolled_back", "rolled_back", "failed"]
    assert records(legacy, ledger) == before
    assert_no_open_transactions(ledger)


async def test_a_transaction_rollback_that_always_fails_is_reported_rollback_failed(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    state_of(ledger).faults.append(FaultRule(path_prefix="/tx/", status=503))
    client = await make_gateway(FAST_ROLLBACK)
    calls = (Call("legacy", "POST", "/orders", {"item": "x"}), *LEDGER_CALLS[:2],
             Call("ledger", "GET", "/accounts/404"))
    report = await send(client, calls, "json-serial")
    assert report.outcome == "rollback_incomplete"
    # every call inside the transaction that could not be rolled back says so, the failed one too
    # (whatever it did inside the transaction is still there)
    assert report.statuses == ["rolled_back", "rollback_failed", "rollback_failed", "rollback_failed"]
    assert "rollback on 'ledger' answered 503 (after 3 attempts)" in report.details[1]
    assert "ledger" in report.detail
    assert len(state_of(ledger).transactions) == 1  # honestly left open, and said so


async def test_unordered_calls_waiting_for_a_transaction_whose_begin_failed_roll_back_cleanly(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    """The first begin fails; the calls queued behind it begin a second one, which is rolled
    back exactly once and reported as such (not as a failed rollback of the same upstream)."""
    seed(legacy, ledger)
    before = records(legacy, ledger)
    state_of(ledger).faults.append(FaultRule(path_prefix="/tx", method="POST", status=503, times=1))
    client = await make_gateway(FAST_ROLLBACK)

    report = await send(client, LEDGER_CALLS[:3], "json-unordered")

    assert report.outcome == "rolled_back", report.detail
    assert sorted(report.statuses) == ["failed", "rolled_back", "rolled_back"]
    rollbacks = [c for c in state_of(ledger).calls if c["path"].endswith("/rollback")]
    assert len(rollbacks) == 1
    assert records(legacy, ledger) == before
    assert_no_open_transactions(ledger)


async def test_a_call_that_timed_out_is_treated_as_possibly_executed_and_undone(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    state_of(legacy).faults.append(
        FaultRule(path_prefix="/orders/1", method="PUT", delay_ms=2000, times=1)
    )
    client = await make_gateway({"batch": {"limits": {"call_timeout": 0.3}}})
    calls = (Call("legacy", "DELETE", "/orders/2"), Call("legacy", "PUT", "/orders/1", {"item": "late"}))
    report = await send(client, calls, "json-serial")
    assert report.http == [204, 504]
    assert report.statuses == ["rolled_back", "rolled_back"]
    assert report.outcome == "rolled_back"
    assert records(legacy, ledger) == before


@pytest.mark.parametrize("fail_inner", [True, False])
async def test_nested_batches_are_atomic_as_a_whole(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, fail_inner: bool
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    bad = Call("ledger", "PATCH", "/accounts/2", {"balance": 0}) if fail_inner else Call(
        "legacy", "DELETE", "/orders/3"
    )
    state_of(server_for(bad, legacy, ledger)).faults.append(fault_rule(bad, "500"))
    inner = json_document(
        (Call("legacy", "PUT", "/orders/1", {"item": "x"}), Call("ledger", "PATCH", "/accounts/2",
                                                                   {"balance": 0})),
        "Unordered", {},
    )
    outer = json_document((Call("legacy", "POST", "/orders", {"item": "y"}),), "Serial", {})
    outer["Batch"]["items"] += [inner, json_document((Call("legacy", "DELETE", "/orders/3"),),
                                                     "Serial", {})["Batch"]["items"][0]]
    client = await make_gateway()
    async with client.post("/batch/v1", json=outer, headers=ATOMIC) as response:
        answer = await response.json()
    first, nested, last = answer["Batch"]["items"]
    put, patch = (node["SingleItem"]["Result"] for node in nested["Batch"]["items"])
    assert answer["atomic"]["outcome"] == "rolled_back"
    assert first["SingleItem"]["Result"]["rollback"] == "rolled_back"
    assert put["rollback"] == "rolled_back"
    assert patch["rollback"] == ("failed" if fail_inner else "rolled_back")
    assert last["SingleItem"]["Skipped" if fail_inner else "Result"]["rollback"] == (
        "skipped" if fail_inner else "failed"
    )
    assert records(legacy, ledger) == before
    assert_no_open_transactions(ledger)


async def test_the_matrix_runs_on_the_journal_it_names(make_gateway: MakeGateway, journal_kind: str) -> None:
    client = await make_gateway()
    journal = client.app[GATEWAY].batches.journal
    assert type(journal).__name__ == {"sqlite": "SqliteJournal", "postgres": "PostgresJournal"}[journal_kind]
