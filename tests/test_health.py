"""Upstream health and readiness (issue 12, part 5): passive tracking from real calls, active checks,
the /readyz policy (journal, recovery, shutdown, required upstreams) and the gateway_upstream_up
gauge. Real loopback servers only: an unreachable upstream is a closed port, a slow one sleeps, a
failing health endpoint answers 503.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.atomicity.journal import SqliteJournal
from gateway.config import parse_config
from gateway.demo.launcher import demo_config_data
from gateway.demo.services import legacy_app
from gateway.errors import ConfigError
from gateway.health import UpstreamHealth
from gateway.metrics import GatewayMetrics
from gateway.runtime import GATEWAY
from tests.conftest import deep_merge
from tests.test_limits_proxy import open_raw, request_head

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Any]


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def make_client(
    aiohttp_client: Any, legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> MakeClient:
    """A gateway on the demo upstreams plus extra upstreams, each routed at /<name> (prefix stripped)."""

    async def make(
        extra: dict[str, dict[str, Any]] | None = None, overrides: dict[str, Any] | None = None
    ) -> Client:
        data = demo_config_data(
            str(legacy.make_url("")).rstrip("/"),
            str(ledger.make_url("")).rstrip("/"),
            journal=str(tmp_path / "journal.sqlite3"),
        )
        for name, upstream in (extra or {}).items():
            data["upstreams"][name] = upstream
            data["routes"].append({"prefix": f"/{name}", "upstream": name, "strip_prefix": True})
        config = parse_config(deep_merge(data, overrides or {}), "<test>")
        client: Client = await aiohttp_client(create_app(config))
        return client

    return make


async def readyz(client: Client) -> tuple[int, dict[str, Any]]:
    async with client.get("/_gateway/readyz") as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def upstream_state(client: Client, name: str) -> str:
    state: str = (await readyz(client))[1]["upstreams"][name]["state"]
    return state


async def until_state(client: Client, name: str, wanted: str, seconds: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        body = (await readyz(client))[1]
        if body["upstreams"][name]["state"] == wanted:
            return body
        assert time.monotonic() < deadline, f"{name} never became {wanted}: {body}"
        await asyncio.sleep(0.05)


async def metric_samples(client: Client, sample_name: str) -> dict[str, float]:
    """upstream label -> value of every sample called `sample_name`."""
    async with client.get("/_gateway/metrics") as response:
        text = await response.text()
    return {
        sample.labels["upstream"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name
    }


async def proxied(client: Client, path: str) -> int:
    async with client.get(path) as response:
        await response.read()
        return response.status


# === passive tracking ===========================================================================


async def test_readyz_reports_every_upstream_and_is_ready_when_all_are_up(make_client: MakeClient) -> None:
    client = await make_client()
    status, body = await readyz(client)
    assert status == 200
    assert body["ready"] is True and body["journal"] == "ok" and body["recovered"] is True
    assert body["stopping"] is False and body["reasons"] == []
    assert {name: u["state"] for name, u in body["upstreams"].items()} == {
        "legacy": "unknown", "ledger": "unknown"
    }
    assert await metric_samples(client, "gateway_upstream_up") == {}  # nothing known, nothing claimed

    assert await proxied(client, "/orders") == 200
    assert await proxied(client, "/accounts/404") == 404  # any answer shows the upstream is reachable
    status, body = await readyz(client)
    assert status == 200 and body["ready"] is True
    for name in ("legacy", "ledger"):
        upstream = body["upstreams"][name]
        assert upstream["state"] == "up"
        assert upstream["last_error"] is None and upstream["consecutive_failures"] == 0
        assert upstream["since"].endswith("Z") and upstream["required"] is False
        assert upstream["active_check"] is False
    assert await metric_samples(client, "gateway_upstream_up") == {"legacy": 1.0, "ledger": 1.0}


async def test_an_unreachable_upstream_is_down_after_n_failed_proxied_calls_and_readyz_stays_200(
    make_client: MakeClient,
) -> None:
    client = await make_client({"dead": {"url": f"http://127.0.0.1:{closed_port()}"}})
    for _ in range(4):  # default health.failures is 5
        assert await proxied(client, "/dead/x") == 502
    body = (await readyz(client))[1]
    assert body["upstreams"]["dead"]["state"] == "unknown"
    assert body["upstreams"]["dead"]["consecutive_failures"] == 4

    assert await proxied(client, "/dead/x") == 502
    status, body = await readyz(client)
    assert status == 200 and body["ready"] is True  # reported, not required
    dead = body["upstreams"]["dead"]
    assert dead["state"] == "down" and dead["consecutive_failures"] == 5
    assert dead["last_error"]["kind"] == "connect"
    assert "connection refused" in dead["last_error"]["detail"]
    assert "127.0.0.1" not in dead["last_error"]["detail"]  # names and stable reasons, no addresses
    assert body["upstreams"]["legacy"]["state"] == "unknown"
    assert await proxied(client, "/orders") == 200
    assert await metric_samples(client, "gateway_upstream_up") == {"dead": 0.0, "legacy": 1.0}


async def test_a_required_upstream_that_is_down_turns_readyz_503_until_its_cool_down_ends(
    make_client: MakeClient,
) -> None:
    dead = {
        "url": f"http://127.0.0.1:{closed_port()}",
        "health": {"required": True, "failures": 2, "cooldown": 0.5},
    }
    client = await make_client({"dead": dead})
    assert await proxied(client, "/dead/x") == 502
    assert (await readyz(client))[0] == 200
    assert await proxied(client, "/dead/x") == 502
    status, body = await readyz(client)
    assert status == 503 and body["ready"] is False
    assert body["reasons"] == ["required upstream 'dead' is down"]
    assert body["journal"] == "ok" and body["upstreams"]["dead"]["required"] is True

    # after the cool-down it is probing (ready again, so traffic can arrive); the next call decides
    body = await until_state(client, "dead", "probing")
    assert body["ready"] is True
    assert await proxied(client, "/dead/x") == 502  # one failure while probing: down again
    status, body = await readyz(client)
    assert status == 503 and body["upstreams"]["dead"]["state"] == "down"


async def test_an_upstream_that_comes_back_is_up_at_its_next_call(
    make_client: MakeClient, aiohttp_server: Any
) -> None:
    port = closed_port()
    client = await make_client({"back": {"url": f"http://127.0.0.1:{port}", "health": {"failures": 2}}})
    for _ in range(2):
        assert await proxied(client, "/back/orders") == 502
    assert await upstream_state(client, "back") == "down"
    assert await metric_samples(client, "gateway_upstream_up") == {"back": 0.0}

    await aiohttp_server(legacy_app(), port=port)
    # still within its cool-down: calls are not held back, and the first answer marks it up
    assert await proxied(client, "/back/orders") == 200
    body = (await readyz(client))[1]
    back = body["upstreams"]["back"]
    assert back["state"] == "up" and back["consecutive_failures"] == 0
    assert back["last_error"]["kind"] == "connect"  # the last failure stays visible
    assert await metric_samples(client, "gateway_upstream_up") == {"back": 1.0}


async def test_timeouts_of_batch_and_proxied_calls_count_like_connect_failures(
    make_client: MakeClient,
) -> None:
    client = await make_client(
        overrides={"upstreams": {"legacy": {"timeouts": {"total": 0.2}, "health": {"failures": 2}}}}
    )
    batch = {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": "GET", "operation": "/echo/slow?delay_ms=1000"}}]}}
    async with client.post("/batch/v1", json=batch) as response:  # pool.send
        assert response.status == 200
        assert "504" in str(await response.json())
    body = (await readyz(client))[1]
    assert body["upstreams"]["legacy"]["consecutive_failures"] == 1
    assert await proxied(client, "/echo/slow?delay_ms=1000") == 504  # pool.stream
    body = (await readyz(client))[1]
    assert body["upstreams"]["legacy"]["state"] == "down"
    assert body["upstreams"]["legacy"]["last_error"]["kind"] == "timeout"
    assert body["ready"] is True


async def test_a_stalled_client_body_is_not_blamed_on_the_upstream(make_client: MakeClient) -> None:
    client = await make_client(overrides={
        "proxy": {"buffer_bytes": 1024, "body_idle_timeout": 0.3},
        "upstreams": {"legacy": {"health": {"failures": 1}}},
    })
    assert client.port is not None
    head = request_head("POST", "/legacy/upload", "Content-Length: 100000")
    reader, writer = await open_raw(client.port, head)
    writer.write(b"y" * 5000)
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status.startswith(b"HTTP/1.1 408"), status
    body = (await readyz(client))[1]
    assert body["upstreams"]["legacy"]["state"] != "down", body


async def test_an_upload_the_upstream_never_answers_still_counts_as_a_timeout(
    make_client: MakeClient,
) -> None:
    """Only the client's own stall is excused: a streamed body sent whole, then no answer, counts."""
    client = await make_client(overrides={
        "proxy": {"buffer_bytes": 1024},
        "upstreams": {"legacy": {"timeouts": {"total": 0.3}, "health": {"failures": 1}}},
    })
    async with client.post("/echo/slow?delay_ms=1500", data=b"z" * 100_000) as response:
        assert response.status == 504
    assert await upstream_state(client, "legacy") == "down"


