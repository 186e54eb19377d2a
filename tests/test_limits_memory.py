"""Memory limits of batches (issue 10 findings 1 and 5): buffered bytes are budgeted, bodies read linearly.

A JSON batch of 40 GETs of a 10 MB upstream body, 3 KB on the wire, once took the gateway from
63 MiB to 1.86 GiB. The gateway runs as its own process here so its peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.process_memory import fix_mmap_threshold
from gateway.runtime import GATEWAY
from gateway.upstream import UpstreamCall, UpstreamPool
from tests.conftest import MakeGateway
from tests.test_streaming import UPSTREAM, free_port, spawn, stop, wait_until_up

MiB = 1024 * 1024
TEN_MB = 10_000_000


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (Linux VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@contextmanager
def gateway_process(tmp: Path) -> Iterator[tuple[str, int]]:
    """A gateway process (base URL, pid) on an upstream process serving `/bytes/<n>`, with every
    batch dialect enabled."""
    upstream_port, gateway_port = free_port(), free_port()
    upstream = spawn([sys.executable, "-c", UPSTREAM, str(upstream_port)], tmp / "upstream.log")
    gateway = None
    try:
        wait_until_up(f"http://127.0.0.1:{upstream_port}/_demo/state", upstream, tmp / "upstream.log")
        config = tmp / "gateway.yaml"
        config.write_text(yaml.safe_dump({
            "listen": {"host": "127.0.0.1", "port": gateway_port},
            "upstreams": {"legacy": {"url": f"http://127.0.0.1:{upstream_port}", "concurrency": 40}},
            "routes": [{"prefix": "/bytes", "upstream": "legacy"}],
            "journal": {"path": str(tmp / "journal.sqlite3")},
            "batch": {"graph": {"path": "/v1.0/$batch"}, "composite": {"path": "/composite"},
                      "odata": {"path": "/odata/$batch"}},
        }))
        command = [sys.executable, "-m", "gateway", "--log-level", "WARNING", "serve",
                   "--config", str(config)]
        gateway = spawn(command, tmp / "gateway.log")
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until_up(f"{url}/_gateway/readyz", gateway, tmp / "gateway.log")
        yield url, gateway.pid
    finally:
        if gateway is not None:
            stop(gateway)
        stop(upstream)


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    with gateway_process(tmp_path_factory.mktemp("budget")) as served:
        yield served


def big_batch(count: int) -> dict[str, Any]:
    items = [{"SingleItem": {"method": "GET", "operation": f"/bytes/{TEN_MB}"}} for _ in range(count)]
    return {"Batch": {"batch_execution_type": "Unordered", "items": items}}


@pytest.mark.slow
async def test_a_small_batch_of_huge_answers_keeps_the_gateway_s_memory_bounded(
    gateway_url: tuple[str, int],
) -> None:
    url, pid = gateway_url
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/batch/v1", json=big_batch(1)) as warm:  # import paths, pools
            assert warm.status == 200
            await warm.read()
        before = peak_rss(pid)
        async with session.post(f"{url}/batch/v1", json=big_batch(40)) as response:
            assert response.status == 200
            answer = await response.json()
    grown = peak_rss(pid) - before
    results = [item["SingleItem"]["Result"] for item in answer["Batch"]["items"]]
    kept = [r for r in results if r["status"] == 200]
    dropped = [r for r in results if r["status"] == 502]
    assert len(kept) + len(dropped) == 40
    assert 1 <= len(kept) <= 6  # 64 MiB of 10 MB bodies, minus the one being read
    assert all(len(r["body"]) == 13_333_336 for r in kept)  # base64 of 10 MB, intact
    assert all("limits.max_batch_buffer_bytes" in r["body"]["error"] for r in dropped)
    # The 64 MiB budget plus room for one body's copy: the heap once kept what the budget had
    # given back (glibc's mmap threshold rose), and each base64 body existed four more times
    # while it was encoded: 90-120 MiB here, 182 MiB on the CI machine.
    assert grown < 96 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB"
    print(f"peak RSS grew by {grown / MiB:.0f} MiB for 40 x 10 MB ({len(kept)} kept)")


def _json(document: dict[str, Any]) -> tuple[bytes, str]:
    return json.dumps(document).encode(), "application/json"


def _odata_parts(n: int) -> tuple[bytes, str]:
    part = f"--b\r\nContent-Type: application/http\r\n\r\nGET /bytes/{TEN_MB} HTTP/1.1\r\n\r\n\r\n"
    return (part * n + "--b--\r\n").encode(), "multipart/mixed; boundary=b"


DIALECT_BATCHES: dict[str, tuple[str, Callable[[int], tuple[bytes, str]]]] = {
    "graph": ("/v1.0/$batch", lambda n: _json({"requests": [
        {"id": str(i), "method": "GET", "url": f"/bytes/{TEN_MB}"} for i in range(n)]})),
    "composite": ("/composite", lambda n: _json({"compositeRequest": [
        {"method": "GET", "url": f"/bytes/{TEN_MB}", "referenceId": f"r{i}"} for i in range(n)]})),
    "odata": ("/odata/$batch", lambda n: _json({"requests": [
        {"id": str(i), "method": "get", "url": f"/bytes/{TEN_MB}"} for i in range(n)]})),
    "odata-multipart": ("/odata/$batch", _odata_parts),
    "multipart-source-format": ("/v1/api/batch", _odata_parts),  # the same parts: the seed's shape
}


def _kept(answer: bytes) -> int:
    """How many 10 MB bodies the answer carries (base64 in JSON, or as they are in multipart)."""
    if answer.startswith(b"{"):
        document = json.loads(answer)
        bodies = [r.get("body") for r in document.get("responses") or document["compositeResponse"]]
        return sum(isinstance(b, str) and len(b) > 13_000_000 for b in bodies)
    return answer.count(f"Content-Length: {TEN_MB}".encode())


@pytest.mark.slow
@pytest.mark.parametrize("dialect", sorted(DIALECT_BATCHES))
async def test_a_dialect_batch_of_huge_answers_keeps_the_gateway_s_memory_bounded(
    tmp_path: Path, dialect: str
) -> None:
    """The same 64 MiB budget through each dialect's answer: written one response (or part) at a
    time, base64 bodies encoded in slices, multipart bodies never copied. Built whole, the answer
    took +252 MiB (Composite), +251 (Graph), +315 (OData JSON), +200 (OData multipart) here;
    now +48-58. The source multipart answer already streamed part by part (+96 MiB, each body
    copied twice while its part was built); a big body now goes out uncopied (+77)."""
    path, batch = DIALECT_BATCHES[dialect]
    with gateway_process(tmp_path) as (url, pid):  # a process of its own: its peak is this batch's
        async with aiohttp.ClientSession() as session:
            data, content_type = batch(1)
            sent = {"Content-Type": content_type}
            async with session.post(f"{url}{path}", data=data, headers=sent) as warm:
                assert warm.status in (200, 202), await warm.text()
                await warm.read()
            before = peak_rss(pid)
            data, content_type = batch(20)
            sent = {"Content-Type": content_type}
            async with session.post(f"{url}{path}", data=data, headers=sent) as response:
                assert response.status in (200, 202)
                answer = await response.read()
        grown = peak_rss(pid) - before
    kept = _kept(answer)
    assert 1 <= kept <= 6, kept
    assert grown < 96 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB"
    print(f"{dialect}: peak RSS grew by {grown / MiB:.0f} MiB for 20 x 10 MB ({kept} kept)")


async def test_batches_together_stay_within_the_process_wide_budget(make_gateway: MakeGateway) -> None:
    """Each batch may hold 3 MiB, all together 4 MiB: while another batch holds 3 MiB, a 2 MiB
    answer does not fit, and the item says which limit; once that batch is answered, it fits."""
    client = await make_gateway({"batch": {"limits": {
        "max_batch_buffer_bytes": 3 * MiB, "max_buffered_bytes": 4 * MiB,
    }}})
    service = client.app[GATEWAY].batches
    other = service.new_budget()
    other.take(3 * MiB)  # what a concurrent batch's answers hold until they are written
    batch = {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": "GET", "operation": f"/legacy/bytes/{2 * MiB}"}},
    ]}}

    async with client.post("/batch/v1", json=batch) as response:
        refused = (await response.json())["Batch"]["items"][0]["SingleItem"]["Result"]
    other.release()
    async with client.post("/batch/v1", json=batch) as response:
        fitted = (await response.json())["Batch"]["items"][0]["SingleItem"]["Result"]

    assert refused["status"] == 502 and "limits.max_buffered_bytes" in refused["body"]["error"]
    assert fitted["status"] == 200 and fitted["body_encoding"] == "base64"
    assert service.buffered.held == 0  # every batch gave its bytes back once answered


async def chunked_upstream(aiohttp_server: Any, size: int) -> TestServer:
    async def dribble(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 1024
        for _ in range(size // 1024):
            await response.write(chunk)
            await asyncio.sleep(0)  # let the reader take each chunk as it comes
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", dribble)
    server: TestServer = await aiohttp_server(app)
    return server


async def test_reading_a_body_in_small_chunks_is_linear_in_its_size(
    aiohttp_server: Any, make_config: Any
) -> None:
    """2 MB and 8 MB bodies sent in 1 KB chunks: reading 4x the bytes costs about 4x the CPU,
    not 16x (`bytes +=` copied the whole body for each chunk: 1.37 s for 10 MB)."""
    cost = {}
    for size in (2_000_000, 8_000_000):
        server = await chunked_upstream(aiohttp_server, size)
        config = make_config({"upstreams": {"legacy": {"url": str(server.make_url("")).rstrip("/")}}})
        pool = UpstreamPool(config, max_response_bytes=16 * MiB)
        await pool.start()
        try:
            started = time.process_time()
            response = await pool.send(UpstreamCall("legacy", "GET", server.make_url("/"), ()))
            cost[size] = time.process_time() - started
        finally:
            await pool.close()
        assert len(response.body) == size // 1024 * 1024
    assert cost[8_000_000] < 8 * max(cost[2_000_000], 0.005), cost



def test_the_mmap_threshold_is_fixed_unless_the_operator_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc only: `mallopt` says whether it took the setting; the environment variable wins."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    glibc = platform.libc_ver()[0] == "glibc"
    assert fix_mmap_threshold() is glibc
