"""Large bodies are streamed through the plain proxy both ways (SPEC section 6, issue 2).

The gateway and the legacy upstream run as separate processes, so the gateway's resident memory can
be sampled on its own while 200 MiB go through it: the bound only holds if nothing buffers the body.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
BODY_BYTES = 200 * MiB
RSS_LIMIT = 150 * MiB
"""The gateway idles at about 55 MiB; a buffered 200 MiB body could never fit under this."""
RSS_GROWTH_LIMIT = 32 * MiB
"""Streaming holds a few 64 KiB chunks at a time; growth is about 1-2 MiB when it works."""

UPSTREAM = """
import sys
from aiohttp import web
from gateway.demo.services import legacy_app
web.run_app(legacy_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"process exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    pytest.fail(f"{url} did not come up:\n{log.read_text()[-2000:]}")


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class Gateway:
    url: str
    pid: int


@pytest.fixture(scope="module")
def gateway_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`gateway serve` in its own process, routing to the legacy demo upstream in another."""
    tmp = tmp_path_factory.mktemp("streaming")
    upstream_port, gateway_port = free_port(), free_port()
    upstream = spawn([sys.executable, "-c", UPSTREAM, str(upstream_port)], tmp / "upstream.log")
    gateway: subprocess.Popen[bytes] | None = None
    try:
        wait_until_up(f"http://127.0.0.1:{upstream_port}/_demo/state", upstream, tmp / "upstream.log")
        config = tmp / "gateway.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"host": "127.0.0.1", "port": gateway_port},
                    "upstreams": {"legacy": {"url": f"http://127.0.0.1:{upstream_port}"}},
                    "routes": [
                        {"prefix": "/bytes", "upstream": "legacy"},
                        {"prefix": "/upload", "upstream": "legacy"},
                    ],
                    "journal": {"path": str(tmp / "journal.sqlite3")},
                }
            )
        )
        command = [sys.executable, "-m", "gateway", "--log-json", "serve", "--config", str(config)]
        gateway = spawn(command, tmp / "gateway.log")
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until_up(f"{url}/_gateway/readyz", gateway, tmp / "gateway.log")
        yield Gateway(url=url, pid=gateway.pid)
    finally:
        if gateway is not None:
            stop(gateway)
        stop(upstream)


class PeakRss:
    """Samples a process's resident set size every few milliseconds in a background thread."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.baseline = self._rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        rss: int = self._process.memory_info().rss
        return rss

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def report(self, what: str) -> str:
        return (
            f"{what}: gateway RSS baseline {self.baseline / MiB:.1f} MiB, "
            f"peak {self.peak / MiB:.1f} MiB while moving {BODY_BYTES / MiB:.0f} MiB"
        )


def expected_download_digest(size: int) -> str:
    """The demo /bytes/{n} body is bytes 0..255 repeated; hash it without holding it."""
    block = bytes(range(256)) * 256
    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)
    digest.update(block[: size % len(block)])
    return digest.hexdigest()


async def generated_upload(size: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    """`size` bytes produced 1 MiB at a time (varying per block), hashed as they are sent."""
    base = os.urandom(MiB)
    for index in range(size // MiB):
        block = index.to_bytes(8, "big") + base[8:]
        digest.update(block)
        yield block


async def test_200_mib_download_streams_through_intact(gateway_process: Gateway) -> None:
    digest, received = hashlib.sha256(), 0
    with PeakRss(gateway_process.pid) as rss:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gateway_process.url}/bytes/{BODY_BYTES}") as response,
        ):
            assert response.status == 200
            async for chunk in response.content.iter_chunked(MiB):
                digest.update(chunk)
                received += len(chunk)
    print(rss.report("download"))
    assert received == BODY_BYTES
    assert digest.hexdigest() == expected_download_digest(BODY_BYTES)
    assert rss.peak < RSS_LIMIT, rss.report("download")
    assert rss.peak - rss.baseline < RSS_GROWTH_LIMIT, rss.report("download")


async def test_200_mib_upload_streams_through_intact(gateway_process: Gateway) -> None:
    digest = hashlib.sha256()
    with PeakRss(gateway_process.pid) as rss:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{gateway_process.url}/upload", data=generated_upload(BODY_BYTES, digest)
            ) as response,
        ):
            assert response.status == 200
            answer = await response.json()
    print(rss.report("upload"))
    assert answer == {"bytes": BODY_BYTES, "sha256": digest.hexdigest()}
    assert rss.peak < RSS_LIMIT, rss.report("upload")
    assert rss.peak - rss.baseline < RSS_GROWTH_LIMIT, rss.report("upload")
