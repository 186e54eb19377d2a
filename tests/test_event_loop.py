"""`listen.loop` (uvloop by default where installed) and `listen.workers: auto` (one per CPU)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.config import parse_config
from gateway.demo.launcher import demo_config_data
from gateway.errors import ConfigError
from tests.test_shutdown import free_port, start_gateway
from tests.test_workers import wait_for_workers


def demo(legacy: TestServer, ledger: TestServer, tmp_path: Path, **listen: Any) -> dict[str, Any]:
    config = demo_config_data(
        str(legacy.make_url("")).rstrip("/"), str(ledger.make_url("")).rstrip("/"),
        port=free_port(), journal=str(tmp_path / "journal.sqlite3"),
    )
    config["listen"].update(listen)
    return config


def listening_lines(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "gateway.log").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry.get("event") == "listening"]


@pytest.mark.parametrize(
    ("setting", "expected"), [(None, "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
async def test_the_gateway_runs_on_the_configured_loop(
    legacy: TestServer, ledger: TestServer, tmp_path: Path, setting: str | None, expected: str
) -> None:
    pytest.importorskip("uvloop")
    listen = {} if setting is None else {"loop": setting}
    process, _ = await start_gateway(demo(legacy, ledger, tmp_path, **listen), tmp_path)
    process.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    (line,) = listening_lines(tmp_path)
    assert line["loop"] == expected


async def test_workers_auto_starts_one_worker_per_cpu(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    process, _ = await start_gateway(demo(legacy, ledger, tmp_path, workers="auto"), tmp_path)
    workers = await wait_for_workers(process.pid, len(os.sched_getaffinity(0)))
    assert len(workers) == len(os.sched_getaffinity(0))
    process.send_signal(signal.SIGTERM)
    assert await process.wait() == 0


def test_workers_is_a_count_or_auto() -> None:
    base = {"upstreams": {"a": {"url": "http://127.0.0.1:1"}}, "routes": []}
    assert parse_config({**base, "listen": {"workers": "auto"}}, "<t>").listen.worker_count == len(
        os.sched_getaffinity(0)
    )
    assert parse_config({**base, "listen": {"workers": 3}}, "<t>").listen.worker_count == 3
    for bad in (0, 65, "many"):
        with pytest.raises(ConfigError, match=r"listen\.workers"):
            parse_config({**base, "listen": {"workers": bad}}, "<t>")
