"""The dependency-graph engine (gateway/graph_execution.py) through BatchService.run_graph, with
GraphBatch objects built directly (no wire codec), against real loopback upstreams.

Scheduling is observed at the upstream (a barrier that only opens when N calls are in flight, and
start/end events), failures by the upstreams' call logs and state, groups by the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.atomicity.recovery import Recovery
from gateway.atomicity.state import BatchState
from gateway.batch_service import BatchService
from gateway.demo.services import FaultRule
from gateway.errors import ClientError, ForbiddenTarget, MalformedBatch, PayloadTooLarge, Uncompensable
from gateway.graph_execution import location_target, validate_graph
from gateway.graph_model import (
    AnsweredItem,
    FailurePolicy,
    GraphBatch,
    GraphItem,
    GraphResult,
    ReferenceUnresolved,
    Unmet,
)
from gateway.model import BatchOutcome, ItemResult, RollbackStatus, Skipped, SubRequest, SubResponse
from gateway.planning import OuterRequest, Planner
from gateway.routing import RouteTable
from gateway.runtime import GATEWAY
from tests.conftest import MakeGateway, state_of

Client = TestClient[web.Request, web.Application]
EVENTS = web.AppKey("events", list)
ARRIVED = web.AppKey("arrived", dict)
FAST_ROLLBACK: dict[str, Any] = {
    "batch": {"rollback": {"attempts": 3, "initial_backoff": 0.005, "max_backoff": 0.02}}
}


# --- a probe upstream: a barrier, start/end events, a Location of our choosing -----------------


def probe_app() -> web.Application:
    """Served under /svc (its configured base path): `/svc/step/{name}` records start and end,
    `/svc/barrier/{n}` answers 200 only once n calls are in it together (else 500 after 5 s),
    `/svc/created?loc=` answers 201 with that Location."""
    app = web.Application()
    app[EVENTS] = []
    app[ARRIVED] = {"count": 0, "event": asyncio.Event()}

    async def step(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        request.app[EVENTS].append(("start", name))
        await asyncio.sleep(0.02)
        request.app[EVENTS].append(("end", name))
        return web.json_response({"step": name}, status=int(request.query.get("status", "200")))

    async def barrier(request: web.Request) -> web.Response:
        arrived = request.app[ARRIVED]
        name = request.query.get("name", "?")
        request.app[EVENTS].append(("start", name))
        arrived["count"] += 1
        if arrived["count"] >= int(request.match_info["n"]):
            arrived["event"].set()
        try:
            await asyncio.wait_for(arrived["event"].wait(), 5)
        except TimeoutError:
            return web.json_response({"error": "barrier not reached"}, status=500)
        finally:
            request.app[EVENTS].append(("end", name))
        return web.json_response({"in_flight_together": arrived["count"]})

    async def created(request: web.Request) -> web.Response:
        request.app[EVENTS].append(("start", "created"))
        return web.json_response({}, status=201, headers={"Location": request.query["loc"]})

    async def anything(request: web.Request) -> web.Response:
        request.app[EVENTS].append(("start", request.path))
        return web.json_response({"path": request.path, "method": request.method})

    app.add_routes([
        web.get("/svc/step/{name}", step),
        web.get("/svc/barrier/{n}", barrier),
        web.post("/svc/created", created),
        web.route("*", "/svc/things/{tail:.*}", anything),
    ])
    return app


@pytest.fixture
async def probe(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(probe_app())
    return server


@pytest.fixture
async def gateway(make_gateway: MakeGateway, probe: TestServer) -> Client:
    return await make_gateway({
        **FAST_ROLLBACK,
        "upstreams": {"probe": {"url": str(probe.make_url("/svc")), "infer_compensations": False}},
        "routes": [
            {"prefix": "/orders", "upstream": "legacy"},
            {"prefix": "/echo", "upstream": "legacy"},
            {"prefix": "/legacy", "upstream": "legacy", "strip_prefix": True},
            {"prefix": "/accounts", "upstream": "ledger"},
            {"prefix": "/ledger", "upstream": "ledger", "strip_prefix": True},
            {"prefix": "/probe", "upstream": "probe", "strip_prefix": True},
        ],
    })


def service_of(client: Client) -> BatchService:
    return client.app[GATEWAY].batches


def outer(**headers: str) -> OuterRequest:
    return OuterRequest(headers=CIMultiDict(headers), raw_query="", client_ip="127.0.0.1", proto="http",
                        host="gw.test", request_id="req-1")


def item(
    item_id: str, method: str, target: str, body: Any = None, *, deps: tuple[str, ...] = (),
    group: str | None = None, refs: bool = False,
) -> GraphItem:
    data = None if body is None else json.dumps(body).encode()
    headers = () if body is None else (("Content-Type", "application/json"),)
    request = SubRequest(method, target, headers, data, where=f"/requests/{item_id}")
    return GraphItem(item_id, request, deps, group, refs)


def resolve(item: GraphItem, answered: Mapping[str, AnsweredItem]) -> SubRequest:
    """`$<id>` as the target's first segment: that answer's Location (as a gateway target)."""
    target = item.request.target
    if target.startswith("$"):
        name, slash, rest = target[1:].partition("/")
        answer = answered.get(name)
        if answer is None or answer.location_target is None:
            raise ReferenceUnresolved(f"${name}: no Location into the gateway's routes")
        target = answer.location_target + slash + rest
    return replace(item.request, target=target)


async def run(
    client: Client, *items: GraphItem, headers: dict[str, str] | None = None, **options: Any
) -> GraphResult:
    graph = GraphBatch(items=items, resolver=resolve, **options)
    service = service_of(client)
    return await service.run_graph(graph, outer(**(headers or {})), batch_id="bgraph1", kind="graph")


def by_id(result: GraphResult) -> dict[str, ItemResult | Unmet]:
    return dict(result.items)


def status(found: ItemResult | Unmet) -> int:
    assert isinstance(found, ItemResult) and isinstance(found.outcome, SubResponse), found
    return found.outcome.status


def unmet(found: ItemResult | Unmet) -> Unmet:
    assert isinstance(found, Unmet), found
    return found


def dependency_of(found: ItemResult | Unmet) -> str | None:
    """The dependency an Unmet item names (it must be an Unmet for a failed dependency)."""
    assert not unmet(found).unresolved
    return unmet(found).dependency


def result_of(found: ItemResult | Unmet) -> ItemResult:
    assert isinstance(found, ItemResult), found
    return found


def body(found: ItemResult | Unmet) -> Any:
    assert isinstance(found, ItemResult) and isinstance(found.outcome, SubResponse), found
    return json.loads(found.outcome.body)


def events(server: TestServer) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = server.app[EVENTS]
    return found


def paths(server: TestServer) -> list[str]:
    return [f"{call['method']} {call['path']}" for call in state_of(server).calls]


# --- scheduling --------------------------------------------------------------------------------


async def test_independent_items_run_concurrently_and_a_dependent_waits_for_all(
    gateway: Client, probe: TestServer
) -> None:
    result = await run(
        gateway,
        item("a", "GET", "/probe/barrier/3?name=a"),
        item("b", "GET", "/probe/barrier/3?name=b"),
        item("c", "GET", "/probe/barrier/3?name=c"),
        item("d", "GET", "/probe/step/d", deps=("a", "b", "c")),
    )
    found = by_id(result)
    # the barrier opens only when all three are in flight at once: a 200 proves they overlapped
    assert [status(found[name]) for name in "abc"] == [200, 200, 200]
    assert status(found["d"]) == 200
    seen = events(probe)
    assert seen.index(("start", "d")) > max(seen.index(("end", name)) for name in "abc")


async def test_a_chain_runs_in_order(gateway: Client, probe: TestServer) -> None:
    result = await run(
        gateway,
        item("a", "GET", "/probe/step/a"),
        item("b", "GET", "/probe/step/b", deps=("a",)),
        item("c", "GET", "/probe/step/c", deps=("b",)),
    )
    assert [status(found) for _, found in result.items] == [200, 200, 200]
    assert events(probe) == [
        ("start", "a"), ("end", "a"), ("start", "b"), ("end", "b"), ("start", "c"), ("end", "c"),
    ]


async def test_a_failed_root_leaves_its_whole_subtree_unmet_and_unsent(
    gateway: Client, legacy: TestServer
) -> None:
    result = await run(
        gateway,
        item("root", "GET", "/echo/root?status=500"),
        item("child", "GET", "/echo/child", deps=("root",)),
        item("grandchild", "POST", "/echo/grandchild", {"x": 1}, deps=("child",)),
        item("other", "GET", "/echo/other"),
        item("mixed", "GET", "/echo/mixed", deps=("other", "root")),
        item("fine", "GET", "/echo/fine", deps=("other",)),
    )
    found = by_id(result)
    assert status(found["root"]) == 500
    assert dependency_of(found["child"]) == "root"
    assert dependency_of(found["grandchild"]) == "child"
    assert dependency_of(found["mixed"]) == "root"
    assert "'root'" in unmet(found["child"]).reason and "500" in unmet(found["child"]).reason
    assert status(found["other"]) == 200 and status(found["fine"]) == 200
    assert sorted(paths(legacy)) == ["GET /echo/fine", "GET /echo/other", "GET /echo/root?status=500"]
    assert result.groups == () and result.batch_id == "bgraph1"


async def test_stop_policy_leaves_everything_not_yet_started_unmet(
    gateway: Client, legacy: TestServer
) -> None:
    result = await run(
        gateway,
        item("early", "GET", "/echo/early"),
        item("bad", "GET", "/echo/bad?status=404"),
        item("after", "GET", "/echo/after", deps=("bad",)),
        item("later", "GET", "/echo/later", deps=("early", "after")),
        on_failure=FailurePolicy.STOP,
    )
    found = by_id(result)
    assert status(found["early"]) == 200 and status(found["bad"]) == 404
    for name in ("after", "later"):
        unmet = found[name]
        assert isinstance(unmet, Unmet) and unmet.dependency is None and not unmet.unresolved
        assert "stopped after 'bad' failed" in unmet.reason
    assert sorted(paths(legacy)) == ["GET /echo/bad?status=404", "GET /echo/early"]


async def test_sequential_mode_runs_one_unit_after_the_other_in_client_order(
    gateway: Client, probe: TestServer
) -> None:
    result = await run(
        gateway,
        item("x", "GET", "/probe/step/x"),
        item("y", "GET", "/probe/step/y"),
        item("z", "GET", "/probe/step/z?status=500"),
        item("w", "GET", "/probe/step/w"),
        sequential=True,
    )
    assert [status(found) for _, found in result.items] == [200, 200, 500, 200]
    assert events(probe) == [
        ("start", "x"), ("end", "x"), ("start", "y"), ("end", "y"),
        ("start", "z"), ("end", "z"), ("start", "w"), ("end", "w"),
    ]


async def test_sequential_with_stop_answers_nothing_after_the_failure(
    gateway: Client, probe: TestServer
) -> None:
    result = await run(
        gateway,
        item("x", "GET", "/probe/step/x?status=500"),
        item("y", "GET", "/probe/step/y"),
        sequential=True, on_failure=FailurePolicy.STOP,
    )
    assert status(by_id(result)["x"]) == 500
    assert unmet(by_id(result)["y"]).dependency is None
    assert events(probe) == [("start", "x"), ("end", "x")]


# --- references --------------------------------------------------------------------------------


async def test_a_reference_is_resolved_from_the_location_of_a_created_order(
    gateway: Client, legacy: TestServer
) -> None:
    result = await run(
        gateway,
        item("order", "POST", "/orders", {"item": "widget"}),
        item("line", "PATCH", "$order", {"qty": 3}, deps=("order",), refs=True),
        item("again", "GET", "$order", deps=("line", "order"), refs=True),
        item("stripped", "POST", "/legacy/orders", {"item": "via strip"}),
        item("read", "GET", "$stripped", deps=("stripped",), refs=True),
    )
    found = by_id(result)
    assert status(found["order"]) == 201 and status(found["line"]) == 200
    created = body(found["order"])["id"]
    assert state_of(legacy).store.records[created] == {"item": "widget", "qty": 3, "id": created}
    assert body(found["again"]) == {"item": "widget", "qty": 3, "id": created}
    # a Location (/orders/N on the upstream) maps back through the route it came by
    assert body(found["read"])["item"] == "via strip"
    assert f"GET /orders/{body(found['stripped'])['id']}" in paths(legacy)


async def test_a_location_pointing_to_another_host_is_not_followed(
    gateway: Client, probe: TestServer, legacy: TestServer
) -> None:
    result = await run(
        gateway,
        item("made", "POST", "/probe/created?loc=http://evil.example/svc/things/1"),
        item("follow", "GET", "$made", deps=("made",), refs=True),
        item("after", "GET", "/echo/after", deps=("follow",)),
    )
    found = by_id(result)
    assert status(found["made"]) == 201
    follow = found["follow"]
    assert isinstance(follow, Unmet) and follow.unresolved and "no Location" in follow.reason
    assert dependency_of(found["after"]) == "follow"
    assert events(probe) == [("start", "created")] and paths(legacy) == []


async def test_a_location_inside_the_upstream_maps_back_into_the_gateway(
    gateway: Client, probe: TestServer
) -> None:
    origin = str(probe.make_url("")).rstrip("/")
    result = await run(
        gateway,
        item("made", "POST", f"/probe/created?loc={origin}/svc/things/7"),
        item("follow", "DELETE", "$made/lines", deps=("made",), refs=True),
    )
    assert body(by_id(result)["follow"]) == {"path": "/svc/things/7/lines", "method": "DELETE"}


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/svc/things/7", "/probe/things/7"),
        ("/svc/things/7?x=1", "/probe/things/7?x=1"),
        ("{origin}/svc/things/7", "/probe/things/7"),
        ("/svc", "/probe"),
        ("/other/things/7", None),  # outside the upstream's base path
        ("things/7", None),  # relative: not origin-relative
        ("//evil.example/svc/things/7", None),
        ("http://evil.example/svc/things/7", None),
        ("{origin_other_port}/svc/things/7", None),
        ("http://user:pw@{host}/svc/things/7", None),
        ("/svc/things/../../admin", None),
        ("/svc/things/%2e%2e/x", None),
        ("/svc/things/7#frag", None),
        ("/svc/things/a b", None),
        ("/svc/" + "a" * 3000, None),
    ],
)
async def test_location_target_only_maps_locations_into_the_routed_upstream(
    gateway: Client, probe: TestServer, location: str, expected: str | None
) -> None:
    config = gateway.app[GATEWAY].config
    routes = RouteTable(config)
    origin = str(probe.make_url("")).rstrip("/")
    host = f"{probe.host}:{probe.port}"
    location = location.format(origin=origin, host=host, origin_other_port=f"http://{probe.host}:1")
    planned = Planner(routes).bind(outer()).call(SubRequest("POST", "/probe/created"), 0)
    answer = SubResponse(201, headers=(("Location", location),))
    assert location_target(routes, planned, answer) == expected
    assert location_target(routes, planned, SubResponse(201)) is None


# --- atomic groups -----------------------------------------------------------------------------


def seed(legacy: TestServer, ledger: TestServer) -> tuple[dict[str, Any], dict[str, Any]]:
    for key in ("1", "2"):
        state_of(legacy).store.put(key, {"item": f"order {key}"})
        state_of(ledger).store.put(key, {"owner": f"account {key}", "balance": 10})
    return state_of(legacy).store.snapshot(), state_of(ledger).store.snapshot()


async def test_an_atomic_group_whose_last_call_fails_leaves_every_upstream_as_it_was(
    gateway: Client, legacy: TestServer, ledger: TestServer
) -> None:
    before = seed(legacy, ledger)
    result = await run(
        gateway,
        item("before", "GET", "/echo/before"),
        item("o1", "POST", "/orders", {"item": "new"}, group="g"),
        item("o2", "PUT", "/orders/1", {"item": "replaced"}, group="g"),
        item("a1", "POST", "/accounts", {"owner": "new"}, group="g"),
        item("a2", "PATCH", "/accounts/2", {"balance": 99}, group="g"),
        item("bad", "PATCH", "/orders/404", {"item": "missing"}, group="g"),
        item("after", "GET", "/echo/after", deps=("g",)),
        item("member_dep", "GET", "/echo/member", deps=("o1",)),
    )
    found = by_id(result)
    assert result.groups == (("g", BatchOutcome.ROLLED_BACK),)
    assert result.group_batches == (("g", "bgraph1"),)
    assert status(found["bad"]) == 404 and result_of(found["bad"]).rollback is RollbackStatus.FAILED
    for name in ("o1", "o2", "a1", "a2"):
        assert result_of(found[name]).rollback is RollbackStatus.ROLLED_BACK, (name, found[name])
    assert dependency_of(found["after"]) == "g"
    assert dependency_of(found["member_dep"]) == "o1"
    assert (state_of(legacy).store.snapshot(), state_of(ledger).store.snapshot()) == before
    assert state_of(ledger).transactions == {}
    assert "GET /echo/after" not in paths(legacy) and "GET /echo/member" not in paths(legacy)


async def test_a_group_with_a_reference_inside_it_commits_or_rolls_back_as_one(
    gateway: Client, legacy: TestServer, ledger: TestServer
) -> None:
    before = seed(legacy, ledger)
    committed = await run(
        gateway,
        item("order", "POST", "/orders", {"item": "widget"}, group="g1"),
        item("line", "PATCH", "$order", {"qty": 2}, deps=("order",), group="g1", refs=True),
        item("then", "GET", "$order", deps=("g1", "order"), refs=True),
    )
    found = by_id(committed)
    assert committed.groups == (("g1", BatchOutcome.COMMITTED),)
    created = body(found["order"])["id"]
    assert result_of(found["line"]).rollback is RollbackStatus.EXECUTED
    assert body(found["then"]) == {"item": "widget", "qty": 2, "id": created}

    state_of(legacy).store.delete(created)
    state_of(legacy).calls.clear()
    rolled = await run(
        gateway,
        item("order", "POST", "/orders", {"item": "gadget"}, group="g2"),
        item("line", "PATCH", "$order", {"qty": 5}, deps=("order",), group="g2", refs=True),
        item("nowhere", "GET", "$line/missing", deps=("line",), group="g2", refs=True),
        item("late", "POST", "/orders", {"item": "never"}, group="g2"),
    )
    found = by_id(rolled)
    assert rolled.groups == (("g2", BatchOutcome.ROLLED_BACK),)
    assert result_of(found["order"]).rollback is RollbackStatus.ROLLED_BACK
    assert result_of(found["line"]).rollback is RollbackStatus.ROLLED_BACK
    nowhere = found["nowhere"]  # a PATCH answer has no Location: unresolved, not sent
    assert isinstance(nowhere, Unmet) and nowhere.unresolved
    late = found["late"]  # members after the failure: as the coordinator reports them
    assert isinstance(late, ItemResult) and isinstance(late.outcome, Skipped)
    assert late.rollback is RollbackStatus.SKIPPED
    assert state_of(legacy).store.snapshot() == before[0]
    assert not any("missing" in path for path in paths(legacy))


async def test_a_member_whose_resolved_call_cannot_be_made_atomic_fails_the_group(
    gateway: Client, legacy: TestServer, ledger: TestServer
) -> None:
    before = seed(legacy, ledger)
    result = await run(
        gateway,
        item("order", "POST", "/orders", {"item": "widget"}, group="g"),
        item("lock", "LOCK", "$order", deps=("order",), group="g", refs=True),
    )
    found = by_id(result)
    assert result.groups == (("g", BatchOutcome.ROLLED_BACK),)
    lock = found["lock"]
    assert isinstance(lock, ItemResult) and lock.outcome.failed
    assert "cannot be made atomic" in str(lock.outcome)
    assert state_of(legacy).store.snapshot() == before[0]
    assert not any(path.startswith("LOCK") for path in paths(legacy))


async def test_independent_groups_run_concurrently_each_journaled_as_its_own_batch(
    gateway: Client, probe: TestServer, legacy: TestServer
) -> None:
    result = await run(
        gateway,
        item("a", "GET", "/probe/barrier/2?name=a", group="ga"),
        item("b", "GET", "/probe/barrier/2?name=b", group="gb"),
        item("c", "POST", "/orders", {"item": "c"}, group="gc", deps=("ga", "gb")),
    )
    found = by_id(result)
    assert status(found["a"]) == 200 and status(found["b"]) == 200  # the barrier needed both
    assert result.groups == tuple((g, BatchOutcome.COMMITTED) for g in ("ga", "gb", "gc"))
    assert result.group_batches == (("ga", "bgraph1.1"), ("gb", "bgraph1.2"), ("gc", "bgraph1.3"))
    journal = service_of(gateway).journal
    record = await journal.batch("bgraph1.3")
    assert record is not None and record.state is BatchState.COMMITTED
    assert [(step.position, step.intent["where"], step.intent["method"]) for step in record.steps] == [
        (0, "/requests/c", "POST"),
    ]


async def test_a_crashed_group_is_recovered_from_its_journal_like_any_atomic_batch(
    gateway: Client, legacy: TestServer, ledger: TestServer
) -> None:
    before = seed(legacy, ledger)
    hold = FaultRule(path_prefix="/orders/2", method="PATCH", delay_ms=10_000, times=1)
    state_of(legacy).faults.append(hold)
    service = service_of(gateway)
    running = asyncio.ensure_future(run(
        gateway,
        item("free", "GET", "/echo/free"),
        item("o1", "POST", "/orders", {"item": "new"}, group="g"),
        item("o2", "PUT", "/orders/1", {"item": "replaced"}, group="g"),
        item("o3", "PATCH", "/orders/2", {"item": "held"}, group="g"),
        headers={"Authorization": "Bearer t"},
    ))
    for _ in range(500):  # until the upstream holds the group's last call
        if "PATCH /orders/2" in paths(legacy):
            break
        await asyncio.sleep(0.01)
    # the process "dies": the group's run stops where it is, nothing rolls it back
    for task in list(service._in_flight):
        task.cancel()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    journal = service.journal
    record = await journal.batch("bgraph1")
    assert record is not None and record.state is BatchState.RUNNING
    assert [step.position for step in record.steps] == [0, 1, 2]
    assert [step.intent["where"] for step in record.steps] == ["/requests/o1", "/requests/o2", "/requests/o3"]
    assert ("X-Request-ID", "req-1") in record.headers  # what every call inherits, once per batch
    owner = journal.owner_of(["Bearer t"])
    assert await journal.batch_id_for("req-1", owner) == "bgraph1"  # found by the client's request id
    looked_up = await journal.lookup("bgraph1", owner)
    assert looked_up is not None and [step.where for step in looked_up.steps] == [
        "/requests/o1", "/requests/o2", "/requests/o3",
    ]
    assert state_of(legacy).store.snapshot() != before[0]

    config = gateway.app[GATEWAY].config
    report = await Recovery(config, RouteTable(config), gateway.app[GATEWAY].pool, journal).run()
    assert report.outcomes == {"bgraph1": BatchState.ROLLED_BACK} and report.clean
    assert state_of(legacy).store.snapshot() == before[0]


# --- validation: nothing is sent ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "error", "where"),
    [
        ((item("a", "GET", "/echo/1"), item("a", "GET", "/echo/2")), MalformedBatch, "/requests/a"),
        ((item("a", "GET", "/echo/1", deps=("b",)), item("b", "GET", "/echo/2")),
         MalformedBatch, "/requests/a"),
        ((item("a", "GET", "/echo/1", deps=("a",)),), MalformedBatch, "/requests/a"),
        ((item("a", "GET", "/echo/1", deps=("nope",)),), MalformedBatch, "/requests/a"),
        ((item("a", "GET", "/echo/1", group="g"), item("b", "GET", "/echo/2"),
          item("c", "GET", "/echo/3", group="g")), MalformedBatch, "/requests/c"),
        ((item("a", "GET", "/echo/1", group="g"), item("b", "GET", "/echo/2", group="g", deps=("g",))),
         MalformedBatch, "/requests/b"),
        ((item("a", "GET", "/echo/1", group="g", deps=("b",)), item("b", "GET", "/echo/2", group="g")),
         MalformedBatch, "/requests/a"),
        ((item("a", "GET", "/echo/1"), item("b", "GET", "//evil.example/x")), ForbiddenTarget, "/requests/b"),
        ((item("a", "GET", "/echo/1"), item("b", "GET", "/nowhere")), ForbiddenTarget, "/requests/b"),
        ((item("a", "POST", "/orders", {}, group="g"), item("b", "LOCK", "/orders/1", group="g")),
         Uncompensable, "/requests/b"),
    ],
)
async def test_a_bad_graph_is_refused_before_any_call(
    gateway: Client, legacy: TestServer, items: tuple[GraphItem, ...], error: type[ClientError], where: str
) -> None:
    with pytest.raises(error) as raised:
        await run(gateway, *items)
    assert raised.value.where == where
    assert paths(legacy) == []
    assert await service_of(gateway).journal.batch("bgraph1") is None


async def test_more_items_than_limits_max_items_is_refused(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    client = await make_gateway({"batch": {"limits": {"max_items": 2}}})
    with pytest.raises(PayloadTooLarge):
        await run(client, *(item(f"i{n}", "GET", "/echo/x") for n in range(3)))
    assert paths(legacy) == []


# --- the validator, by property ----------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> tuple[GraphItem, ...]:
    """Random valid graphs: adjacent groups, dependencies on earlier ids and earlier closed groups."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=6))
    items: list[GraphItem] = []
    closed_groups: list[str] = []
    for block, size in enumerate(sizes):
        grouped = size > 1 or draw(st.booleans())
        group = f"g{block}" if grouped else None
        for _ in range(size):
            earlier = [found.id for found in items]
            deps: list[str] = []
            if earlier:
                deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3))
            on_group: bool = draw(st.booleans())
            if closed_groups and on_group:
                deps.append(draw(st.sampled_from(closed_groups)))
            items.append(item(f"i{len(items)}", "GET", "/echo/x", deps=tuple(deps), group=group))
        if group is not None:
            closed_groups.append(group)
    return tuple(items)


@given(dags())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_dags_are_accepted(graph: tuple[GraphItem, ...]) -> None:
    units = validate_graph(GraphBatch(items=graph), 1000)
    assert [found for unit in units for _, found in unit.members] == list(graph)


@given(dags(), st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_forward_references_and_cycles_are_refused(graph: tuple[GraphItem, ...], data: st.DataObject) -> None:
    items = list(graph)
    i = data.draw(st.integers(0, len(items) - 1))
    j = data.draw(st.integers(i, len(items) - 1))  # j == i: a self-dependency, the smallest cycle
    items[i] = replace(items[i], depends_on=(*items[i].depends_on, items[j].id))
    if i != j and data.draw(st.booleans()):  # close the cycle the other way too
        items[j] = replace(items[j], depends_on=(*items[j].depends_on, items[i].id))
    with pytest.raises(MalformedBatch) as raised:
        validate_graph(GraphBatch(items=tuple(items)), 1000)
    assert raised.value.where == f"/requests/{items[i].id}"
