"""Atomic batches against hostile upstreams (issue 9): every value an upstream hands back is untrusted.

An atomic batch reuses what upstreams answer: a created resource's `Location` or `id` becomes the
target of its undo, a transaction token travels in a header and a path, a snapshot's body is put
back as it was. A hostile (or merely broken) upstream must not be able to steer those calls
anywhere else, smuggle headers into them, or make the gateway report an undo it never did.

Each case runs a real misbehaving aiohttp server on 127.0.0.1 that records every request it gets
(method, raw request-target path, headers, body), and a real gateway routed to it. A case checks

  (a) the batch answer: HTTP 200, the outcome, and each item's rollback status and why;
  (b) the upstream: the exact requests it received, nothing outside the route, no credentials
      sent anywhere they were not sent before;
  (c) the journal: the batch is final, and a restart (recovery from the journal on a fresh
      connection and pool) neither raises nor finds anything left to do.

Findings:
  1. Location with credentials, an id with CR/LF, transaction tokens that cannot travel in a header
     (or are missing), and a journal poisoned with records recovery cannot act on.
  2. Compressed snapshots: the restore carries the snapshot's original bytes, never gzip bytes.
  3. Locations and ids that try to leave the route (dot segments, other hosts and ports, other
     paths, queries and fragments), also with an upstream base path.
  Properties: random hostile Locations, ids and tokens, on the pure undo builder and end to end.

Bugs these tests found in the first hardening pass, now fixed: a token with a control character
was not rolled back by its path; a token with surrounding spaces was trimmed into another one in
the rollback header; a token like '..' was used although its commit/rollback path was refused; a
Location such as 'urn:uuid:7' made the undo builder raise ValueError/IndexError instead of
UndoImpossible.

Names added by issue 9 are imported inside the tests that need them, so this file also runs
against the code before it (where those tests fail, as they should).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from gateway.app import create_app
from gateway.atomicity.journal import SqliteJournal
from gateway.atomicity.plan import UndoKind, UndoSpec
from gateway.atomicity.recovery import Recovery
from gateway.atomicity.state import BatchState
from gateway.config import GatewayConfig, parse_config
from gateway.demo.launcher import demo_config_data
from gateway.routing import RouteTable, parse_target
from gateway.runtime import GATEWAY
from gateway.upstream import UpstreamPool
from tests.conftest import deep_merge
from tests.test_atomic_fault_matrix import ATOMIC, FAST_ROLLBACK

if TYPE_CHECKING:
    from gateway.atomicity.recovery import RecoveryReport

Client = TestClient[web.Request, web.Application]
SECRET = {"Authorization": "Bearer secret"}
FAIL = "/orders/fail"
"""Every hostile upstream answers 500 here: the item that makes a batch roll back."""


# --- hostile upstreams: real servers that record every request -----------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    raw_path: str
    """The request-target's path exactly as it arrived (still percent-encoded, no query)."""
    query: str
    headers: CIMultiDict[str]
    body: bytes


Responder = Callable[[web.Request, bytes], web.StreamResponse]


@dataclass
class Hostile:
    """A real upstream on 127.0.0.1; `respond` may be swapped between batches."""

    respond: Responder
    seen: list[Seen] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port

    def calls(self) -> list[tuple[str, str]]:
        return [(s.method, s.raw_path) for s in self.seen]

    def received(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]


