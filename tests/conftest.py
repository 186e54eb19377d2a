"""Shared fixtures: the demo upstreams as real loopback servers and a gateway routed to them.

Every test talks to the gateway over a real socket (aiohttp_client) and reads upstream state directly.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import GatewayConfig, parse_config
from gateway.demo.launcher import demo_config_data
from gateway.demo.services import DEMO_STATE, DemoState, ledger_app, legacy_app
from tests.pg_cluster import REQUIRE_VARIABLE, PgCluster, PgUnavailable

MakeConfig = Callable[..., GatewayConfig]
MakeGateway = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
async def legacy(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(legacy_app())
    return server


@pytest.fixture
async def ledger(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(ledger_app())
    return server


def state_of(server: TestServer) -> DemoState:
    """The in-memory state of a demo upstream (records, open transactions, call log)."""
    return server.app[DEMO_STATE]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One private PostgreSQL server for the session (tests/pg_cluster.py); skipped when it cannot
    be started here, unless GATEWAY_REQUIRE_POSTGRES=1 (CI), which fails instead."""
    try:
        cluster = PgCluster().start()
    except PgUnavailable as exc:
        if os.environ.get(REQUIRE_VARIABLE) == "1":
            pytest.fail(f"PostgreSQL is required ({REQUIRE_VARIABLE}=1) but cannot start: {exc}")
        pytest.skip(f"PostgreSQL cannot be started here: {exc}")
    yield cluster
    cluster.remove()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh database on the session's PostgreSQL server."""
    return pg_cluster.create_database()


@pytest.fixture
def journal_kind() -> str:
    """The journal make_config sets up: SQLite; a module overrides this fixture with params
    ["sqlite", "postgres"] to run its tests against both (tests/test_atomic_fault_matrix.py)."""
    return "sqlite"


@pytest.fixture
def make_config(
    legacy: TestServer, ledger: TestServer, tmp_path: Path, journal_kind: str, request: pytest.FixtureRequest
) -> MakeConfig:
    """The demo config pointed at the test upstreams, with optional deep-merged overrides."""
    journal: dict[str, Any] = {"path": str(tmp_path / "journal.sqlite3")}
    if journal_kind == "postgres":
        journal = {"url": request.getfixturevalue("pg_url"), "lease_seconds": 5}

    def make(overrides: dict[str, Any] | None = None) -> GatewayConfig:
        data = demo_config_data(
            str(legacy.make_url("")).rstrip("/"),
            str(ledger.make_url("")).rstrip("/"),
        )
        data["journal"] = dict(journal)
        return parse_config(deep_merge(data, overrides or {}), "<test>")

    return make


@pytest.fixture
def make_gateway(aiohttp_client: Any, make_config: MakeConfig) -> MakeGateway:
    async def make(overrides: dict[str, Any] | None = None) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(make_config(overrides))
        )
        return client

    return make


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> TestClient[web.Request, web.Application]:
    return await make_gateway()


@pytest.fixture(autouse=True)
def _no_gateway_left_running() -> Iterator[None]:
    """A test that fails before stopping the gateway processes it started must not leave them
    (and their workers) running: they would hold ports and CPU for the rest of the run."""
    from tests.test_shutdown import STARTED

    yield
    while STARTED:
        process = STARTED.pop()
        if process.returncode is None:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.kill()
                process.kill()
