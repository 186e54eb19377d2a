"""With `listen.workers: 2`, one scrape shows the whole gateway: every worker writes its series to
the shared PROMETHEUS_MULTIPROC_DIR and whichever worker answers /metrics merges them all.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.test_shutdown import start_gateway
from tests.test_workers import config_with_workers, wait_for_workers

REQUESTS = 60


def proxied_total(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_http_requests_total" and sample.labels["kind"] == "proxy"
    )


def per_worker_proxied(directory: Path) -> dict[int, float]:
    """What each worker's own counter file holds (the files the merged scrape sums)."""
    totals: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
            _metric, name, labels, _help = json.loads(key)
            if name == "gateway_http_requests_total" and labels.get("kind") == "proxy":
                totals[pid] = totals.get(pid, 0.0) + value
    return totals


async def test_one_scrape_shows_traffic_served_by_both_workers(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale")  # left by an earlier run: removed
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)  # inherited by the subprocess only
    try:
        process, base = await start_gateway(config_with_workers(legacy, ledger, tmp_path), tmp_path)
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    workers = await wait_for_workers(process.pid, 2)
    for _ in range(100):  # both workers listening (each writes its live gauges once started)
        if len(list(directory.glob("gauge_livesum_*.db"))) >= 2:
            break
        await asyncio.sleep(0.1)

    for index in range(REQUESTS):  # a new connection each: SO_REUSEPORT spreads them
        async with aiohttp.ClientSession() as session, session.get(f"{base}/echo/{index}") as response:
            assert response.status == 200

    per_worker = per_worker_proxied(directory)
    for _ in range(50):  # each worker writes what it gathered every second
        if sum(per_worker.values()) == REQUESTS:
            break
        await asyncio.sleep(0.1)
        per_worker = per_worker_proxied(directory)
    assert set(per_worker) == {worker.pid for worker in workers}, per_worker
    assert all(count > 0 for count in per_worker.values()), per_worker  # both served some
    assert not (directory / "counter_999999.db").exists()

    for _ in range(6):  # whichever worker answers, the scrape is whole
        async with aiohttp.ClientSession() as session, session.get(f"{base}/_gateway/metrics") as response:
            text = await response.text()
        assert proxied_total(text) == REQUESTS
        pids = {
            sample.labels["pid"]
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "process_resident_memory_bytes"
        }
        assert pids == {str(worker.pid) for worker in workers}

    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 20) == 0
