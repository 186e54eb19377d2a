"""Prometheus metrics (issue 13): every request, proxied or batch, shows up by route, upstream,
method and status class; upstream calls by purpose; batches, rollbacks, pools, limits, journal.

Each test sends real traffic through a gateway to the demo upstreams, scrapes /_gateway/metrics
and reads the samples back with prometheus_client's own parser.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.atomicity.journal import SqliteJournal
from gateway.atomicity.state import BatchState
from gateway.demo.services import FaultRule
from gateway.metrics import GatewayMetrics
from tests.conftest import MakeConfig, MakeGateway, state_of

Client = TestClient[web.Request, web.Application]
Labels = dict[str, str]


async def scrape(client: Client) -> str:
    async with client.get("/_gateway/metrics") as response:
        assert response.status == 200
        return await response.text()


def samples(text: str, name: str, **wanted: str) -> list[tuple[Labels, float]]:
    """Every sample called `name` whose labels include `wanted`."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted.items())
    ]


def value(text: str, name: str, **wanted: str) -> float:
    """The sum over the samples matching `wanted` (0 when there is none)."""
    return sum(v for _, v in samples(text, name, **wanted))


def single(method: str, path: str, body: Any = None) -> dict[str, Any]:
    item: dict[str, Any] = {"method": method, "operation": path}
    if body is not None:
        item["body"] = body
    return {"SingleItem": item}


