"""Atomic batch overhead per call: the PostgreSQL journal next to the SQLite one, in one run.

`python -m bench.journal_overhead [--calls 20] [--rounds 5] [--batches 20]` starts the demo upstreams
in this process, a private PostgreSQL server (tests/pg_cluster.py, fsync on) and two gateway
processes, one per journal, then sends the same Serial batch of POSTs atomic and not, interleaved.
Overhead per call = (atomic - plain) / calls; median and min-max of the round medians.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.demo.launcher import demo_config_data, start_demo_upstreams
from tests.pg_cluster import running_cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_gateway(config: dict[str, Any], directory: Path) -> tuple[asyncio.subprocess.Process, str]:
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    with (directory / "gateway.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--log-level", "warning", "--log-json", "serve",
            "--config", str(path), stdout=log, stderr=asyncio.subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{config['listen']['port']}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(f"{base}/_gateway/readyz") as response:
                    if response.status == 200:
                        return process, base
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    process.kill()
    raise RuntimeError(f"gateway did not start: {(directory / 'gateway.log').read_text()[-2000:]}")


async def batch_ms(session: aiohttp.ClientSession, base: str, document: dict[str, Any], atomic: bool,
                   count: int) -> float:
    """Median wall time of `count` batches, in ms."""
    times = []
    headers = {"X-Batch-Atomic": "true" if atomic else "false", "Authorization": "Bearer bench"}
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(f"{base}/batch/v1", json=document, headers=headers) as response:
            body = await response.json()
            if response.status != 200 or (atomic and body["atomic"]["outcome"] != "committed"):
                raise RuntimeError(f"unexpected answer {response.status}: {str(body)[:300]}")
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


async def measure(args: argparse.Namespace, pg_url: str) -> dict[str, dict[str, list[float]]]:
    runners, legacy, ledger = await start_demo_upstreams()
    tmp = Path(tempfile.mkdtemp(prefix="journal-bench-"))
    journals = {"sqlite": {"path": str(tmp / "journal.sqlite3")}, "postgresql": {"url": pg_url}}
    processes, bases = [], {}
    try:
        for name, journal in journals.items():
            (tmp / name).mkdir()
            config = demo_config_data(legacy, ledger, port=free_port())
            config["journal"] = journal
            process, bases[name] = await start_gateway(config, tmp / name)
            processes.append(process)
        document = {"Batch": {"batch_execution_type": "Serial", "items": [
            {"SingleItem": {"method": "POST", "operation": "/orders", "body": {"n": n}}}
            for n in range(args.calls)
        ]}}
        results: dict[str, dict[str, list[float]]] = {
            name: {"atomic": [], "plain": [], "per_call": []} for name in journals
        }
        async with aiohttp.ClientSession() as session:
            for round_ in range(args.rounds + 1):  # the first round warms up
                for name, base in bases.items():
                    atomic = await batch_ms(session, base, document, True, args.batches)
                    plain = await batch_ms(session, base, document, False, args.batches)
                    if round_:
                        results[name]["atomic"].append(atomic)
                        results[name]["plain"].append(plain)
                        results[name]["per_call"].append((atomic - plain) / args.calls)
                        print(f"  round {round_} {name}: atomic {atomic:.1f} ms, plain {plain:.1f} ms",
                              file=sys.stderr)
        return results
    finally:
        for process in processes:
            process.terminate()
            await process.wait()
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20, help="POSTs per batch (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--batches", type=int, default=20, help="batches per side per round (default 20)")
    args = parser.parse_args()
    with running_cluster(fsync=True) as cluster:
        results = asyncio.run(measure(args, cluster.create_database("bench")))
    print(f"atomic Serial batch of {args.calls} POST /orders, median (min-max) of {args.rounds} rounds "
          f"of {args.batches} batches each")
    print(f"{'journal':<12} {'atomic ms':>20} {'plain ms':>20} {'overhead per call ms':>24}")
    for name, values in results.items():
        print(f"{name:<12} {spread(values['atomic'], 1):>20} {spread(values['plain'], 1):>20} "
              f"{spread(values['per_call']):>24}")
    ratio = [p / s for p, s in zip(results["postgresql"]["per_call"], results["sqlite"]["per_call"],
                                   strict=True)]
    print(f"PostgreSQL / SQLite overhead per call: {spread(ratio)}")


if __name__ == "__main__":
    main()
