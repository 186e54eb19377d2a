"""Crash points for the dialects' atomic groups (issue 17 on the crash loop of issue 18).

A Salesforce Composite `allOrNone` request (committing and failing), an OData 4.01 JSON atomicity
group (failing) and an OData V4 multipart change set (committing) span the compensated `legacy` and
the transactional `ledger` upstream, and their later calls use references to earlier answers
(`@{order.id}`, `$1`). Such a call is planned late: resolved, planned and given its undo by the
coordinator's `prepare` hook just before it is sent. As in tests/test_crash_points.py, a real gateway
process runs the request with GATEWAY_TEST_CRASH_AFTER_WRITE=N or GATEWAY_TEST_CRASH_BEFORE_WRITE=N
(SIGKILL right after / before its Nth journal write for the batch) for every N until the batch
completes, and recovery runs from the journal alone. With upstreams that honour Idempotency-Key every
crash point ends all-or-nothing, no transaction left open, the journal saying what recovery did; and
what the killed process journaled of a late-planned call is the call as resolved (its URL and body,
never a reference), so recovery can replay and undo it. The after-write and before-write crash
points run in two lanes side by side, each on upstreams of its own, to keep the module's time down.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from gateway.atomicity.journal import CrashPoint, JournaledBatch, SqliteJournal
from gateway.atomicity.recovery import with_recovery
from gateway.atomicity.state import BatchState
from gateway.config import parse_config
from gateway.demo.services import ledger_app, legacy_app
from tests.conftest import deep_merge, state_of
from tests.test_crash_points import MAX_WRITES, CrashRun, records, reset, seed
from tests.test_crash_recovery import GatewayProcess

pytestmark = pytest.mark.slow

COMPOSITE_PATH = "/services/data/v59.0/composite"
ODATA_PATH = "/odata/$batch"


@dataclasses.dataclass(frozen=True)
class Request:
    """One dialect request: where it goes, what is sent, and what its compensated calls look like
    as sent: (method, upstream path) -> the JSON body (the journal must hold these, references
    resolved)."""

    path: str
    headers: dict[str, str]
    body: bytes
    resolved: dict[tuple[str, str], Any]


def json_request(path: str, document: dict[str, Any], resolved: dict[tuple[str, str], Any]) -> Request:
    return Request(path, {"Content-Type": "application/json"}, json.dumps(document).encode(), resolved)


def change_set(
    resolved: dict[tuple[str, str], Any], *requests: tuple[str, str, str, dict[str, Any]]
) -> Request:
    """An OData V4 multipart `$batch` with one change set of (Content-ID, method, URL, body)."""
    parts = []
    for content_id, method, url, body in requests:
        text = json.dumps(body)
        parts.append(
            "--cs\nContent-Type: application/http\nContent-Transfer-Encoding: binary\n"
            f"Content-ID: {content_id}\n\n{method} {url} HTTP/1.1\nContent-Type: application/json\n"
            f"Content-Length: {len(text)}\n\n{text}\n"
        )
    payload = "--batch_x\nContent-Type: multipart/mixed; boundary=cs\n\n" + "".join(parts)
    payload += "--cs--\n--batch_x--\n"
    return Request(
        ODATA_PATH,
        {"Content-Type": "multipart/mixed; boundary=batch_x", "OData-Version": "4.0"},
        payload.replace("\n", "\r\n").encode(),
        resolved,
    )


# Seeded: orders 1..3 on legacy, accounts 1..3 on ledger; the created order and account are 4.
# Every call after the GET is planned late: its URL or body refers to an earlier answer. The POSTs
# are undone by deleting what they created, the PUT of the existing order 1 from its snapshot, the
# ledger's calls by rolling its transaction back.
COMPOSITE_CALLS: tuple[dict[str, Any], ...] = (
    {"method": "GET", "url": "/orders/1", "referenceId": "existing"},
    {"method": "POST", "url": "/orders", "referenceId": "order", "body": {"item": "@{existing.item} copy"}},
    {
        "method": "POST", "url": "/accounts", "referenceId": "account",
        "body": {"owner": "created", "order": "@{order.id}"},
    },
    {
        "method": "PUT", "url": "/orders/@{existing.id}", "referenceId": "change",
        "body": {"item": "changed", "account": "@{account.id}", "copy": "@{order.id}"},
    },
    {"method": "PATCH", "url": "/accounts/@{account.id}", "referenceId": "fund", "body": {"balance": 7}},
)
COMPOSITE_RESOLVED = {
    ("POST", "/orders"): {"item": "order 1 copy"},
    ("PUT", "/orders/1"): {"item": "changed", "account": "4", "copy": "4"},
}
COMPOSITE_COMMITTING = json_request(
    COMPOSITE_PATH, {"allOrNone": True, "compositeRequest": list(COMPOSITE_CALLS)}, COMPOSITE_RESOLVED
)
COMPOSITE_FAILING = json_request(
    COMPOSITE_PATH,
    {
        "allOrNone": True,
        "compositeRequest": [
            *COMPOSITE_CALLS, {"method": "GET", "url": "/accounts/999", "referenceId": "missing"}  # 404
        ],
    },
    COMPOSITE_RESOLVED,
)

# One atomicity group: create an order, change it through `$1` (its Location), create an account,
# then a 404 rolls the group back.
ODATA_FAILING = json_request(
    ODATA_PATH,
    {
        "requests": [
            {
                "id": "1", "atomicityGroup": "g", "method": "post", "url": "/orders",
                "body": {"item": "created"},
            },
            {
                "id": "2", "atomicityGroup": "g", "dependsOn": ["1"], "method": "patch", "url": "$1",
                "body": {"item": "changed"},
            },
            {
                "id": "3", "atomicityGroup": "g", "method": "post", "url": "/accounts",
                "body": {"owner": "created"},
            },
            {"id": "4", "atomicityGroup": "g", "method": "get", "url": "/accounts/999"},  # 404
        ]
    },
    {("POST", "/orders"): {"item": "created"}, ("PATCH", "/orders/4"): {"item": "changed"}},
)

# The same create-then-use flow as an OData V4 multipart change set that commits.
ODATA_CHANGE_SET = change_set(
    {("POST", "/orders"): {"item": "created"}, ("PATCH", "/orders/4"): {"item": "changed"}},
    ("1", "POST", "/orders", {"item": "created"}),
    ("2", "PATCH", "$1", {"item": "changed"}),
    ("3", "POST", "/accounts", {"owner": "created"}),
)


@dataclasses.dataclass
class Ending:
    """How one crashed request ended after recovery (as in test_crash_points), and what the killed
    process had journaled of each call: `journaled` holds (method, upstream path, step state)."""

    where: str
    state: BatchState | None  # None: killed before the batch's first journal write
    detail: str
    applied: str  # "nothing" | "everything" | "partly"
    open_transactions: int
    journaled: tuple[tuple[str, str, str], ...]


async def send(base: str, request: Request) -> tuple[int, dict[str, str], bytes] | None:
    """(status, headers, body) of the answer, or None when the gateway died before answering."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(
                f"{base}{request.path}", data=request.body, headers=request.headers
            ) as response:
                return response.status, dict(response.headers), await response.read()
        except aiohttp.ClientError:
            return None