# === active checks ==============================================================================


class HealthEndpoint:
    """An upstream whose /base/healthz answers `status`; it keeps the query strings it saw."""

    def __init__(self) -> None:
        self.status = 200
        self.queries: list[str] = []

    def app(self) -> web.Application:
        async def healthz(request: web.Request) -> web.Response:
            self.queries.append(request.query_string)
            return web.Response(status=self.status, text="ok")

        app = web.Application()
        app.router.add_get("/base/healthz", healthz)
        return app


async def test_active_checks_mark_an_upstream_down_without_traffic_and_back_up(
    make_client: MakeClient, aiohttp_server: Any
) -> None:
    upstream = HealthEndpoint()
    server = await aiohttp_server(upstream.app())
    health = {"path": "/healthz?deep=1", "interval": 0.05, "timeout": 1, "failures": 2,
              "expect_status": ["200-299", 304]}
    client = await make_client({"checked": {"url": f"{server.make_url('/base')}", "health": health}})
    body = await until_state(client, "checked", "up")
    assert body["upstreams"]["checked"]["active_check"] is True
    assert upstream.queries[0] == "deep=1"  # the path on the upstream's base URL, query kept

    upstream.status = 503
    body = await until_state(client, "checked", "down")
    assert body["ready"] is True  # not required
    error = body["upstreams"]["checked"]["last_error"]
    assert error["kind"] == "status" and "answered 503" in error["detail"]
    assert await metric_samples(client, "gateway_upstream_up") == {"checked": 0.0}

    upstream.status = 304  # listed on its own
    await until_state(client, "checked", "up")
    assert await metric_samples(client, "gateway_upstream_up") == {"checked": 1.0}
    # checks are not traffic: no latency samples, and no proxied call was made
    assert "checked" not in await metric_samples(client, "gateway_upstream_latency_seconds_count")


