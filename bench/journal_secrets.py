"""Cost of journal secrets: atomic batch latency with and without an Authorization header.

With one, the journal keeps it in its secrets table and erases it (delete, WAL truncate) when the
batch settles. `python -m bench.journal_secrets` runs both sides interleaved, 5 rounds of 40.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

import aiohttp

from gateway.app import create_app
from gateway.demo.launcher import demo_config, start_demo_upstreams, start_site
from gateway.log import configure_logging


async def main() -> None:
    configure_logging(level="WARNING", json_output=True)
    runners, legacy, ledger = await start_demo_upstreams()
    tmp = tempfile.mkdtemp()
    config = demo_config(legacy, ledger, port=0, journal=f"{tmp}/j.sqlite3")
    app = create_app(config)
    runner, url = await start_site(app)
    doc = {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": "POST", "operation": "/orders", "body": {"n": i}}} for i in range(5)]}}
    results: dict[str, list[float]] = {"with Authorization": [], "without": []}
    async with aiohttp.ClientSession() as s:
        for rnd in range(6):
            for label, extra in (("with Authorization", {"Authorization": "Bearer abc"}), ("without", {})):
                times = []
                for _ in range(40):
                    t = time.perf_counter()
                    headers = {"X-Batch-Atomic": "true", **extra}
                    async with s.post(f"{url}/batch/v1", json=doc, headers=headers) as r:
                        assert r.status == 200, await r.text()
                        await r.read()
                    times.append(time.perf_counter() - t)
                if rnd:  # the first round warms up
                    results[label].append(statistics.median(times) * 1000)
    for k, v in results.items():
        print(f"{k}: {statistics.median(v):.2f} ms per 5-POST atomic batch "
              f"(round medians {min(v):.2f}-{max(v):.2f})")
    await runner.cleanup()
    for demo in runners:
        await demo.cleanup()
if __name__ == "__main__":
    asyncio.run(main())