async def read_batch(path: Path) -> JournaledBatch | None:
    journal = SqliteJournal(path)
    await journal.open()
    try:
        summaries = await journal.summaries(everything=True)
        return await journal.batch(summaries[0].batch_id) if summaries else None
    finally:
        await journal.close()


def check_resolved(request: Request, batch: JournaledBatch) -> tuple[tuple[str, str, str], ...]:
    """Each journaled call is the call as sent: no reference left in its URL or body, and the
    resolved body itself (recovery replays a call whose outcome it does not know with its
    Idempotency-Key); returns (method, upstream path, step state) of each."""
    journaled = []
    for step in batch.steps:
        intent = step.intent
        body = base64.b64decode(intent["body_b64"]).decode()
        for text in (intent["url"], intent["path"], body):
            assert "@{" not in text and "%40%7B" not in text.upper() and "$1" not in text, intent
        assert intent["replayable"], intent  # the upstreams honour Idempotency-Key: bodies kept
        key = (intent["method"], intent["path"])
        assert json.loads(body) == request.resolved[key], intent
        journaled.append((intent["method"], intent["path"], step.state))
    return tuple(journaled)


DIALECTS = {"batch": {"composite": {"path": COMPOSITE_PATH}, "odata": {"path": ODATA_PATH}}}