async def test_an_active_check_of_a_closed_port_marks_a_required_upstream_down(
    make_client: MakeClient,
) -> None:
    health = {"path": "/healthz", "interval": 0.05, "failures": 1, "required": True}
    client = await make_client({"gone": {"url": f"http://127.0.0.1:{closed_port()}", "health": health}})
    body = await until_state(client, "gone", "down")
    assert body["ready"] is False and body["reasons"] == ["required upstream 'gone' is down"]
    assert body["upstreams"]["gone"]["last_error"]["kind"] == "connect"
    assert (await readyz(client))[0] == 503


# === the rest of the readiness policy ==========================================================


async def test_readyz_is_503_while_the_journal_cannot_be_read(make_client: MakeClient) -> None:
    client = await make_client()
    journal = client.app[GATEWAY].batches.journal
    assert isinstance(journal, SqliteJournal)
    assert (await readyz(client))[0] == 200
    await journal.close()  # the journal's connection is gone: every read fails
    status, body = await readyz(client)
    assert status == 503
    assert body["journal"] == "unusable" and body["reasons"] == ["the journal is unusable"]
    assert body["recovered"] is True and body["stopping"] is False
    await journal.open()  # usable again: ready again
    assert await readyz(client) == (200, {**body, "ready": True, "journal": "ok", "reasons": []})


async def test_readyz_is_503_when_the_journal_s_database_connection_broke(make_client: MakeClient) -> None:
    """The connection object closed underneath the journal (not through it): a real read fails."""
    client = await make_client()
    journal = client.app[GATEWAY].batches.journal
    assert isinstance(journal, SqliteJournal)
    connection = journal._db
    assert connection is not None
    await connection.close()
    status, body = await readyz(client)
    assert status == 503 and body["journal"] == "unusable"


async def test_readyz_is_503_once_shutdown_started(make_client: MakeClient) -> None:
    client = await make_client()
    client.app[GATEWAY].extras["stopping"] = True  # what serve() sets on SIGTERM
    status, body = await readyz(client)
    assert status == 503
    assert body["stopping"] is True and body["reasons"] == ["shutting down"]
    assert body["journal"] == "ok"
    async with client.get("/_gateway/healthz") as response:
        assert response.status == 200  # alive, just not ready


