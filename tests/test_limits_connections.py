"""Slowloris (issue 10 finding 3): half-sent requests are closed, health checks keep answering.

3,000 connections each send part of a request's headers and stop. The gateway runs as its own
process with a 1,024 file descriptor limit (as when the finding was made: 1,100 such connections
made health checks time out and wrote 78 MB of logs in 25 s). Connections stuck in their headers
are closed after `listen.header_timeout`; when `listen.max_connections` (capped by the descriptor
limit) are open, the one stuck longest makes room, so `/healthz` answers throughout.
"""

from __future__ import annotations

import asyncio
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.test_streaming import UPSTREAM, free_port, stop, wait_until_up

pytestmark = pytest.mark.slow

HALF_OPEN = 3000
HEADER_TIMEOUT = 2.0


def spawn_limited(args: list[str], log: Path, fds: int) -> subprocess.Popen[bytes]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))

    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=limit)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    tmp = tmp_path_factory.mktemp("slowloris")
    upstream_port, port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(upstream_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = None
    try:
        config = tmp / "gateway.yaml"
        config.write_text(yaml.safe_dump({
            "listen": {"host": "127.0.0.1", "port": port, "header_timeout": HEADER_TIMEOUT},
            "upstreams": {"legacy": {"url": f"http://127.0.0.1:{upstream_port}"}},
            "routes": [{"prefix": "/echo", "upstream": "legacy"}],
            "journal": {"path": str(tmp / "journal.sqlite3")},
        }))
        log = tmp / "gateway.log"
        process = spawn_limited(
            [sys.executable, "-m", "gateway", "--log-json", "serve", "--config", str(config)], log, 1024
        )
        wait_until_up(f"http://127.0.0.1:{port}/_gateway/readyz", process, log)
        yield f"http://127.0.0.1:{port}", port, log
    finally:
        if process is not None:
            stop(process)
        stop(upstream)


def raise_own_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


async def half_open(port: int) -> socket.socket | None:
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        sock.send(b"GET /echo/x HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
    except OSError:
        sock.close()
        return None
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_half_open_connections_are_closed_and_health_checks_keep_answering(
    gateway: tuple[str, int, Path],
) -> None:
    url, port, log = gateway
    count = min(HALF_OPEN, raise_own_fd_limit(HALF_OPEN + 200) - 200)
    slowest = 0.0
    sockets: list[socket.socket] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

        async def probe() -> None:
            nonlocal slowest
            started = time.monotonic()
            async with session.get(f"{url}/_gateway/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                assert r.status == 200
            slowest = max(slowest, time.monotonic() - started)

        for start in range(0, count, 100):  # as fast as one client can, probing between bursts
            opened = await asyncio.gather(*(half_open(port) for _ in range(min(100, count - start))))
            sockets += [s for s in opened if s is not None]
            await probe()
        all_sent = time.monotonic()
        while time.monotonic() - all_sent < HEADER_TIMEOUT + 2:
            await probe()
            await asyncio.sleep(0.2)

    still_open = [s for s in sockets if not closed_by_peer(s)]
    print(f"{len(sockets)} half-open connections; slowest health check {slowest * 1000:.0f} ms")
    for sock in sockets:
        sock.close()
    assert count >= 1000
    assert slowest < 1.0, f"a health check took {slowest:.2f} s"
    assert not still_open, f"{len(still_open)} of {len(sockets)} half-open connections are still open"
    assert log.stat().st_size < 512 * 1024, "closing them is logged at a bounded rate"
    text = log.read_text()
    assert "listen.header_timeout" in text or "listen.max_connections" in text
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_gateway/metrics") as response:
        metrics = await response.text()
    closed = re.findall(
        r'^gateway_limits_hit_total\{limit="listen\.(?:header_timeout|max_connections)"\} (\S+)$',
        metrics, re.M,
    )
    assert sum(float(v) for v in closed) >= len(sockets)  # every one closed by a limit, counted