class DialectCrashRun(CrashRun):
    """test_crash_points' CrashRun (one gateway process per crash point, fresh journal and upstream
    state) sending a dialect request, and reading the journal as the killed process left it."""

    def _gateway(self) -> tuple[GatewayProcess, dict[str, Any]]:
        """The crash run's gateway with the Composite and OData endpoints enabled."""
        gateway, data = super()._gateway()
        data = deep_merge(data, DIALECTS)
        gateway.config.write_text(yaml.safe_dump(data))
        return gateway, data

    async def baseline_of(
        self, request: Request
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], tuple[int, dict[str, str], bytes]]:
        """(records before, records after, the answer) of the request run without a crash."""
        reset(self.legacy, self.keys)
        reset(self.ledger, self.keys)
        seed(self.legacy, self.ledger)
        before = records(self.legacy, self.ledger)
        gateway, _ = self._gateway()
        await gateway.serve()
        try:
            sent = await send(gateway.base, request)
        finally:
            await gateway.stop()
        assert sent is not None, gateway.output()
        return before, records(self.legacy, self.ledger), sent

    async def killed_at(
        self, variable: str, n: int, request: Request
    ) -> tuple[GatewayProcess, dict[str, Any]] | None:
        """Send the request to a gateway that SIGKILLs itself at the crash point (fresh upstream
        state); its process and config, or None when the request completed (no Nth write)."""
        reset(self.legacy, self.keys)
        reset(self.ledger, self.keys)
        seed(self.legacy, self.ledger)
        gateway, data = self._gateway()
        gateway.env = {variable: str(n)}
        await gateway.serve()
        if await send(gateway.base, request) is not None:
            await gateway.stop()
            return None
        assert await gateway.wait() == -9, gateway.output()
        return gateway, data

    async def crash_with(
        self, variable: str, n: int, request: Request,
        before: list[dict[str, Any]], after: list[dict[str, Any]],
    ) -> Ending | None:
        """Run the request with a crash point; None when it completed (no Nth write)."""
        killed = await self.killed_at(variable, n, request)
        if killed is None:
            return None
        gateway, data = killed
        crashed = await read_batch(gateway.journal)  # what the killed process journaled
        journaled = () if crashed is None else check_resolved(request, crashed)
        report = await with_recovery(parse_config(data))
        batch = await read_batch(gateway.journal)
        now = records(self.legacy, self.ledger)
        applied = "nothing" if now == before else "everything" if now == after else "partly"
        where = f"{'after' if variable == CrashPoint.AFTER else 'before'} write {n}"
        open_txs = len(state_of(self.ledger).transactions)
        if batch is None:
            return Ending(where, None, "", applied, open_txs, journaled)
        assert crashed is not None and batch.batch_id == crashed.batch_id
        assert batch.state.final, (where, batch)
        assert report.outcomes.get(batch.batch_id, batch.state) is batch.state  # what recovery says
        if not crashed.state.final:  # recovery finished it, and the journal says so
            assert report.outcomes[batch.batch_id] is batch.state, (where, report)
        return Ending(where, batch.state, batch.detail or "", applied, open_txs, journaled)


@pytest.fixture
async def lanes(
    legacy: TestServer, ledger: TestServer, aiohttp_server: Any, tmp_path: Path
) -> tuple[DialectCrashRun, DialectCrashRun]:
    """Two crash runs on upstream pairs of their own: the after-write and the before-write crash
    points run side by side (each point still gets its own process, journal and upstream state),
    which keeps the module within its time on two cores."""
    second: tuple[TestServer, TestServer] = (
        await aiohttp_server(legacy_app()), await aiohttp_server(ledger_app())
    )
    return (
        DialectCrashRun(legacy, ledger, tmp_path / "after", keys=True),
        DialectCrashRun(*second, tmp_path / "before", keys=True),
    )


