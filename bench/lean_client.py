"""aiohttp's ClientSession (configured as gateway/upstream.py does) against gateway.lean_client's
LeanPool: µs of client CPU per call and calls/s, sequential and 50 concurrent GETs, on asyncio and
uvloop, in alternating rounds against bench/upstream.py's fast server (its own process).

    python bench/lean_client.py [--rounds 3] [--calls 2000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from yarl import URL

from gateway.lean_client import LeanPool

Call = Callable[[], Awaitable[bytes]]
_HEADERS = [("X-Request-ID", "bench"), ("Accept", "application/json")]
_LIMIT = 1 << 20


def _aiohttp_session(pool_size: int) -> aiohttp.ClientSession:
    """As UpstreamPool.start() builds it."""
    connector = aiohttp.TCPConnector(
        limit=pool_size, limit_per_host=pool_size, keepalive_timeout=30, ssl=True
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=30, sock_connect=5),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,
    )


def _aiohttp_call(session: aiohttp.ClientSession, url: URL) -> Call:
    async def call() -> bytes:
        async with session.request(
            "GET", url, headers=_HEADERS, data=None, allow_redirects=False, server_hostname=None
        ) as response:
            body = bytearray()
            async for chunk in response.content.iter_any():  # as UpstreamPool._read_capped
                body.extend(chunk)
            assert response.status == 200
            return bytes(body)

    return call


def _lean_call(pool: LeanPool, target: str) -> Call:
    async def call() -> bytes:
        response = await pool.request(
            "GET", target, _HEADERS, None, connect_timeout=5, read_timeout=None, total_timeout=30
        )
        body = await response.read_all(_LIMIT)
        assert response.status == 200
        return body

    return call


async def _measure(call: Call, calls: int, concurrency: int) -> tuple[float, float]:
    """(µs CPU per call, calls/s)."""
    per_worker = calls // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = per_worker * concurrency
    return cpu / done * 1e6, done / wall


Results = dict[tuple[str, str], list[tuple[float, float]]]


async def _run(base: URL, rounds: int, calls: int, concurrency: int) -> Results:
    session = _aiohttp_session(concurrency * 2)
    assert base.host is not None and base.port is not None
    pool = LeanPool(base.host, base.port, ssl=None, server_hostname=None, limit=concurrency * 2)
    clients = {"aiohttp": _aiohttp_call(session, base / "x"), "lean": _lean_call(pool, "/x")}
    results: Results = {}
    try:
        for call in clients.values():  # warm up: connections open, code paths hot
            assert await call() == b'{"ok":true}'
            await _measure(call, 500, concurrency)
        for _ in range(rounds):
            for mode, conc in (("sequential", 1), (f"{concurrency} concurrent", concurrency)):
                for name, call in clients.items():
                    results.setdefault((mode, name), []).append(await _measure(call, calls, conc))
    finally:
        await session.close()
        await pool.close()
    return results


def _report(loop_name: str, results: Results) -> None:
    print(f"\n{loop_name}")
    print(f"{'mode':<16} {'client':<8} {'µs CPU/call':>12} {'calls/s':>10}")
    for (mode, name), samples in results.items():
        cpu = statistics.median(s[0] for s in samples)
        rate = statistics.median(s[1] for s in samples)
        print(f"{mode:<16} {name:<8} {cpu:>12.1f} {rate:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--loops", default="asyncio,uvloop")
    args = parser.parse_args()
    upstream = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("upstream.py"))],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
    )
    try:
        assert upstream.stdout is not None
        base = URL(json.loads(upstream.stdout.readline())["fast"])
        print(f"{args.rounds} alternating rounds of {args.calls} GETs per measurement (medians); "
              f"client process CPU only, the upstream runs in its own process")
        for loop_name in args.loops.split(","):
            if loop_name == "uvloop":
                try:
                    import uvloop
                except ImportError:
                    print("\nuvloop: not installed (pip install uvloop)")
                    continue
                results = uvloop.run(_run(base, args.rounds, args.calls, args.concurrency))
            else:
                results = asyncio.run(_run(base, args.rounds, args.calls, args.concurrency))
            _report(loop_name, results)
    finally:
        upstream.terminate()
        upstream.wait(10)


if __name__ == "__main__":
    main()