async def serve(aiohttp_server: Any, respond: Responder) -> Hostile:
    hostile = Hostile(respond)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        raw_path, _, query = request.raw_path.partition("?")
        hostile.seen.append(Seen(request.method, raw_path, query, CIMultiDict(request.headers), body))
        return hostile.respond(request, body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    hostile.server = await aiohttp_server(app)
    return hostile


_NO_ID = object()


def creates(location: str | None = None, created_id: Any = _NO_ID) -> Responder:
    """POST answers 201 with this Location and/or {"id": created_id}; DELETE 204; .../fail 500."""

    def respond(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path.endswith("/fail"):
            return web.json_response({"error": "hostile failure"}, status=500)
        if request.method == "POST":
            payload = {} if created_id is _NO_ID else {"id": created_id}
            headers = {} if location is None else {"Location": location}
            return web.json_response(payload, status=201, headers=headers)
        if request.method == "DELETE":
            return web.Response(status=204)
        return web.json_response({"error": "not found"}, status=404)

    return respond


# --- the gateway in front of them ----------------------------------------------------------------


def gateway_config(
    tmp_path: Path, legacy_url: str, ledger_url: str, overrides: dict[str, Any] | None = None
) -> GatewayConfig:
    """The demo routing (/orders -> legacy, /accounts and /tx -> ledger, /legacy strips its prefix)."""
    data = demo_config_data(legacy_url, ledger_url, journal=str(tmp_path / "journal.sqlite3"))
    return parse_config(deep_merge(deep_merge(data, FAST_ROLLBACK), overrides or {}), "<test>")


async def start_gateway(aiohttp_client: Any, config: GatewayConfig) -> Client:
    client: Client = await aiohttp_client(create_app(config))
    return client


def item(method: str, operation: str, body: Any = None) -> dict[str, Any]:
    single: dict[str, Any] = {"method": method, "operation": operation}
    if body is not None:
        single["body"] = body
    return {"SingleItem": single}


@dataclass
class Answer:
    batch_id: str
    outcome: str
    detail: str
    rollback: list[str]
    """Per item: executed | rolled_back | rollback_failed | failed | skipped."""
    http: list[int | None]
    why: list[str]
    """Per item: its rollback detail, else the gateway's error for it, else the skip reason."""


async def send_atomic(
    client: Client, *items: dict[str, Any], headers: dict[str, str] | None = None
) -> Answer:
    document = {"Batch": {"batch_execution_type": "Serial", "items": list(items)}}
    async with client.post("/batch/v1", json=document, headers={**ATOMIC, **(headers or {})}) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    rollback, http, why = [], [], []
    for node in answer["Batch"]["items"]:
        [(kind, fields)] = node["SingleItem"].items()
        rollback.append(fields["rollback"])
        http.append(fields["status"] if kind == "Result" else None)
        error = fields["body"].get("error", "") if fields.get("gateway_error") else ""
        why.append(fields.get("rollback_detail") or error or fields.get("reason") or "")
    atomic = answer["atomic"]
    return Answer(answer["batch_id"], atomic["outcome"], atomic.get("detail", ""), rollback, http, why)


async def journaled(client: Client, batch_id: str) -> BatchState:
    batch = await client.app[GATEWAY].batches.journal.batch(batch_id)
    assert batch is not None
    return batch.state


async def restart(config: GatewayConfig) -> RecoveryReport:
    """What a restarted gateway runs first: recovery on a fresh journal connection and pool."""
    journal = SqliteJournal(config.journal.path)
    pool = UpstreamPool(config, max_response_bytes=config.batch.limits.max_response_bytes)
    await journal.open()
    await pool.start()
    try:
        return await Recovery(config, RouteTable(config), pool, journal).run()
    finally:
        await pool.close()
        await journal.close()


async def assert_clean_restart(config: GatewayConfig) -> None:
    report = await restart(config)
    assert report.outcomes == {} and report.needs_operator == {}


async def assert_still_serving(client: Client) -> None:
    for name in ("healthz", "readyz"):
        async with client.get(f"/_gateway/{name}") as response:
            assert response.status == 200


# === Finding 1: values that must never reach a request line or a header ============================


CREATE_THEN_FAIL = (item("POST", "/orders", {"item": "x"}), item("GET", FAIL))


async def test_a_location_with_credentials_is_never_called_and_the_client_s_token_stays_home(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    hostile = await serve(aiohttp_server, creates())
    hostile.respond = creates(location=f"http://user:pw@127.0.0.1:{hostile.port}/orders/9")
    bystander = await serve(aiohttp_server, creates())
    config = gateway_config(tmp_path, hostile.url, bystander.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *CREATE_THEN_FAIL, headers=SECRET)

    assert answer.outcome == "rollback_incomplete"
    assert answer.rollback == ["rollback_failed", "failed"]
    assert "undo not sent" in answer.why[0] and "credentials" in answer.why[0]
    assert "/Batch/items/0" in answer.detail
    # no undo: only the two forward calls, each with the client's own token and nothing else
    assert hostile.calls() == [("POST", "/orders"), ("GET", FAIL)]
    assert [s.headers.getall("Authorization") for s in hostile.seen] == [["Bearer secret"]] * 2
    assert bystander.seen == []
    await assert_still_serving(client)
    assert await journaled(client, answer.batch_id) is BatchState.ROLLBACK_INCOMPLETE
    await assert_clean_restart(config)


async def test_a_created_id_with_cr_lf_never_becomes_a_request_line(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    hostile = await serve(aiohttp_server, creates(created_id="9\r\nX-Evil: 1"))
    config = gateway_config(tmp_path, hostile.url, hostile.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *CREATE_THEN_FAIL, headers=SECRET)

    assert answer.outcome == "rollback_incomplete"
    assert answer.rollback == ["rollback_failed", "failed"]
    assert "undo not sent" in answer.why[0] and "control characters" in answer.why[0]
    assert hostile.calls() == [("POST", "/orders"), ("GET", FAIL)]
    assert not any("X-Evil" in s.headers for s in hostile.seen)
    await assert_still_serving(client)
    assert await journaled(client, answer.batch_id) is BatchState.ROLLBACK_INCOMPLETE
    await assert_clean_restart(config)


def ledger_with_token(token_body: dict[str, Any]) -> Responder:
    """A transactional upstream (the demo's ledger contract) whose begin answers `token_body`."""

    def respond(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method == "POST" and request.path == "/tx":
            return web.json_response(token_body, status=201)
        if request.method == "POST" and request.path.startswith("/tx/"):
            return web.json_response({"status": "done"})
        if request.path.endswith("/fail"):
            return web.json_response({"error": "hostile failure"}, status=500)
        if request.method == "POST":
            return web.json_response({"id": "1"}, status=201)
        return web.json_response({"error": "not found"}, status=404)

    return respond


TOKEN_BATCH = (item("POST", "/accounts", {"owner": "x"}), item("GET", "/accounts/fail"))
BAD_TOKEN = "ab\u0001cd"


async def test_a_token_with_a_control_character_is_never_sent_and_the_batch_fails_cleanly(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    ledger = await serve(aiohttp_server, ledger_with_token({"token": BAD_TOKEN}))
    legacy = await serve(aiohttp_server, creates())
    config = gateway_config(tmp_path, legacy.url, ledger.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *TOKEN_BATCH, headers=SECRET)

    assert answer.outcome in ("rolled_back", "rollback_incomplete")
    assert answer.rollback == ["failed", "skipped"]
    assert answer.http[0] == 502 and "token" in answer.why[0]
    # the forward call was never sent; no request carried the token in a header
    assert ("POST", "/accounts") not in ledger.calls()
    assert ledger.calls()[0] == ("POST", "/tx")
    assert not any("X-Transaction-Token" in s.headers for s in ledger.seen)
    assert not any(method == "POST" and path.endswith("/commit") for method, path in ledger.calls())
    assert legacy.seen == []
    await assert_still_serving(client)
    assert await journaled(client, answer.batch_id) is BatchState(answer.outcome)
    await assert_clean_restart(config)


async def test_a_token_with_a_control_character_is_rolled_back_by_its_path(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    ledger = await serve(aiohttp_server, ledger_with_token({"token": BAD_TOKEN}))
    legacy = await serve(aiohttp_server, creates())
    config = gateway_config(tmp_path, legacy.url, ledger.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *TOKEN_BATCH, headers=SECRET)

    assert ledger.calls() == [("POST", "/tx"), ("POST", "/tx/ab%01cd/rollback")]
    assert answer.outcome == "rolled_back", answer.detail
    assert answer.rollback == ["failed", "skipped"]
    assert await journaled(client, answer.batch_id) is BatchState.ROLLED_BACK
    await assert_clean_restart(config)


HEADER_ONLY_ROLLBACK = {
    "upstreams": {"ledger": {"transactions": {"rollback": {"method": "POST", "path": "/tx/rollback"}}}}
}


async def test_a_token_with_surrounding_spaces_never_names_another_transaction(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    ledger = await serve(aiohttp_server, ledger_with_token({"token": " abc "}))
    legacy = await serve(aiohttp_server, creates())
    config = gateway_config(tmp_path, legacy.url, ledger.url, HEADER_ONLY_ROLLBACK)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *TOKEN_BATCH, headers=SECRET)

    assert answer.rollback == ["failed", "skipped"]
    assert not any("X-Transaction-Token" in s.headers for s in ledger.seen), "'abc' is not ' abc '"
    assert answer.outcome == "rollback_incomplete"


@pytest.mark.parametrize("token", ["..", "."])
async def test_a_token_whose_end_path_would_be_refused_is_refused_before_any_call_in_it(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, token: str
) -> None:
    ledger = await serve(aiohttp_server, ledger_with_token({"token": token}))
    legacy = await serve(aiohttp_server, creates())
    config = gateway_config(tmp_path, legacy.url, ledger.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *TOKEN_BATCH, headers=SECRET)

    assert ("POST", "/accounts") not in ledger.calls()
    assert answer.rollback == ["failed", "skipped"]


NO_TOKEN = [{}, {"token": None}, {"token": True}, {"token": ""}, {"token": ["a"]}]


@pytest.mark.parametrize("token_body", NO_TOKEN)
async def test_a_begin_without_a_usable_token_is_reported_as_possibly_left_open(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, token_body: dict[str, Any]
) -> None:
    ledger = await serve(aiohttp_server, ledger_with_token(token_body))
    legacy = await serve(aiohttp_server, creates())
    config = gateway_config(tmp_path, legacy.url, ledger.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *TOKEN_BATCH, headers=SECRET)

    assert answer.outcome == "rollback_incomplete"
    assert "may be left open" in answer.detail and "ledger" in answer.detail
    assert answer.rollback == ["failed", "skipped"]
    assert answer.http[0] == 502 and "token" in answer.why[0]
    assert ledger.calls() == [("POST", "/tx")]
    assert await journaled(client, answer.batch_id) is BatchState.ROLLBACK_INCOMPLETE
    await assert_clean_restart(config)


# --- a journal poisoned by an older gateway (or a bug) -------------------------------------------


def created_intent(upstream_url: str) -> dict[str, Any]:
    """A journaled POST /orders intent, shaped like coordinator._intent writes it."""
    return {
        "where": "/Batch/items/0", "upstream": "legacy", "method": "POST",
        "url": f"{upstream_url}/orders", "path": "/orders", "scope": "/orders",
        "headers": [], "body_b64": "", "undo": UndoSpec(kind=UndoKind.DELETE_CREATED).to_json(),
    }


CREATED_7 = {"status": 201, "headers": [["Location", "/orders/7"]], "body_b64": ""}
POISONED = ("bad-undo-kind", "weird-state", "unparsable-intent")


async def poison(path: str, upstream_url: str) -> None:
    """One healthy unfinished batch plus three records no gateway can act on."""
    journal = SqliteJournal(path)
    await journal.open()
    try:
        for batch_id in ("healthy", *POISONED):
            await journal.batch_state(batch_id, BatchState.RUNNING)
            intent = created_intent(upstream_url)
            if batch_id == "bad-undo-kind":
                intent["undo"] = {"kind": "nonsense"}
            await journal.step_intent(batch_id, 0, intent)
            await journal.step_outcome(batch_id, 0, "done", CREATED_7, 1)
    finally:
        await journal.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE batches SET state='weird' WHERE batch_id='weird-state'")
        db.execute("UPDATE steps SET intent='{not json' WHERE batch_id='unparsable-intent'")
    db.close()


def journal_states(path: str) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT batch_id, state FROM batches").fetchall()
    db.close()
    return dict(rows)


async def test_start_up_recovery_survives_a_poisoned_journal_and_recovers_the_healthy_batch(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    upstream = await serve(aiohttp_server, creates())
    config = gateway_config(tmp_path, upstream.url, upstream.url)
    await poison(config.journal.path, upstream.url)

    client = await start_gateway(aiohttp_client, config)  # start-up recovery runs here

    await assert_still_serving(client)
    assert upstream.calls() == [("DELETE", "/orders/7")]  # the healthy batch's undo, once
    assert journal_states(config.journal.path) == {
        "healthy": "rolled_back", **{batch_id: "rollback_incomplete" for batch_id in POISONED},
    }
    await assert_clean_restart(config)
    assert upstream.calls() == [("DELETE", "/orders/7")]


async def test_recovery_reports_the_poisoned_batches_for_an_operator(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    upstream = await serve(aiohttp_server, creates())
    config = gateway_config(tmp_path, upstream.url, upstream.url)
    await poison(config.journal.path, upstream.url)

    report = await restart(config)

    assert report.outcomes == {
        "healthy": BatchState.ROLLED_BACK, **{b: BatchState.ROLLBACK_INCOMPLETE for b in POISONED}
    }
    assert set(report.needs_operator) == set(POISONED)
    assert "unreadable" in report.needs_operator["bad-undo-kind"]
    assert upstream.calls() == [("DELETE", "/orders/7")]


# === Finding 2: compressed snapshots are restored as the bytes they stand for =======================


ORIGINAL = b'{"id": "1", "item": "original", "note": "caf\xc3\xa9"}'
ORIGINAL_TYPE = "application/vnd.legacy+json; charset=utf-8"


class CompressingOrders:
    """/orders/1 on an upstream that compresses its answers.

    polite: gzip when Accept-Encoding allows it; stubborn: gzip even when asked for identity;
    corrupt: says gzip, sends garbage; br: a coding the gateway cannot decode.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.record = (ORIGINAL, ORIGINAL_TYPE)

    def __call__(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path.endswith("/fail"):
            return web.json_response({"error": "hostile failure"}, status=500)
        if request.path != "/orders/1" or request.method not in ("GET", "PUT"):
            return web.json_response({"error": "not found"}, status=404)
        if request.method == "PUT":
            self.record = (body, request.headers.get("Content-Type", ""))
        return self.encoded(request, *self.record)

    def encoded(self, request: web.Request, body: bytes, content_type: str) -> web.Response:
        accepts_gzip = "gzip" in request.headers.get("Accept-Encoding", "")
        if self.mode == "polite" and not accepts_gzip:
            return web.Response(body=body, headers={"Content-Type": content_type})
        coded = {
            "polite": ("gzip", gzip.compress(body)),
            "stubborn": ("gzip", gzip.compress(body)),
            "corrupt": ("gzip", b"\x1f\x8b\x08\x00 this is not gzip"),
            "br": ("br", b"\x1b\x03\x00\xf8\xa5\x00"),
        }
        coding, payload = coded[self.mode]
        return web.Response(body=payload, headers={"Content-Type": content_type, "Content-Encoding": coding})


GZIP_CLIENT = {**SECRET, "Accept-Encoding": "gzip"}
PUT_THEN_FAIL = (item("PUT", "/orders/1", {"item": "changed"}), item("GET", FAIL))


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
async def test_a_gzipped_snapshot_is_restored_as_its_original_bytes_and_content_type(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, mode: str
) -> None:
    orders = CompressingOrders(mode)
    hostile = await serve(aiohttp_server, orders)
    config = gateway_config(tmp_path, hostile.url, hostile.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *PUT_THEN_FAIL, headers=GZIP_CLIENT)

    assert answer.outcome == "rolled_back", answer.detail
    assert answer.rollback == ["rolled_back", "failed"]
    snapshot, forward, failing, undo = hostile.seen
    assert [(s.method, s.raw_path) for s in (snapshot, forward, failing, undo)] == [
        ("GET", "/orders/1"), ("PUT", "/orders/1"), ("GET", FAIL), ("PUT", "/orders/1"),
    ]
    assert forward.headers["Accept-Encoding"] == "gzip"  # the client's own wish, on its own call
    assert snapshot.headers["Accept-Encoding"] == "identity"
    assert undo.headers["Accept-Encoding"] == "identity"
    assert undo.body == ORIGINAL
    assert undo.headers["Content-Type"] == ORIGINAL_TYPE
    assert "Content-Encoding" not in undo.headers
    assert orders.record == (ORIGINAL, ORIGINAL_TYPE)
    assert await journaled(client, answer.batch_id) is BatchState.ROLLED_BACK
    await assert_clean_restart(config)


@pytest.mark.parametrize(("mode", "why"), [("corrupt", "corrupt"), ("br", "'br'")])
async def test_a_snapshot_that_cannot_be_decoded_stops_the_call_before_it_is_sent(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, mode: str, why: str
) -> None:
    orders = CompressingOrders(mode)
    hostile = await serve(aiohttp_server, orders)
    config = gateway_config(tmp_path, hostile.url, hostile.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *PUT_THEN_FAIL, headers=GZIP_CLIENT)

    assert hostile.calls() == [("GET", "/orders/1")]  # the PUT was never sent
    assert answer.outcome == "rolled_back", answer.detail
    assert answer.rollback == ["failed", "skipped"]
    assert answer.http == [502, None]
    assert "not sent" in answer.why[0] and "snapshot" in answer.why[0] and why in answer.why[0]
    assert orders.record == (ORIGINAL, ORIGINAL_TYPE)
    assert await journaled(client, answer.batch_id) is BatchState.ROLLED_BACK
    await assert_clean_restart(config)


# === Finding 3: undo targets stay in the forward call's route ======================================


ESCAPING_LOCATIONS = [
    pytest.param("/internal-admin/users/1", "leaves '/orders'", id="same-host-outside-route"),
    pytest.param("/orders/../admin/1", "dot segments", id="dot-dot"),
    pytest.param("/orders/%2e%2e/admin", "dot segments", id="encoded-dot-dot"),
    pytest.param("//evil.example/orders/1", "scheme-relative", id="scheme-relative"),
    pytest.param("http://127.0.0.1:{other}/orders/1", "outside the upstream", id="other-port"),
    pytest.param("urn:uuid:7", "refused", id="no-host"),
]


@pytest.mark.parametrize(("location", "why"), ESCAPING_LOCATIONS)
async def test_a_location_outside_the_route_is_never_called(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, location: str, why: str
) -> None:
    bystander = await serve(aiohttp_server, creates())  # a configured upstream, at another port
    hostile = await serve(aiohttp_server, creates(location=location.format(other=bystander.port)))
    config = gateway_config(tmp_path, hostile.url, bystander.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *CREATE_THEN_FAIL, headers=SECRET)

    assert answer.outcome == "rollback_incomplete"
    assert answer.rollback == ["rollback_failed", "failed"]
    assert "undo not sent" in answer.why[0] and why in answer.why[0]
    assert hostile.calls() == [("POST", "/orders"), ("GET", FAIL)]
    assert bystander.seen == []
    assert await journaled(client, answer.batch_id) is BatchState.ROLLBACK_INCOMPLETE
    await assert_clean_restart(config)


@pytest.mark.parametrize(
    ("created_id", "undo_path"),
    [("a?b", "/orders/a%3Fb"), ("a#b", "/orders/a%23b"), ("a b", "/orders/a%20b"), (42, "/orders/42")],
)
async def test_a_created_id_is_deleted_as_exactly_one_percent_encoded_segment(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, created_id: Any, undo_path: str
) -> None:
    hostile = await serve(aiohttp_server, creates(created_id=created_id))
    config = gateway_config(tmp_path, hostile.url, hostile.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *CREATE_THEN_FAIL, headers=SECRET)

    assert answer.outcome == "rolled_back", answer.detail
    assert answer.rollback == ["rolled_back", "failed"]
    [undo] = hostile.received("DELETE")
    assert (undo.raw_path, undo.query) == (undo_path, "")
    assert undo.headers["Idempotency-Key"] == f"{answer.batch_id}.0.undo"
    assert undo.headers["Authorization"] == "Bearer secret"
    assert await journaled(client, answer.batch_id) is BatchState.ROLLED_BACK
    await assert_clean_restart(config)


@pytest.mark.parametrize("created_id", ["..", "../../x", "%2e%2e", "."])
async def test_a_dot_id_never_leaves_the_collection(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, created_id: str
) -> None:
    hostile = await serve(aiohttp_server, creates(created_id=created_id))
    config = gateway_config(tmp_path, hostile.url, hostile.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(client, *CREATE_THEN_FAIL, headers=SECRET)

    deletes = hostile.received("DELETE")
    for undo in deletes:  # encoded as one segment under /orders/, or not sent at all
        assert_one_segment_under(undo.raw_path, "/orders/")
    if deletes:
        assert answer.rollback == ["rolled_back", "failed"]
    else:
        assert answer.outcome == "rollback_incomplete"
        assert answer.rollback == ["rollback_failed", "failed"]
        assert "undo not sent" in answer.why[0]
    assert all(path.startswith("/orders") for _, path in hostile.calls())
    assert await journaled(client, answer.batch_id) is BatchState(answer.outcome)
    await assert_clean_restart(config)


def assert_one_segment_under(raw_path: str, collection: str) -> None:
    assert raw_path.startswith(collection), raw_path
    segment = raw_path[len(collection) :]
    assert segment and "/" not in segment and unquote(segment) not in (".", "..") and "\\" not in segment


@pytest.mark.parametrize(
    ("location", "undo"),
    [
        pytest.param("/elsewhere/1", None, id="outside-base"),
        pytest.param("/base/../elsewhere/1", None, id="dot-dot-out-of-base"),
        pytest.param("/base", None, id="the-base-itself"),
        pytest.param("/basement/orders/1", None, id="prefix-lookalike"),
        pytest.param("/base/orders/9", "/base/orders/9", id="inside-base"),
    ],
)
async def test_with_an_upstream_base_path_a_location_outside_it_is_refused(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path, location: str, undo: str | None
) -> None:
    hostile = await serve(aiohttp_server, creates(location=location))
    # /legacy strips its prefix: POST /legacy/orders is POST <base>/orders on the upstream
    config = gateway_config(tmp_path, hostile.url + "/base", hostile.url)
    client = await start_gateway(aiohttp_client, config)

    answer = await send_atomic(
        client, item("POST", "/legacy/orders", {"item": "x"}), item("GET", "/legacy/orders/fail"),
        headers=SECRET,
    )

    forward = [("POST", "/base/orders"), ("GET", "/base/orders/fail")]
    if undo is None:
        assert answer.outcome == "rollback_incomplete"
        assert answer.rollback == ["rollback_failed", "failed"]
        assert "undo not sent" in answer.why[0] and "refused" in answer.why[0]
        assert hostile.calls() == forward
    else:
        assert answer.outcome == "rolled_back", answer.detail
        assert hostile.calls() == [*forward, ("DELETE", undo)]
    assert await journaled(client, answer.batch_id) is BatchState(answer.outcome)
    await assert_clean_restart(config)


# === Properties: random hostile values =============================================================


PORT, OTHER_PORT = 18080, 18081
"""The pure property's upstream is never called: its port only appears in URLs."""

_PIECES = st.sampled_from([
    "orders", "base", "1", "9", "..", ".", "%2e%2e", "%2E%2e", ".%2e", "%2f", "%2F..", "", "a b",
    "%00", "%0d%0a", "\\", "@", ":", "?x=1", "#frag", "é", "%", "%zz", ";", "a\x00b", "\t", "~",
])
_PATHS = st.builds(
    lambda lead, pieces: lead + "/".join(pieces),
    st.sampled_from(["/", "//", "", "/base/", "/base/orders/", "\\", "/orders/"]),
    st.lists(_PIECES, max_size=6),
)
_AUTHORITIES = st.sampled_from([
    f"127.0.0.1:{PORT}", f"127.0.0.1:{OTHER_PORT}", "127.0.0.1", f"localhost:{PORT}",
    f"user:pw@127.0.0.1:{PORT}", f"user@127.0.0.1:{PORT}", f":pw@127.0.0.1:{PORT}", "evil.example",
    f"127.0.0.1:{PORT}@evil.example", f"evil.example#@127.0.0.1:{PORT}", f"[::1]:{PORT}",
    f"127.0.0.1:{PORT}\r\nX-Evil: 1", "[]", f"[::1]:{PORT}@",
])
_ABSOLUTE = st.builds(
    lambda scheme, authority, path: f"{scheme}://{authority}{path}",
    st.sampled_from(["http", "https", "HTTP", "ftp", "javascript", ""]), _AUTHORITIES, _PATHS,
)
_LONG = st.builds(
    lambda n, piece: "/base/orders/" + piece * n, st.integers(500, 3000), st.sampled_from(["a", "%2e", "/"])
)
_UNDER_ORDERS = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from(["/base/orders/", f"http://127.0.0.1:{PORT}/base/orders/", "orders/", "../orders/"]),
    st.text(max_size=30),
)
_SCHEME_ONLY = st.builds(
    lambda scheme, rest: f"{scheme}:{rest}",
    st.sampled_from(["urn", "mailto", "orders", "http", "data", "0"]), st.text(max_size=20),
)
LOCATIONS = st.one_of(st.text(max_size=60), _PATHS, _ABSOLUTE, _LONG, _UNDER_ORDERS, _SCHEME_ONLY)
_HOSTILE_IDS = ["..", ".", "../../x", "a?b", "a#b", "a b", "%2e%2e", "a/b", "9\r\nX-Evil: 1", "x" * 300]
IDS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    | st.sampled_from(_HOSTILE_IDS),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=5,
)
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")


def property_config(tmp_path: Path) -> GatewayConfig:
    base = f"http://127.0.0.1:{PORT}/base"
    return gateway_config(tmp_path, base, f"http://127.0.0.1:{OTHER_PORT}")


def post_intent(routes: RouteTable) -> dict[str, Any]:
    """The journaled intent of POST /orders, built from the real route as coordinator._intent does."""
    routed = routes.route("POST", parse_target("/orders"))
    return {
        "where": "/Batch/items/0", "upstream": routed.upstream, "method": "POST", "url": str(routed.url),
        "path": routed.path, "scope": routed.scope, "headers": [["X-Own", "1"]], "body_b64": "",
        "undo": UndoSpec(kind=UndoKind.DELETE_CREATED).to_json(),
    }


def created_outcome(location: str | None, created_id: Any) -> dict[str, Any]:
    """A 201 as encode_response journals it."""
    headers = [] if location is None else [["Location", location]]
    body = json.dumps({} if created_id is _NO_ID else {"id": created_id}).encode()
    return {"status": 201, "headers": headers, "body_b64": base64.b64encode(body).decode("ascii")}


def assert_confined(url: URL) -> None:
    """On the upstream's origin, no userinfo, under <base>/orders/, no dot segment or control char."""
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", PORT), url
    assert url.user is None and url.password is None
    assert url.raw_query_string == "" and url.raw_fragment == ""
    raw = url.raw_path
    assert raw.startswith("/base/orders/") and len(raw) > len("/base/orders/"), raw
    assert "//" not in raw and not _CONTROL_OR_SPACE.search(raw)
    decoded = unquote(raw)
    assert not any(segment in (".", "..") for segment in decoded.split("/")), raw
    assert "\\" not in decoded and not re.search(r"[\x00-\x1f\x7f]", decoded)
    again = URL(str(url))  # what aiohttp parses when it builds the request line
    assert again.origin() == url.origin() and again.path == url.path and again.raw_query_string == ""


@settings(max_examples=40, deadline=None)
@given(location=st.none() | LOCATIONS, created_id=st.just(_NO_ID) | IDS)
def test_any_undo_built_from_a_hostile_answer_stays_under_the_collection(
    tmp_path_factory: pytest.TempPathFactory, location: str | None, created_id: Any
) -> None:
    from gateway.atomicity.compensation import CallContext, UndoImpossible, undo_call

    config = property_config(tmp_path_factory.getbasetemp())
    routes = RouteTable(config)
    ctx = CallContext(routes, (("Authorization", "Bearer secret"), ("X-Forwarded-For", "127.0.0.1")), 1 << 20)
    try:
        call = undo_call(post_intent(routes), created_outcome(location, created_id), ctx, "b.0.undo")
    except UndoImpossible as exc:
        event(f"refused: {str(exc).rsplit(': ', 1)[-1][:40]}")
        return
    event("undo built")
    assert call is not None and call.method == "DELETE" and call.body is None
    assert_confined(call.url)
    if not location:  # built from the id: exactly one segment that decodes to the id
        segment = call.url.raw_path.removeprefix("/base/orders/")
        assert "/" not in segment and unquote(segment) == str(created_id)
    for name, value in call.headers:
        assert _FIELD_VALUE.fullmatch(name) and _FIELD_VALUE.fullmatch(value), (name, value)
    assert dict(call.headers)["Authorization"] == "Bearer secret"


@pytest.mark.parametrize("location", ["urn:uuid:7", "orders:1", "mailto:x@y", f"http://[::1]:{PORT}@"])
def test_a_location_yarl_cannot_resolve_is_refused_as_undo_impossible(
    tmp_path: Path, location: str
) -> None:
    from gateway.atomicity.compensation import CallContext, UndoImpossible, undo_call

    routes = RouteTable(property_config(tmp_path))
    with pytest.raises(UndoImpossible, match="refused"):
        undo_call(post_intent(routes), created_outcome(location, _NO_ID), CallContext(routes, (), 1024), "k")


TOKENS = st.one_of(
    st.text(max_size=40), st.integers(), st.none(), st.booleans(), st.floats(),
    st.lists(st.text(max_size=3), max_size=2),
    st.sampled_from(["ab\u0001cd", "a\r\nX-Evil: 1", "../x", "a/b", "%2e%2e", "x" * 1100, "tok en", "é"]),
)


@settings(max_examples=40, deadline=None)
@given(token=TOKENS)
def test_a_begin_token_is_refused_or_safe_to_send_in_a_header(
    tmp_path_factory: pytest.TempPathFactory, token: Any
) -> None:
    from gateway.atomicity.tx_calls import TransactionFailed, read_token, token_problem
    from gateway.model import SubResponse

    config = property_config(tmp_path_factory.getbasetemp())
    settings_ = config.upstreams["ledger"].transactions
    assert settings_ is not None
    body = json.dumps({"token": token}).encode()
    response = SubResponse(201, "Created", (("Content-Type", "application/json"),), body)
    try:
        value = read_token(settings_, response)
    except TransactionFailed:
        return
    assert value == str(token)
    if token_problem(value) is None:
        assert re.fullmatch(r"[\x21-\x7e]{1,1024}", value), value


# --- end to end: the real gateway in front of an upstream that answers random hostile values -------


@dataclass
class World:
    """One hostile upstream (serving both legacy and ledger), a bystander upstream and a gateway."""

    hostile: Hostile
    bystander: Hostile
    client: Client
    config: GatewayConfig

    def reset(self, respond: Responder) -> None:
        self.hostile.seen.clear()
        self.hostile.respond = respond


@pytest.fixture
async def world(aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path) -> World:
    """Built once per test function: Hypothesis runs all its examples against the same world."""
    hostile = await serve(aiohttp_server, creates())
    bystander = await serve(aiohttp_server, creates())
    config = gateway_config(tmp_path, hostile.url, hostile.url, {
        "upstreams": {"bystander": {"url": bystander.url, "infer_compensations": True}},
        "routes": [
            {"prefix": "/orders", "upstream": "legacy"},
            {"prefix": "/accounts", "upstream": "ledger"},
            {"prefix": "/bystander", "upstream": "bystander"},
        ],
    })
    return World(hostile, bystander, await start_gateway(aiohttp_client, config), config)


def location_for(world: World, location: str) -> str:
    """The generated Location aimed at this world: its ports, no base path; and servable by aiohttp
    (which answers 500 instead of sending CR, LF or NUL in a header)."""
    aimed = location.replace(str(PORT), str(world.hostile.port))
    aimed = aimed.replace(str(OTHER_PORT), str(world.bystander.port))
    return re.sub(r"[\r\n\x00]", "", aimed.replace("/base", ""))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(location=LOCATIONS, created_id=st.just(_NO_ID) | IDS)
async def test_a_hostile_location_never_takes_the_gateway_outside_the_route(
    world: World, location: str, created_id: Any
) -> None:
    world.reset(creates(location=location_for(world, location), created_id=created_id))

    answer = await send_atomic(world.client, *CREATE_THEN_FAIL, headers=SECRET)

    assert answer.outcome in ("rolled_back", "rollback_incomplete")
    assert (answer.outcome == "rolled_back") == (answer.rollback[0] in ("rolled_back", "failed"))
    assert world.hostile.calls()[0] == ("POST", "/orders")
    for seen in world.hostile.seen[1:]:
        assert (seen.method, seen.raw_path) == ("GET", FAIL) or seen.method == "DELETE", seen
    for undo in world.hostile.received("DELETE"):
        assert undo.raw_path.startswith("/orders/") and undo.query == "" and "//" not in undo.raw_path
        assert not any(segment in (".", "..") for segment in unquote(undo.raw_path).split("/"))
    if answer.rollback[0] == "rolled_back":
        assert len(world.hostile.received("DELETE")) == 1
    assert world.bystander.seen == []
    assert await journaled(world.client, answer.batch_id) is BatchState(answer.outcome)
    await assert_clean_restart(world.config)


_ROLLBACK_PATH = re.compile(r"/tx/([^/]+)/rollback")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=TOKENS)
async def test_a_hostile_token_is_never_smuggled_and_never_reported_rolled_back_unless_it_was(
    world: World, token: Any
) -> None:
    world.reset(ledger_with_token({"token": token}))

    answer = await send_atomic(world.client, *TOKEN_BATCH, headers=SECRET)

    assert answer.outcome in ("rolled_back", "rollback_incomplete")
    assert world.hostile.calls()[0] == ("POST", "/tx")
    rolled_back = False
    for seen in world.hostile.seen:
        for value in seen.headers.getall("X-Transaction-Token", []):
            # only a token of visible characters travels in a header, exactly as it came
            assert value == str(token) and _FIELD_VALUE.fullmatch(value)
        rollback = _ROLLBACK_PATH.fullmatch(seen.raw_path)
        if rollback is not None:
            assert unquote(rollback.group(1)) == str(token)
            rolled_back = True
        else:
            assert seen.raw_path in ("/tx", "/accounts", "/accounts/fail"), seen
    if answer.outcome == "rolled_back":  # reported only when the upstream was told to roll back
        assert rolled_back
    assert world.bystander.seen == []
    assert await journaled(world.client, answer.batch_id) is BatchState(answer.outcome)
    await assert_clean_restart(world.config)