async def test_readyz_is_503_until_start_up_recovery_finished(make_client: MakeClient) -> None:
    client = await make_client()
    client.app[GATEWAY].extras["recovered"] = False
    status, body = await readyz(client)
    assert status == 503
    assert body["recovered"] is False and body["reasons"] == ["start-up recovery has not finished"]


def gauge_of(metrics: GatewayMetrics) -> dict[str, float]:
    return {
        sample.labels["upstream"]: sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name == "gateway_upstream_up"
    }


def test_a_reload_keeps_what_is_known_of_upstreams_reached_the_same_way(tmp_path: Path) -> None:
    """reload.py builds the new generation's tracker with `previous=` the old one."""
    def config(ledger_url: str, extra: dict[str, Any]) -> Any:
        data = demo_config_data("http://127.0.0.1:9001", ledger_url, journal=str(tmp_path / "j"))
        data["upstreams"].update(extra)
        return parse_config(data, "<test>")

    metrics = GatewayMetrics()
    old = UpstreamHealth(config("http://127.0.0.1:9002", {"gone": {"url": "http://127.0.0.1:9003"}}), metrics)
    for _ in range(5):
        old.failed("legacy", "connect", "upstream 'legacy' is unreachable (connection refused)")
    old.succeeded("ledger")
    old.succeeded("gone")
    assert gauge_of(metrics) == {"legacy": 0.0, "ledger": 1.0, "gone": 1.0}

    new = UpstreamHealth(config("http://127.0.0.1:9004", {}), metrics, previous=old)
    report = new.report()
    assert set(report) == {"legacy", "ledger"}
    assert report["legacy"]["state"] == "down" and report["legacy"]["consecutive_failures"] == 5
    assert report["ledger"]["state"] == "unknown"  # another URL: another server, nothing known
    assert gauge_of(metrics) == {"legacy": 0.0}
    old.record("legacy", None)  # a call still in flight on the old generation answered
    assert new.report()["legacy"]["state"] == "up"
    assert gauge_of(metrics) == {"legacy": 1.0}


# === config =====================================================================================


def health_config(tmp_path: Path, health: Any) -> Any:
    data = demo_config_data("http://127.0.0.1:9001", "http://127.0.0.1:9002", journal=str(tmp_path / "j"))
    return parse_config(deep_merge(data, {"upstreams": {"legacy": {"health": health}}}), "f.yaml")


def test_health_defaults_and_status_ranges(tmp_path: Path) -> None:
    default = health_config(tmp_path, {}).upstreams["legacy"].health
    assert (default.failures, default.cooldown, default.required, default.path) == (5, 10.0, False, None)
    assert (default.interval, default.timeout) == (10.0, 2.0)
    assert default.passes(200) and default.passes(399) and not default.passes(404)
    health = health_config(tmp_path, {"path": "/ping", "expect_status": [204, "200 - 202"]}).upstreams[
        "legacy"
    ].health
    assert health.expect_status == ((204, 204), (200, 202))
    assert health.passes(201) and not health.passes(203)
    assert health_config(tmp_path, {"expect_status": 200}).upstreams["legacy"].health.expect_status == (
        (200, 200),
    )


@pytest.mark.parametrize(
    ("health", "key", "problem"),
    [
        ({"path": "healthz"}, "upstreams.legacy.health.path", "must be an absolute path"),
        ({"path": "//evil/x"}, "upstreams.legacy.health.path", "must be an absolute path"),
        ({"path": "/h?a b"}, "upstreams.legacy.health.path", "origin-form path"),
        ({"expect_status": ["2xx"]}, "upstreams.legacy.health.expect_status", "is not a status"),
        ({"expect_status": ["399-200"]}, "upstreams.legacy.health.expect_status", "within 100-599"),
        ({"expect_status": [600]}, "upstreams.legacy.health.expect_status", "within 100-599"),
        ({"expect_status": []}, "upstreams.legacy.health.expect_status", "at least one"),
        ({"failures": 0}, "upstreams.legacy.health.failures", "greater than or equal to 1"),
        ({"cooldown": 0}, "upstreams.legacy.health.cooldown", "greater than 0"),
        ({"interval": 1, "timout": 2}, "upstreams.legacy.health.timout", "unknown key"),
    ],
)
def test_bad_health_settings_name_the_key(tmp_path: Path, health: Any, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        health_config(tmp_path, health)
    assert caught.value.key_path == key, caught.value
    assert problem in caught.value.problem, caught.value