async def crash_everywhere(
    lanes: tuple[DialectCrashRun, DialectCrashRun], request: Request, outcome: str
) -> tuple[bytes, list[Ending]]:
    """(the answer's body without a crash, how every crash point ended), after- and before-write points
    in their own lane each."""
    before, after, answer = await lanes[0].baseline_of(request)
    status, headers, body = answer
    assert headers.get("X-Batch-Outcome") == outcome, answer
    assert status == 200, answer

    async def every_write(run: DialectCrashRun, variable: str) -> list[Ending]:
        endings: list[Ending] = []
        for n in range(1, MAX_WRITES):
            ending = await run.crash_with(variable, n, request, before, after)
            if ending is None:
                return endings
            endings.append(ending)
        raise AssertionError("the request never completed")

    after_write, before_write = await asyncio.gather(
        every_write(lanes[0], CrashPoint.AFTER), every_write(lanes[1], CrashPoint.BEFORE)
    )
    return body, after_write + before_write


def assert_all_or_nothing(endings: list[Ending], committing: bool) -> None:
    for ending in endings:
        assert ending.state in (BatchState.COMMITTED, BatchState.ROLLED_BACK, None), ending
        expected = "everything" if ending.state is BatchState.COMMITTED else "nothing"
        assert ending.applied == expected, ending
        assert ending.open_transactions == 0, ending
    states = {e.state for e in endings}
    if committing:  # before the commit point rolled back, past it rolled forward
        assert {BatchState.COMMITTED, BatchState.ROLLED_BACK} <= states
    else:
        assert states == {BatchState.ROLLED_BACK, None}


@pytest.mark.parametrize(
    ("request_", "outcome", "statuses"),
    [
        (COMPOSITE_COMMITTING, "committed", [200, 201, 201, 200, 200]),
        (COMPOSITE_FAILING, "rolled_back", [400, 400, 400, 400, 400, 404]),
    ],
    ids=["committing", "failing"],
)
async def test_composite_all_or_none_with_references_ends_all_or_nothing_at_every_crash_point(
    lanes: tuple[DialectCrashRun, DialectCrashRun], request_: Request, outcome: str, statuses: list[int]
) -> None:
    body, endings = await crash_everywhere(lanes, request_, outcome)
    answer = json.loads(body)
    assert [a["httpStatusCode"] for a in answer["compositeResponse"]] == statuses, answer
    assert len(endings) >= 24  # both modes, every write of the request
    assert_all_or_nothing(endings, committing=outcome == "committed")
    # the loop caught each late-planned compensated call in flight (intent journaled, outcome not)
    # and after it completed; recovery undid it from the journal either way
    for call in COMPOSITE_RESOLVED:
        states = {state for e in endings for m, p, state in e.journaled if (m, p) == call}
        assert {"intent", "done"} <= states, (call, endings)


async def test_odata_atomicity_group_with_a_reference_ends_all_or_nothing_at_every_crash_point(
    lanes: tuple[DialectCrashRun, DialectCrashRun],
) -> None:
    body, endings = await crash_everywhere(lanes, ODATA_FAILING, "rolled_back")
    answer = json.loads(body)
    assert [r["status"] for r in answer["responses"]] == [424, 424, 424, 404], answer
    assert len(endings) >= 20
    assert_all_or_nothing(endings, committing=False)
    for call in ODATA_FAILING.resolved:
        states = {state for e in endings for m, p, state in e.journaled if (m, p) == call}
        assert {"intent", "done"} <= states, (call, endings)


async def test_odata_change_set_with_a_reference_ends_all_or_nothing_at_every_crash_point(
    lanes: tuple[DialectCrashRun, DialectCrashRun],
) -> None:
    body, endings = await crash_everywhere(lanes, ODATA_CHANGE_SET, "committed")
    assert body.count(b"HTTP/1.1 201") == 2 and body.count(b"HTTP/1.1 200") == 1, body
    assert len(endings) >= 20
    assert_all_or_nothing(endings, committing=True)
    for call in ODATA_CHANGE_SET.resolved:
        states = {state for e in endings for m, p, state in e.journaled if (m, p) == call}
        assert {"intent", "done"} <= states, (call, endings)