def batch(mode: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"Batch": {"batch_execution_type": mode, "items": list(items)}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_proxied_requests_are_counted_by_route_upstream_method_and_status_class(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway()
    for path in ("/orders", "/echo/a?status=503", "/echo/b?status=404", "/nowhere"):
        async with client.get(path) as response:
            await response.read()
    async with client.post("/orders", json={"item": "x"}) as response:
        assert response.status == 201

    text = await scrape(client)
    requests = "gateway_http_requests_total"
    assert value(text, requests, kind="proxy", route="/orders", upstream="legacy", method="GET",
                 status_class="2xx", origin="upstream") == 1
    assert value(text, requests, kind="proxy", route="/orders", method="POST", status_class="2xx") == 1
    assert value(text, requests, kind="proxy", route="/echo", status_class="5xx", origin="upstream") == 1
    assert value(text, requests, kind="proxy", route="/echo", status_class="4xx", origin="upstream") == 1
    # no route: the gateway's own 404, with no route or upstream label value a client could mint
    assert value(text, requests, kind="proxy", route="", upstream="", status_class="4xx",
                 origin="gateway") == 1
    assert value(text, "gateway_http_request_duration_seconds_count", kind="proxy", route="/orders") == 2
    # the proxied calls' own upstream series (before issue 13 only batch calls had any)
    upstream_calls = "gateway_upstream_requests_total"
    assert value(text, upstream_calls, upstream="legacy", purpose="proxy", status_class="2xx") == 2
    assert value(text, upstream_calls, upstream="legacy", purpose="proxy", status_class="5xx") == 1
    assert value(text, "gateway_upstream_request_duration_seconds_count", upstream="legacy",
                 purpose="proxy") == 4
    # nothing is left in flight or holding a pooled connection once the answers are written
    assert value(text, "gateway_upstream_requests_in_flight") == 0
    assert value(text, "gateway_upstream_pool_connections_in_use") == 0
    assert value(text, "gateway_upstream_pool_connections_limit", upstream="legacy") == 100
    assert value(text, "gateway_upstream_pool_wait_seconds_count", upstream="legacy") == 4
    # the scrape itself is in flight while it renders: one gateway request, nothing else
    assert value(text, "gateway_http_requests_in_flight", kind="gateway") == 1
    assert value(text, "gateway_http_requests_in_flight", kind="proxy") == 0


async def test_an_extension_method_is_counted_as_other_not_as_a_new_label_value(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway()
    async with client.request("PROPFIND", "/echo/x") as response:  # WebDAV: parsed, proxied
        await response.read()
    text = await scrape(client)
    methods = {labels["method"] for labels, _ in samples(text, "gateway_http_requests_total")}
    assert "PROPFIND" not in methods
    assert "other" in methods


async def test_a_batch_counts_its_sub_requests_by_outcome_and_its_size(make_gateway: MakeGateway) -> None:
    client = await make_gateway()
    document = batch(
        "Serial",
        single("GET", "/echo/1"),
        single("GET", "/accounts"),
        single("GET", "/echo/2?status=500"),
        single("GET", "/echo/3"),
    )
    async with client.post("/batch/v1", json=document) as response:
        assert response.status == 200
    text = await scrape(client)

    assert value(text, "gateway_http_requests_total", kind="batch_json", route="/batch/v1",
                 method="POST", status_class="2xx", origin="gateway") == 1
    sub = "gateway_subrequests_total"
    assert value(text, sub, upstream="legacy", status_class="2xx", outcome="executed") == 1
    assert value(text, sub, upstream="ledger", status_class="2xx", outcome="executed") == 1
    assert value(text, sub, upstream="legacy", status_class="5xx", outcome="executed") == 1
    assert value(text, sub, upstream="legacy", outcome="skipped") == 1
    assert value(text, "gateway_upstream_requests_total", purpose="subrequest") == 3
    assert value(text, "gateway_batch_subrequests_count", kind="batch_json") == 1
    assert value(text, "gateway_batch_subrequests_sum", kind="batch_json") == 4
    assert value(text, "gateway_batch_subrequests_bucket", kind="batch_json", le="2.0") == 0
    assert value(text, "gateway_batch_subrequests_bucket", kind="batch_json", le="5.0") == 1
    assert value(text, "gateway_batches_total", kind="batch_json", atomic="false", outcome="processed") == 1
    assert value(text, "gateway_batches_in_flight") == 0
    assert value(text, "gateway_batch_slot_wait_seconds_count", upstream="legacy") == 2


async def test_an_atomic_batch_that_rolls_back_shows_each_undo_and_its_journal_writes(
    make_gateway: MakeGateway, legacy: TestServer,
) -> None:
    for n in (1, 2):
        state_of(legacy).store.create({"item": f"order {n}"})
    # the undo of the POST (DELETE of the record it created, id 3) fails once and is retried
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/3", method="DELETE", status=503, times=1))
    client = await make_gateway(
        {"batch": {"rollback": {"attempts": 3, "initial_backoff": 0.005, "max_backoff": 0.01}}}
    )
    document = batch(
        "Serial",
        single("POST", "/orders", {"item": "new"}),
        single("PUT", "/orders/1", {"item": "replaced"}),
        single("GET", "/orders/404"),
    )
    async with client.post("/batch/v1", json=document, headers={"X-Batch-Atomic": "true"}) as response:
        assert response.status == 200
        assert response.headers["X-Batch-Outcome"] == "rolled_back"
    text = await scrape(client)

    sub = "gateway_subrequests_total"
    assert value(text, sub, upstream="legacy", status_class="2xx", outcome="rolled_back") == 2
    assert value(text, sub, upstream="legacy", status_class="4xx", outcome="failed") == 0
    assert value(text, sub, upstream="legacy", status_class="4xx") == 1
    assert value(text, "gateway_batches_total", kind="batch_json", atomic="true", outcome="rolled_back") == 1
    assert value(text, "gateway_rollback_actions_total", kind="compensation", result="undone") == 2
    assert value(text, "gateway_undo_retries_total", upstream="legacy") == 1
    calls = "gateway_upstream_requests_total"
    assert value(text, calls, upstream="legacy", purpose="snapshot") == 1  # before the PUT
    assert value(text, calls, upstream="legacy", purpose="undo") == 3  # PUT, DELETE 503, DELETE
    assert value(text, calls, upstream="legacy", purpose="undo", status_class="5xx") == 1
    writes = samples(text, "gateway_journal_write_duration_seconds_count")
    operations = {labels["operation"] for labels, _ in writes}
    assert {"insert_batches", "insert_steps", "update_steps"} <= operations
    assert value(text, "gateway_journal_write_bytes_sum", operation="insert_steps") > 0
    assert value(text, "gateway_batches_in_flight", atomic="true") == 0


async def test_a_transactional_batch_counts_begin_and_rollback_calls(make_gateway: MakeGateway) -> None:
    client = await make_gateway()
    document = batch("Serial", single("POST", "/accounts", {"owner": "x"}), single("GET", "/accounts/404"))
    async with client.post("/batch/v1", json=document, headers={"X-Batch-Atomic": "true"}) as response:
        assert response.headers["X-Batch-Outcome"] == "rolled_back"
    text = await scrape(client)
    calls = "gateway_upstream_requests_total"
    assert value(text, calls, upstream="ledger", purpose="begin", status_class="2xx") == 1
    assert value(text, calls, upstream="ledger", purpose="rollback", status_class="2xx") == 1
    assert value(text, calls, upstream="ledger", purpose="commit") == 0
    assert value(text, "gateway_rollback_actions_total", kind="transaction", result="undone") == 1


async def test_upstream_errors_are_counted_by_kind(make_gateway: MakeGateway, legacy: TestServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = await make_gateway({
        "upstreams": {
            "dead": {"url": dead},
            "legacy": {"timeouts": {"total": 0.3}},
        },
        "routes": [
            {"prefix": "/orders", "upstream": "legacy"},
            {"prefix": "/echo", "upstream": "legacy"},
            {"prefix": "/dead", "upstream": "dead"},
        ],
        "batch": {"limits": {"max_response_bytes": 1000}},
    })
    async with client.get("/dead/x") as response:
        assert response.status == 502
    async with client.get("/echo/slow?delay_ms=1500") as response:
        assert response.status == 504
    document = batch("Unordered", single("GET", "/echo/" + "x" * 2000))  # the echo answer is too big
    async with client.post("/batch/v1", json=document) as response:
        assert response.status == 200
    text = await scrape(client)
    errors = "gateway_upstream_errors_total"
    assert value(text, errors, upstream="dead", kind="connect") == 1
    assert value(text, errors, upstream="legacy", kind="timeout") == 1
    assert value(text, errors, upstream="legacy", kind="oversize") == 1
    assert value(text, "gateway_limits_hit_total", limit="limits.max_response_bytes") == 1
    # a call that got no status is counted with status_class="error", a gateway-made answer
    assert value(text, "gateway_upstream_requests_total", upstream="dead", status_class="error") == 1
    assert value(text, "gateway_http_requests_total", route="/dead", status_class="5xx",
                 origin="gateway") == 1
    assert value(text, "gateway_subrequests_total", upstream="legacy", status_class="error",
                 outcome="failed") == 1


async def test_a_refused_request_counts_the_limit_it_hit(make_gateway: MakeGateway) -> None:
    client = await make_gateway({"batch": {"limits": {"max_items": 2}}})
    document = batch("Serial", *(single("GET", f"/echo/{n}") for n in range(3)))
    async with client.post("/batch/v1", json=document) as response:
        assert response.status == 413
    async with client.post("/batch/v1", data=b"x" * 100, headers={"Content-Type": "application/json"}):
        pass
    text = await scrape(client)
    assert value(text, "gateway_limits_hit_total", limit="limits.max_items") == 1
    assert value(text, "gateway_http_requests_total", kind="batch_json", status_class="4xx") == 2
    assert value(text, "gateway_upstream_requests_total") == 0  # nothing was sent


async def test_the_exposition_has_process_and_gc_series_and_no_created_series(
    make_gateway: MakeGateway,
) -> None:
    client = await make_gateway()
    async with client.get("/orders") as response:
        await response.read()
    text = await scrape(client)
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_gc_collections"} <= names
    assert "_created" not in text
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if family.name.startswith("gateway_") and family.type == "histogram":
            assert family.name.endswith(("_seconds", "_bytes", "_subrequests")), family.name


async def test_a_config_reload_is_counted(make_gateway: MakeGateway) -> None:
    from gateway.reload import reload_config

    client = await make_gateway()
    assert not await reload_config(client.app, "/nonexistent/gateway.yaml")
    text = await scrape(client)
    assert value(text, "gateway_config_reloads_total", result="failed") == 1


async def test_batches_recovered_at_start_up_are_counted(
    make_config: MakeConfig, aiohttp_client: Any, tmp_path: Path
) -> None:
    config = make_config()
    journal = SqliteJournal(config.journal.path)
    await journal.open()
    await journal.batch_state("b-crashed", BatchState.RUNNING)  # died before its first call
    await journal.close()
    client: Client = await aiohttp_client(create_app(config))
    text = await scrape(client)
    assert value(text, "gateway_recovered_batches_total", outcome="rolled_back") == 1


async def test_a_transaction_rollback_that_is_retried_counts_its_retries(
    make_gateway: MakeGateway, ledger: TestServer,
) -> None:
    # the rollback (POST /tx/<token>/rollback) answers 503 once, then succeeds
    state_of(ledger).faults.append(FaultRule(path_prefix="/tx/", method="POST", status=503, times=1))
    client = await make_gateway(
        {"batch": {"rollback": {"attempts": 3, "initial_backoff": 0.005, "max_backoff": 0.01}}}
    )
    document = batch("Serial", single("POST", "/accounts", {"owner": "x"}), single("GET", "/accounts/404"))
    async with client.post("/batch/v1", json=document, headers={"X-Batch-Atomic": "true"}) as response:
        assert response.headers["X-Batch-Outcome"] == "rolled_back"
    text = await scrape(client)
    assert value(text, "gateway_upstream_requests_total", upstream="ledger", purpose="rollback") == 2
    assert value(text, "gateway_undo_retries_total", upstream="ledger") == 1
    assert state_of(ledger).transactions == {}


_AMOUNTS = st.floats(min_value=0, max_value=100, allow_nan=False) | st.sampled_from(
    [0.0, 0.001, 0.0025, 0.05, 1.0, 30.0, 31.0, 1e9]  # on and just past bucket bounds, past the last
)


@settings(max_examples=60, deadline=None)
@given(
    observations=st.lists(_AMOUNTS, max_size=40),
    increments=st.lists(st.integers(min_value=0, max_value=5), max_size=20),
    gauge_steps=st.lists(st.integers(min_value=-3, max_value=3), max_size=20),
    flush_every=st.integers(min_value=1, max_value=10),
)
def test_gathered_updates_expose_the_same_series_as_prometheus_client_s_own(
    observations: list[float], increments: list[int], gauge_steps: list[int], flush_every: int
) -> None:
    """The hot path's updates are gathered and flushed into prometheus-client's values (a scrape
    flushes first): the exposition must equal the one of the same updates made directly, however
    they are split between flushes."""
    direct, gathered = GatewayMetrics(), GatewayMetrics()
    for index, amount in enumerate(observations):
        direct.upstream_duration.labels("u", "subrequest", "2xx").observe(amount)
        gathered.child(gathered.upstream_duration, "u", "subrequest", "2xx").observe(amount)
        if index % flush_every == 0:
            gathered.flush()
    for amount in increments:
        direct.upstream_calls.labels("u", "subrequest", "2xx").inc(amount)
        gathered.child(gathered.upstream_calls, "u", "subrequest", "2xx").inc(amount)
    for step in gauge_steps:
        direct.pool_in_use.labels("u").inc(step)
        gathered.child(gathered.pool_in_use, "u").inc(step)

    def series(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = metrics.render().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("gateway_upstream")
            for sample in family.samples
        }

    expected, got = series(direct), series(gathered)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
