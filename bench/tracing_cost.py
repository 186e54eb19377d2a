"""What tracing costs: gateway CPU per sub-request with tracing off and on, side by side.

    python bench/tracing_cost.py [--rounds 7] [--batches 40] [--items 50] [--mode Unordered]

(or `python -m bench.tracing_cost`). Starts, as separate processes on 127.0.0.1:

- the benchmark's upstream (bench/upstream.py; its `fast` listener answers every call in µs),
- an OTLP/HTTP sink (this file with `--sink`): it accepts `POST /v1/traces` as a collector would,
  decodes each export request and counts the spans (`GET /count`),
- three gateways (`python -m gateway serve`) that differ only in tracing:
  `off`; `on`: OpenTelemetry, every span exported over OTLP/HTTP to the sink (the default
  `otlp` exporter configured by OTEL_EXPORTER_OTLP_ENDPOINT, BatchSpanProcessor with
  OTEL_BSP_SCHEDULE_DELAY=100 ms); `unsampled`: the same with OTEL_TRACES_SAMPLER=always_off (spans
  are started and propagated, nothing is recorded or exported).

Each round drives every gateway in turn (off, on, unsampled, off, on, ...: never in blocks) with
the same JSON batches (`--batches` of `--items` GETs each, `--concurrency` batches at a time) from
this process, and takes the gateway process's CPU time (user + system, all its threads, so the
exporter's thread too, via psutil) before and after. For `on` the round ends only when the sink has
received every span of the round (1 server + 1 batch + 1 client span per sub-request), so the
export is paid inside the round. Prints CPU µs per sub-request per round, the medians and the
difference; the gateways log at `--log-level` (default warning, so logging does not drown the
difference).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml
from aiohttp import web

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
SIDES = ("off", "on", "unsampled")


# -- the OTLP sink (`--sink`) -----------------------------------------------------------------------


async def _sink() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    counts = {"spans": 0, "requests": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        counts["requests"] += 1
        counts["bytes"] += len(body)
        counts["spans"] += sum(
            len(scope.spans) for resource in export.resource_spans for scope in resource.scope_spans
        )
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    server: Any = site._server
    print(json.dumps({"url": f"http://{HOST}:{server.sockets[0].getsockname()[1]}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# -- processes --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def first_line(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the {what} process failed to start")
    answer: dict[str, Any] = json.loads(line)
    return answer


def gateway_config(port: int, fast: str, journal: str, tracing: bool) -> dict[str, Any]:
    return {
        "listen": {"host": HOST, "port": port},
        "upstreams": {"fast": {"url": fast, "concurrency": 200, "pool_size": 200}},
        "routes": [{"prefix": "/echo", "upstream": "fast"}],
        "batch": {"json": {"path": "/batch/v1", "atomic": False}},
        "journal": {"path": journal},
        "shutdown_grace": 2,
        "tracing": {"enabled": tracing, "service_name": "bench-gateway"},
    }


def side_environment(side: str, sink: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if side == "off":
        return env
    env.update({
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": f"bench-gateway-{side}",
    })
    if side == "unsampled":
        env["OTEL_TRACES_SAMPLER"] = "always_off"
    return env


@dataclass
class Gateway:
    side: str
    url: str
    proc: subprocess.Popen[bytes]
    cpu_us: list[float] = field(default_factory=list)

    def cpu(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)


async def wait_ready(session: aiohttp.ClientSession, gateway: Gateway, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if gateway.proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"gateway {gateway.side} exited with {gateway.proc.returncode}: {tail}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(f"{gateway.url}/_gateway/readyz") as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway {gateway.side} was not ready within 30 s")
        await asyncio.sleep(0.05)


# -- measuring --------------------------------------------------------------------------------------


def batch_body(mode: str, items: int) -> bytes:
    calls = [{"SingleItem": {"method": "GET", "operation": f"/echo/{n}"}} for n in range(items)]
    return json.dumps({"Batch": {"batch_execution_type": mode, "items": calls}}).encode()


async def drive(
    session: aiohttp.ClientSession, gateway: Gateway, body: bytes, batches: int, concurrency: int,
    items: int,
) -> None:
    """`batches` batches, `concurrency` at a time; every sub-request must have answered 200."""
    queue = iter(range(batches))

    async def worker() -> None:
        for _ in queue:
            async with session.post(
                f"{gateway.url}/batch/v1", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                answer = await response.read()
            if response.status != 200 or answer.count(b'"status":200') != items:
                raise RuntimeError(f"gateway {gateway.side}: {response.status} {answer[:300]!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def spans_at_sink(session: aiohttp.ClientSession, sink: str) -> int:
    async with session.get(f"{sink}/count") as response:
        counts: dict[str, int] = await response.json()
    return counts["spans"]


async def until_exported(session: aiohttp.ClientSession, sink: str, expected: int) -> None:
    deadline = time.monotonic() + 30
    while await spans_at_sink(session, sink) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink got {await spans_at_sink(session, sink)} of {expected} spans")
        await asyncio.sleep(0.02)


async def measure(args: argparse.Namespace, gateways: list[Gateway], sink: str) -> int:
    """Rounds of A B C; returns the spans the sink received for the batches."""
    body = batch_body(args.mode, args.items)
    spans_per_batch = 2 + args.items  # server, batch, one client span per sub-request
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for gateway in gateways:
            await wait_ready(session, gateway, Path(args.tmp) / f"gateway-{gateway.side}.log")
        await asyncio.sleep(0.3)  # the `on` gateway's readiness checks were spans too: let them arrive
        baseline = exported = await spans_at_sink(session, sink)
        for gateway in gateways:  # warm up: connection pools, first-call costs
            await drive(session, gateway, body, args.warmup, args.concurrency, args.items)
            if gateway.side == "on":
                exported += args.warmup * spans_per_batch
                await until_exported(session, sink, exported)
        subs = args.batches * args.items
        for number in range(1, args.rounds + 1):
            for gateway in gateways:
                before = gateway.cpu()
                await drive(session, gateway, body, args.batches, args.concurrency, args.items)
                if gateway.side == "on":
                    exported += args.batches * spans_per_batch
                    await until_exported(session, sink, exported)
                gateway.cpu_us.append((gateway.cpu() - before) / subs * 1e6)
            cells = "  ".join(f"{g.side} {g.cpu_us[-1]:6.1f}" for g in gateways)
            print(f"  round {number}: µs CPU per sub-request: {cells}", file=sys.stderr, flush=True)
        return await spans_at_sink(session, sink) - baseline


def report(args: argparse.Namespace, gateways: list[Gateway], spans: int, elapsed: float) -> str:
    by_side = {g.side: g.cpu_us for g in gateways}
    median = {side: statistics.median(values) for side, values in by_side.items()}
    lines = [
        "# Tracing cost: gateway CPU per sub-request",
        "",
        f"{args.rounds} round(s) x {args.batches} {args.mode} batches of {args.items} GETs "
        f"({args.batches * args.items} sub-requests per side per round), {args.concurrency} batch(es) "
        f"at a time; sides alternated within each round; gateway log level {args.log_level}; "
        f"{elapsed:.0f} s in all.",
        "",
        "| side | median µs CPU / sub-request | min - max |",
        "|---|---|---|",
    ]
    labels = {
        "off": "tracing off",
        "on": "tracing on, every span exported (OTLP/HTTP)",
        "unsampled": "tracing on, sampler always_off",
    }
    for side in SIDES:
        values = by_side[side]
        lines.append(f"| {labels[side]} | {median[side]:.1f} | {min(values):.1f} - {max(values):.1f} |")
    rounds = list(zip(by_side["off"], by_side["on"], by_side["unsampled"], strict=True))
    extra_on = statistics.median(on - off for off, on, _ in rounds)
    extra_unsampled = statistics.median(uns - off for off, _, uns in rounds)
    lines += [
        "",
        f"tracing on costs {extra_on:+.1f} µs CPU per sub-request ({percent(extra_on, median['off'])}), "
        f"unsampled {extra_unsampled:+.1f} µs ({percent(extra_unsampled, median['off'])}): "
        "medians of the per-round differences.",
        f"The sink received {spans} spans "
        f"(expected {(args.rounds * args.batches + args.warmup) * (2 + args.items)}).",
    ]
    return "\n".join(lines)


def percent(extra: float, base: float) -> str:
    return f"{extra / base * 100:+.0f} %" if base > 0 else "n/a"


# -- main -------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=40, help="batches per side per round")
    parser.add_argument("--items", type=int, default=50, help="sub-requests per batch")
    parser.add_argument("--mode", choices=("Unordered", "Serial"), default="Unordered")
    parser.add_argument("--concurrency", type=int, default=2, help="batches in flight at once")
    parser.add_argument("--warmup", type=int, default=5, help="batches per side before measuring")
    parser.add_argument("--log-level", default="warning", help="the gateways' --log-level")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.sink:
        asyncio.run(_sink())
        return 0
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-tracing-bench-"))
    args.tmp = str(tmp)
    procs: list[subprocess.Popen[Any]] = []
    logs: list[Any] = []
    try:
        upstream = subprocess.Popen(
            [sys.executable, str(HERE / "upstream.py"), HOST], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        procs.append(upstream)
        sink_proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--sink"], stdout=subprocess.PIPE, text=True,
            cwd=ROOT,
        )
        procs.append(sink_proc)
        fast = first_line(upstream, "upstream")["fast"]
        sink = first_line(sink_proc, "OTLP sink")["url"]
        gateways = []
        for side in SIDES:
            port = free_port()
            config = tmp / f"gateway-{side}.yaml"
            journal = str(tmp / f"journal-{side}.sqlite3")
            config.write_text(yaml.safe_dump(gateway_config(port, fast, journal, side != "off")))
            log = open(tmp / f"gateway-{side}.log", "wb")  # noqa: SIM115 (closed in finally)
            logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--log-level", args.log_level, "serve",
                 "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=side_environment(side, sink),
            )
            procs.append(proc)
            gateways.append(Gateway(side, f"http://{HOST}:{port}", proc))
        spans = asyncio.run(measure(args, gateways, sink))
        print(report(args, gateways, spans, time.monotonic() - started))
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        for log in logs:
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