# Two atomicity groups of one OData batch, the second waiting for the first: `a` creates an order
# on legacy and commits; `b` creates an account on ledger and fails (404), so it rolls back. They
# are journaled as `<batch id>.1` and `.2`; the crash points count the writes of both groups together
# (in the order they run), so they reach into `a` (b never started) and then into `b` (a committed).
ODATA_TWO_GROUPS = json_request(
    ODATA_PATH,
    {
        "requests": [
            {"id": "1", "atomicityGroup": "a", "method": "post", "url": "/orders", "body": {"item": "first"}},
            {
                "id": "2", "atomicityGroup": "b", "dependsOn": ["a"], "method": "post", "url": "/accounts",
                "body": {"owner": "second"},
            },
            {"id": "3", "atomicityGroup": "b", "method": "get", "url": "/accounts/999"},  # 404
        ]
    },
    {("POST", "/orders"): {"item": "first"}},
)


async def read_batches(path: Path) -> dict[str, JournaledBatch]:
    """Every batch in the journal, by id."""
    journal = SqliteJournal(path)
    await journal.open()
    try:
        summaries = await journal.summaries(everything=True)
        found = [await journal.batch(summary.batch_id) for summary in summaries]
        return {batch.batch_id: batch for batch in found if batch is not None}
    finally:
        await journal.close()


@dataclasses.dataclass
class GroupsEnding:
    where: str
    crashed: dict[str, BatchState]  # group (1, 2) -> state as the killed process left it
    final: dict[str, BatchState]  # group -> state after recovery
    applied: str  # "nothing" | "everything" (a's order, no account) | "partly"
    open_transactions: int


async def crash_two_groups(
    run: DialectCrashRun, variable: str, n: int, before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> GroupsEnding | None:
    killed = await run.killed_at(variable, n, ODATA_TWO_GROUPS)
    if killed is None:
        return None
    gateway, data = killed
    crashed = await read_batches(gateway.journal)
    for batch in crashed.values():
        check_resolved(ODATA_TWO_GROUPS, batch)
    await with_recovery(parse_config(data))
    final = await read_batches(gateway.journal)
    assert set(final) == set(crashed) and len({i.rsplit(".", 1)[0] for i in final}) <= 1, final
    now = records(run.legacy, run.ledger)
    return GroupsEnding(
        f"{'after' if variable == CrashPoint.AFTER else 'before'} write {n}",
        {i.rsplit(".", 1)[1]: b.state for i, b in crashed.items()},
        {i.rsplit(".", 1)[1]: b.state for i, b in final.items()},
        "nothing" if now == before else "everything" if now == after else "partly",
        len(state_of(run.ledger).transactions),
    )


async def test_two_odata_groups_each_end_all_or_nothing_at_every_crash_point_of_either(
    lanes: tuple[DialectCrashRun, DialectCrashRun],
) -> None:
    before, after, (status, headers, body) = await lanes[0].baseline_of(ODATA_TWO_GROUPS)
    assert status == 200 and headers["X-Batch-Outcome"] == "rolled_back", body
    batch_id = headers["X-Batch-Id"]
    assert headers["X-Batch-Groups"] == f"a={batch_id}.1, b={batch_id}.2"
    assert [r["status"] for r in json.loads(body)["responses"]] == [201, 424, 404], body

    async def every_write(run: DialectCrashRun, variable: str) -> list[GroupsEnding]:
        endings: list[GroupsEnding] = []
        for n in range(1, MAX_WRITES):
            ending = await crash_two_groups(run, variable, n, before, after)
            if ending is None:
                return endings
            endings.append(ending)
        raise AssertionError("the request never completed")

    after_write, before_write = await asyncio.gather(
        every_write(lanes[0], CrashPoint.AFTER), every_write(lanes[1], CrashPoint.BEFORE)
    )
    endings = after_write + before_write
    assert len(endings) >= 25  # both modes, every write of both groups
    for ending in endings:
        assert all(state.final for state in ending.final.values()), ending
        assert ending.final.get("2") in (None, BatchState.ROLLED_BACK), ending  # b never commits
        if "2" in ending.crashed:  # b had started: a was committed before it (dependsOn)
            assert ending.crashed["1"] is BatchState.COMMITTED, ending
        a_committed = ending.final.get("1") is BatchState.COMMITTED
        assert ending.applied == ("everything" if a_committed else "nothing"), ending
        assert ending.open_transactions == 0, ending
    assert {e.final.get("1") for e in endings} >= {BatchState.COMMITTED, BatchState.ROLLED_BACK}
    assert any("2" in e.crashed and not e.crashed["2"].final for e in endings), endings  # inside b
