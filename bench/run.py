"""The gateway benchmark: `python bench/run.py` or `python -m bench` (see `--help`).

Starts its own upstream (bench/upstream.py), the gateway (`python -m gateway serve`) and a load
generator (bench/loadgen.py, plus wrk for the plain-proxy figure) as separate processes on
127.0.0.1, measures each figure side by side in the same run, several times, and prints a table
(also written to bench/results/latest.md). Every figure is a ratio (or a per-request cost) taken
within one round; the table shows the median over rounds and the min-max.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.md"
HOST = "127.0.0.1"
MiB = 1024 * 1024
GiB = 1024 * MiB


# -- sizes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    runs: int
    samples: int  # samples per side per round (median taken within the round)
    fig1_n: int = 100
    fig1_delay_ms: int = 20
    fig2_n: int = 20
    fig2_delay_ms: int = 5
    fig3_parts: int = 100
    fig3_batches: int = 40
    fig4_n: int = 20
    fig5_seconds: float = 3.0
    fig5_latency_seconds: float = 2.5
    fig5_rate: int = 200
    fig5_connections: int = 32
    fig6_bytes: int = GiB


FULL = Sizes(runs=5, samples=5)
QUICK = Sizes(
    runs=1, samples=2, fig1_n=10, fig2_n=5, fig3_parts=10, fig3_batches=5, fig4_n=3,
    fig5_seconds=1.0, fig5_latency_seconds=0.5, fig5_connections=8, fig6_bytes=16 * MiB,
)


# -- results --------------------------------------------------------------------------------------


@dataclass
class Row:
    figure: int
    measure: str
    values: list[float]
    unit: str = ""
    target: str = ""
    check: Callable[[float], bool] | None = None
    digits: int = 2

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def met(self) -> str:
        if self.check is None or not self.values:
            return ""
        return "yes" if self.check(self.median) else "**no**"

    def cells(self) -> list[str]:
        fmt = f"{{:.{self.digits}f}}"
        if not self.values:
            return [str(self.figure), self.measure, "n/a", "", "", self.target, ""]
        spread = f"{fmt.format(min(self.values))} - {fmt.format(max(self.values))}"
        unit = f" {self.unit}" if self.unit else ""
        return [
            str(self.figure), self.measure, fmt.format(self.median) + unit, spread,
            str(len(self.values)), self.target, self.met(),
        ]


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def table(self) -> str:
        head = ["fig", "measure", "median", "min - max", "runs", "target", "met"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)


def median_of(values: list[float]) -> float:
    return statistics.median(values)


# -- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout} s")
        time.sleep(0.05)


class LoadGen:
    """The load-generator process: one JSON command per line, one JSON answer per line."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "loadgen.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the load generator died")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"load generator {op}: {answer['error']}")
        return answer

    def run(self, req: dict[str, Any], count: int = 1, concurrency: int = 1, **kw: Any) -> dict[str, Any]:
        answer = self.call("run", req=req, count=count, concurrency=concurrency, **kw)
        bad = {k: v for k, v in answer["statuses"].items() if not k.startswith("2")}
        if bad:
            raise RuntimeError(f"{req['url']}: unexpected statuses {bad}: {answer.get('sample', '')[:300]}")
        return answer

    def close(self) -> None:
        with suppress(Exception):
            self.call_quit()
        stop(self.proc)

    def call_quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write('{"op": "quit"}\n')
        self.proc.stdin.flush()
        self.proc.wait(5)


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def gateway_config(
    port: int, upstreams: dict[str, str], journal: str, workers: int | str = 1, loop: str = "auto",
    client: str = "lean",
) -> dict[str, Any]:
    return {
        "listen": {"host": HOST, "port": port, "workers": workers, "loop": loop},
        "upstreams": {
            # figure 1 sends 100 calls at once: the per-upstream bound must not serialise them
            "fast": {"url": upstreams["fast"], "concurrency": 200, "pool_size": 200, "client": client},
            "stream": {"url": upstreams["stream"], "client": client},
            "legacy": {"url": upstreams["legacy"], "infer_compensations": True, "client": client},
        },
        "routes": [
            {"prefix": "/echo", "upstream": "fast"},
            {"prefix": "/bytes", "upstream": "stream"},
            {"prefix": "/upload", "upstream": "stream"},
            {"prefix": "/orders", "upstream": "legacy"},
        ],
        "batch": {
            "json": {"path": "/batch/v1", "atomic": False},
            "multipart": {"path": "/v1/api/batch", "atomic": True},
        },
        "journal": {"path": journal},
        "shutdown_grace": 2,
    }


@dataclass
class Stack:
    tmp: Path
    upstream: subprocess.Popen[str]
    urls: dict[str, str]
    gateway: subprocess.Popen[bytes]
    gateway_url: str
    gw: psutil.Process
    load: LoadGen
    extra: list[subprocess.Popen[Any]] = field(default_factory=list)

    def gw_cpu(self) -> float:
        """CPU seconds of the gateway: its process plus its worker processes (listen.workers)."""
        total = 0.0
        for proc in [self.gw, *self.gw.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total


def gateway_command(log_level: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "gateway", "--log-level", log_level, "--log-json", "serve",
            "--config", str(config)]


@contextmanager
def stack(
    log_level: str, loop: str = "auto", workers: int | str = 1, client: str = "lean"
) -> Iterator[Stack]:
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    procs: list[subprocess.Popen[Any]] = []
    load: LoadGen | None = None
    try:
        upstream = subprocess.Popen(
            [sys.executable, str(HERE / "upstream.py"), HOST], stdout=subprocess.PIPE, text=True
        )
        procs.append(upstream)
        assert upstream.stdout is not None
        line = upstream.stdout.readline()
        if not line:
            raise RuntimeError("the upstream process failed to start")
        urls = json.loads(line)
        port = free_port()
        config = tmp / "gateway.yaml"
        journal = str(tmp / "journal.sqlite3")
        config.write_text(yaml.safe_dump(gateway_config(port, urls, journal, workers, loop, client)))
        with open(tmp / "gateway.log", "wb") as log:
            gateway = subprocess.Popen(
                gateway_command(log_level, config), stdout=log, stderr=subprocess.STDOUT, cwd=tmp
            )
        procs.append(gateway)
        gateway_url = f"http://{HOST}:{port}"
        wait_http(f"{gateway_url}/_gateway/readyz", proc=gateway)
        load = LoadGen()
        s = Stack(tmp, upstream, urls, gateway, gateway_url, psutil.Process(gateway.pid), load)
        yield s
        procs.extend(s.extra)
    finally:
        if load is not None:
            load.close()
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# -- helpers for the figures ----------------------------------------------------------------------


def json_batch(mode: str, items: list[dict[str, Any]]) -> str:
    return json.dumps({"Batch": {"batch_execution_type": mode, "items": [{"SingleItem": i} for i in items]}})


def statuses_in(document: Any) -> list[int]:
    """Every `status` found in a JSON batch answer (the sub-responses' statuses)."""
    found: list[int] = []
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "status" and isinstance(value, int):
                found.append(value)
            else:
                found += statuses_in(value)
    elif isinstance(document, list):
        for value in document:
            found += statuses_in(value)
    return found


def check_json_batch(answer: dict[str, Any], n: int) -> None:
    statuses = statuses_in(json.loads(answer["sample"]))
    good = [s for s in statuses if 200 <= s < 300]
    if len(good) < n:
        raise RuntimeError(f"batch answer has {len(good)}/{n} 2xx items: {answer['sample'][:400]}")


def interleaved(sides: dict[str, Callable[[], float]], samples: int) -> dict[str, float]:
    """Median of `samples` measurements of each side, taken A B C A B C ... (never in blocks)."""
    got: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(samples):
        for name, measure in sides.items():
            got[name].append(measure())
    return {name: median_of(values) for name, values in got.items()}


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- figure 1: Unordered JSON batch against one direct call ---------------------------------------


def figure1(st: Stack, sz: Sizes, report: Report) -> None:
    n, delay = sz.fig1_n, sz.fig1_delay_ms
    target = f"/echo/item?delay_ms={delay}"
    body = json_batch("Unordered", [{"method": "GET", "operation": target}] * n)
    batch = {"method": "POST", "url": f"{st.gateway_url}/batch/v1", "body": body,
             "headers": {"Content-Type": "application/json"}}
    direct = {"url": st.urls["fast"] + target}
    check_json_batch(st.load.run(batch, sample=True), n)
    st.load.run(direct, count=n, concurrency=n)  # warm the client's pool to n connections

    sides = {
        "batch": lambda: st.load.run(batch)["elapsed"],
        "one": lambda: st.load.run(direct)["elapsed"],
        "client": lambda: st.load.run(direct, count=n, concurrency=n)["elapsed"],
    }
    vs_one, vs_client, batch_ms, one_ms = [], [], [], []
    for r in range(sz.runs):
        m = interleaved(sides, sz.samples)
        vs_one.append(m["batch"] / m["one"])
        vs_client.append(m["batch"] / m["client"])
        batch_ms.append(m["batch"] * 1000)
        one_ms.append(m["one"] * 1000)
        progress(f"  fig1 run {r + 1}: batch {m['batch'] * 1000:.1f} ms, one {m['one'] * 1000:.1f} ms, "
                 f"client x{n} {m['client'] * 1000:.1f} ms")
    report.add(Row(1, f"Unordered batch of {n} x {delay} ms / one direct call", vs_one, "x",
                   "<= 1.3", lambda v: v <= 1.3))
    report.add(Row(1, f"Unordered batch of {n} / client making {n} concurrent calls", vs_client, "x"))
    report.add(Row(1, "  batch latency", batch_ms, "ms", digits=1))
    report.add(Row(1, "  one direct call latency", one_ms, "ms", digits=1))


# -- figure 2: Serial JSON batch against sequential direct calls ----------------------------------


def figure2(st: Stack, sz: Sizes, report: Report) -> None:
    n, delay = sz.fig2_n, sz.fig2_delay_ms
    target = f"/echo/item?delay_ms={delay}"
    body = json_batch("Serial", [{"method": "GET", "operation": target}] * n)
    batch = {"method": "POST", "url": f"{st.gateway_url}/batch/v1", "body": body,
             "headers": {"Content-Type": "application/json"}}
    direct = {"url": st.urls["fast"] + target}
    check_json_batch(st.load.run(batch, sample=True), n)
    sides = {
        "batch": lambda: st.load.run(batch)["elapsed"],
        "direct": lambda: st.load.run(direct, count=n, concurrency=1)["elapsed"],
    }
    ratio, batch_ms, direct_ms = [], [], []
    for r in range(sz.runs):
        m = interleaved(sides, sz.samples)
        ratio.append(m["batch"] / m["direct"])
        batch_ms.append(m["batch"] * 1000)
        direct_ms.append(m["direct"] * 1000)
        progress(f"  fig2 run {r + 1}: batch {m['batch'] * 1000:.1f} ms, "
                 f"{n} sequential {m['direct'] * 1000:.1f} ms")
    report.add(Row(2, f"Serial batch of {n} x {delay} ms / {n} sequential direct calls", ratio, "x",
                   "<= 1.1", lambda v: v <= 1.1, digits=3))
    report.add(Row(2, "  batch latency", batch_ms, "ms", digits=1))
    report.add(Row(2, f"  {n} sequential direct calls", direct_ms, "ms", digits=1))


# -- figure 3: multipart batch, gateway CPU per sub-request ---------------------------------------


def multipart_body(parts: int, boundary: str = "bench-boundary-7f3a") -> tuple[bytes, str]:
    chunks = []
    for i in range(parts):
        chunks.append(
            f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <{i}>\r\n\r\n"
            f"GET /echo/{i} HTTP/1.1\r\nHost: bench\r\n\r\n\r\n"
        )
    chunks.append(f"--{boundary}--\r\n")
    return "".join(chunks).encode(), f"multipart/mixed; boundary={boundary}"


def cpu_and_wall(st: Stack, req: dict[str, Any], count: int, concurrency: int) -> tuple[float, float]:
    before = st.gw_cpu()
    answer = st.load.run(req, count=count, concurrency=concurrency)
    return st.gw_cpu() - before, answer["elapsed"]


def figure3(st: Stack, sz: Sizes, report: Report) -> None:
    parts, batches = sz.fig3_parts, sz.fig3_batches
    body, ctype = multipart_body(parts)
    batch = {
        "method": "POST", "url": f"{st.gateway_url}/v1/api/batch",
        "body_b64": base64.b64encode(body).decode(),
        "headers": {"Content-Type": ctype, "X-Batch-Atomic": "false", "X-Batch-Execution": "Unordered"},
    }
    answer = st.load.run(batch, sample=True)
    ok = answer["sample"].count("HTTP/1.1 200")
    if ok != parts:
        raise RuntimeError(f"multipart answer has {ok}/{parts} 200 parts: {answer['sample'][:400]}")
    proxied = {"url": f"{st.gateway_url}/echo/plain"}
    st.load.run(proxied, count=200, concurrency=8)
    items = [{"method": "GET", "operation": f"/echo/item-{i}"} for i in range(parts)]
    json_req = {"method": "POST", "url": f"{st.gateway_url}/batch/v1", "body": json_batch("Unordered", items),
                "headers": {"Content-Type": "application/json", "X-Batch-Atomic": "false"}}
    check_json_batch(st.load.run(json_req, sample=True), parts)
    subs = parts * batches
    cpu_us, rate, proxy_us, ratio, json_us = [], [], [], [], []
    for r in range(sz.runs):
        cpu, wall = cpu_and_wall(st, batch, batches, 2)
        jcpu, _ = cpu_and_wall(st, json_req, batches, 2)
        pcpu, _ = cpu_and_wall(st, proxied, subs, 8)
        json_us.append(jcpu / subs * 1e6)
        cpu_us.append(cpu / subs * 1e6)
        rate.append(subs / wall)
        proxy_us.append(pcpu / subs * 1e6)
        ratio.append((cpu / subs) / (pcpu / subs) if pcpu > 0 else float("nan"))
        progress(f"  fig3 run {r + 1}: {cpu_us[-1]:.0f} us/sub-request, {rate[-1]:.0f} sub-requests/s, "
                 f"plain proxy {proxy_us[-1]:.0f} us/request")
    report.add(Row(3, f"multipart batch of {parts}: gateway CPU per sub-request", cpu_us, "us", digits=0))
    report.add(Row(3, f"JSON batch of {parts} GETs: gateway CPU per sub-request (same run)", json_us, "us",
                   "<= 100", lambda v: v <= 100, digits=0))
    report.add(Row(3, "  multipart sub-requests/s through one gateway process", rate, "/s", digits=0))
    report.add(Row(3, "  gateway CPU per plain proxied request (same run)", proxy_us, "us", digits=0))
    report.add(Row(3, "  sub-request CPU / proxied request CPU", ratio, "x"))


# -- figure 4: atomic (journaled, compensated) batch against the same batch non-atomic -----------


def figure4(st: Stack, sz: Sizes, report: Report) -> None:
    n = sz.fig4_n
    items = [{"method": "POST", "operation": "/orders", "body": {"item": f"sku-{i}", "qty": 1}}
             for i in range(n)]
    body = json_batch("Serial", items)
    url = f"{st.gateway_url}/batch/v1"
    atomic = {"method": "POST", "url": url, "body": body,
              "headers": {"Content-Type": "application/json", "X-Batch-Atomic": "true"}}
    plain = {"method": "POST", "url": url, "body": body,
             "headers": {"Content-Type": "application/json", "X-Batch-Atomic": "false"}}
    answer = st.load.run(atomic, sample=True)
    check_json_batch(answer, n)
    outcome = answer["headers"].get("X-Batch-Outcome")
    if outcome is None:
        raise RuntimeError(f"the atomic batch answered without X-Batch-Outcome: {answer['headers']}")
    check_json_batch(st.load.run(plain, sample=True), n)
    sides = {
        "atomic": lambda: st.load.run(atomic)["elapsed"],
        "plain": lambda: st.load.run(plain)["elapsed"],
    }
    ratio, atomic_ms, plain_ms = [], [], []
    for r in range(sz.runs):
        m = interleaved(sides, sz.samples)
        ratio.append(m["atomic"] / m["plain"])
        atomic_ms.append(m["atomic"] * 1000)
        plain_ms.append(m["plain"] * 1000)
        progress(f"  fig4 run {r + 1}: atomic {m['atomic'] * 1000:.1f} ms, plain {m['plain'] * 1000:.1f} ms")
    report.add(Row(4, f"atomic Serial batch of {n} POST /orders / same batch non-atomic", ratio, "x"))
    report.add(Row(4, f"  atomic latency (outcome {outcome})", atomic_ms, "ms", digits=1))
    report.add(Row(4, "  non-atomic latency", plain_ms, "ms", digits=1))
    per_call = [(a - p) / n for a, p in zip(atomic_ms, plain_ms, strict=True)]
    report.add(Row(4, "  journaling overhead per call", per_call, "ms", digits=2))


# -- figure 5: plain proxy against nginx ----------------------------------------------------------


def ensure_tools(install: bool, report: Report) -> tuple[str | None, str | None]:
    """(wrk path, nginx path), installing Debian's packages if missing and allowed."""
    wrk, nginx = shutil.which("wrk"), shutil.which("nginx") or _sbin("nginx")
    if (wrk and nginx) or not install:
        return wrk, nginx
    apt = shutil.which("apt-get")
    if apt is None:
        report.notes.append("apt-get not found: cannot install wrk/nginx.")
        return wrk, nginx
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    wanted = [p for p, have in (("wrk", wrk), ("nginx-light", nginx)) if not have]
    progress(f"  installing {' '.join(wanted)} from Debian's packages ...")
    for attempt in (wanted, [("nginx" if p == "nginx-light" else p) for p in wanted]):
        done = subprocess.run([apt, "install", "-y", "-qq", *attempt], env=env,
                              capture_output=True, text=True, timeout=240)
        if done.returncode != 0 and "Unable to locate" in done.stderr + done.stdout:
            subprocess.run([apt, "update", "-qq"], env=env, capture_output=True, timeout=240)
            done = subprocess.run([apt, "install", "-y", "-qq", *attempt], env=env,
                                  capture_output=True, text=True, timeout=240)
        if done.returncode == 0:
            break
        report.notes.append(f"`apt-get install {' '.join(attempt)}` failed: {done.stderr.strip()[-200:]}")
    return shutil.which("wrk"), shutil.which("nginx") or _sbin("nginx")


def _sbin(name: str) -> str | None:
    path = Path("/usr/sbin") / name
    return str(path) if path.exists() else None


NGINX_CONF = """daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    upstream backend {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_nginx(st: Stack, nginx: str) -> str:
    port = free_port()
    tmp = st.tmp / "nginx"
    tmp.mkdir()
    upstream = st.urls["fast"].removeprefix("http://")
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream, host=HOST, port=port))
    proc = subprocess.Popen(
        [nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    st.extra.append(proc)
    url = f"http://{HOST}:{port}"
    wait_http(f"{url}/echo/ready", proc=proc)
    return url


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _duration(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"cannot read wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk_load(wrk: str, url: str, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rate and p50 and p99):
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:.*", out)
    if errors or sock:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    return {"rps": float(rate.group(1)), "p50": _duration(p50.group(1)), "p99": _duration(p99.group(1))}


def py_load(st: Stack, url: str, connections: int, seconds: float) -> dict[str, float]:
    answer = st.load.call("load", url=url, connections=connections, duration=seconds)
    if answer["errors"]:
        raise RuntimeError(f"load generator saw {answer['errors']} errors against {url}")
    return {"rps": answer["requests"] / answer["elapsed"], "p50": answer["p50"], "p99": answer["p99"]}


def figure5(st: Stack, sz: Sizes, report: Report, install: bool) -> None:
    wrk, nginx = ensure_tools(install, report)
    if wrk is None:
        report.notes.append("wrk unavailable: figure 5 used the aiohttp load generator, which "
                            "saturates before nginx does, so the nginx ratio flatters the gateway.")
    if nginx is None:
        report.notes.append("nginx unavailable: figure 5 has no nginx column.")
    path = "/echo/plain"
    targets = {"direct": st.urls["fast"] + path, "gateway": st.gateway_url + path}
    if nginx is not None:
        targets["nginx"] = start_nginx(st, nginx) + path

    def load(url: str, conns: int, seconds: float) -> dict[str, float]:
        if wrk is not None:
            return wrk_load(wrk, url, conns, seconds)
        return py_load(st, url, conns, seconds)

    for url in targets.values():  # warm pools and connections
        load(url, sz.fig5_connections, 1)
    got: dict[str, dict[str, list[float]]] = {
        name: {"rps": [], "p50": [], "p99": [], "p50_1": [], "p99_1": []} for name in targets
    }
    ratio, added_p99, added_p50, nginx_added_p99 = [], [], [], []
    names = list(targets)
    for r in range(sz.runs):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            sat = load(targets[name], sz.fig5_connections, sz.fig5_seconds)
            one = st.load.call("paced", url=targets[name], rate=sz.fig5_rate,
                               duration=sz.fig5_latency_seconds)
            if one["errors"]:
                raise RuntimeError(f"{name}: {one['errors']} failed requests at {sz.fig5_rate} req/s")
            got[name]["rps"].append(sat["rps"])
            got[name]["p50"].append(sat["p50"] * 1000)
            got[name]["p99"].append(sat["p99"] * 1000)
            got[name]["p50_1"].append(one["p50"] * 1000)
            got[name]["p99_1"].append(one["p99"] * 1000)
        g, d = got["gateway"], got["direct"]
        added_p99.append(g["p99_1"][-1] - d["p99_1"][-1])
        added_p50.append(g["p50_1"][-1] - d["p50_1"][-1])
        line = f"  fig5 run {r + 1}: gateway {g['rps'][-1]:.0f} req/s"
        if "nginx" in got:
            ng = got["nginx"]
            ratio.append(g["rps"][-1] / ng["rps"][-1])
            nginx_added_p99.append(ng["p99_1"][-1] - d["p99_1"][-1])
            line += f", nginx {ng['rps'][-1]:.0f} req/s"
        progress(line + f", direct {d['rps'][-1]:.0f} req/s; p99 at {sz.fig5_rate} req/s: gateway "
                 f"{g['p99_1'][-1]:.2f} ms, direct {d['p99_1'][-1]:.2f} ms")
    tool = "wrk -t1" if wrk else "aiohttp loadgen"
    if "nginx" in got:
        report.add(Row(5, "gateway req/s / nginx req/s", ratio, "x", ">= 0.25", lambda v: v >= 0.25))
        p99_ratio = [g / n for g, n in zip(got["gateway"]["p99"], got["nginx"]["p99"], strict=True) if n > 0]
        report.add(Row(5, "gateway p99 / nginx p99 under that load", p99_ratio, "x", "<= 5",
                       lambda v: v <= 5))
    paced = f"at {sz.fig5_rate} req/s"
    report.add(Row(5, f"gateway p99 added over direct, {paced}", added_p99, "ms", "<= 2",
                   lambda v: v <= 2.0, digits=3))
    report.add(Row(5, f"gateway p50 added over direct, {paced}", added_p50, "ms", digits=3))
    if nginx_added_p99:
        report.add(Row(5, f"nginx p99 added over direct, {paced}", nginx_added_p99, "ms", digits=3))
    conns = f"{sz.fig5_connections} connections"
    for name in targets:
        report.add(Row(5, f"  {name}: req/s ({tool}, {conns})", got[name]["rps"], "/s", digits=0))
        report.add(Row(5, f"  {name}: p50 at {conns}", got[name]["p50"], "ms"))
        report.add(Row(5, f"  {name}: p99 at {conns}", got[name]["p99"], "ms"))
        report.add(Row(5, f"  {name}: p50 {paced} (aiohttp client, 1 connection)", got[name]["p50_1"],
                       "ms", digits=3))
        report.add(Row(5, f"  {name}: p99 {paced} (aiohttp client, 1 connection)", got[name]["p99_1"],
                       "ms", digits=3))


# -- figure 6: streaming 1 GiB through the gateway, peak RSS -------------------------------------


class RssSampler:
    def __init__(self, proc: psutil.Process, every: float = 0.01) -> None:
        self.proc, self.every, self.peak = proc, every, proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with suppress(psutil.Error):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def figure6(st: Stack, sz: Sizes, report: Report) -> None:
    size = sz.fig6_bytes
    label = f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"
    idle = st.gw.memory_info().rss / MiB
    down_peak, up_peak, down_rate, up_rate = [], [], [], []
    for r in range(sz.runs):
        with RssSampler(st.gw) as sampler:
            answer = st.load.call("download", url=f"{st.gateway_url}/bytes/{size}")
        if answer["status"] != 200 or answer["bytes"] != size:
            raise RuntimeError(f"download through the gateway: {answer}")
        down_peak.append(sampler.peak / MiB)
        down_rate.append(size / MiB / answer["elapsed"])
        with RssSampler(st.gw) as sampler:
            answer = st.load.call("upload", url=f"{st.gateway_url}/upload", size=size)
        if answer["status"] != 200 or json.loads(answer["body"]).get("bytes") != size:
            raise RuntimeError(f"upload through the gateway: {answer}")
        up_peak.append(sampler.peak / MiB)
        up_rate.append(size / MiB / answer["elapsed"])
        progress(f"  fig6 run {r + 1}: download peak {down_peak[-1]:.1f} MiB ({down_rate[-1]:.0f} MiB/s), "
                 f"upload peak {up_peak[-1]:.1f} MiB ({up_rate[-1]:.0f} MiB/s)")
    report.add(Row(6, f"gateway peak RSS, {label} download", down_peak, "MiB", "< 120",
                   lambda v: v < 120, digits=1))
    report.add(Row(6, f"gateway peak RSS, {label} upload", up_peak, "MiB", "< 120",
                   lambda v: v < 120, digits=1))
    report.add(Row(6, "  gateway RSS when idle before streaming", [idle], "MiB", digits=1))
    report.add(Row(6, "  download throughput", down_rate, "MiB/s", digits=0))
    report.add(Row(6, "  upload throughput", up_rate, "MiB/s", digits=0))


# -- profiling ----------------------------------------------------------------------------------


@contextmanager
def profiled(st: Stack, directory: str | None, figure: int) -> Iterator[None]:
    """Run py-spy on the gateway process while the body runs (no-op without a directory)."""
    if directory is None:
        yield
        return
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--py-spy: py-spy is not on PATH (pip install py-spy)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"fig{figure}.collapsed.txt"
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(st.gw.pid), "--rate", "250", "--format", "raw",
         "--output", str(raw), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if raw.exists():
            (out / f"fig{figure}.top.txt").write_text(summarise_stacks(raw.read_text()))


def summarise_stacks(collapsed: str, top: int = 25) -> str:
    """Top functions by self and by inclusive samples, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    by_file: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack_text.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        where = re.search(r"\(([^()]*)\)$", frames[-1])
        source = where.group(1) if where else "?"
        by_file[source] = by_file.get(source, 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    lines = [f"{total} samples", "", "self%  source file"]
    for source, count in sorted(by_file.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / max(total, 1):5.1f}  {source}")
    lines += ["", "self%  function"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / max(total, 1):5.1f}  {frame}")
    lines += ["", "incl%  function"]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[: top * 2]:
        lines.append(f"{100 * count / max(total, 1):5.1f}  {frame}")
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run (a smoke test)")
    parser.add_argument("--only", default="", help="figures to run, e.g. 1 or 1,3,5 (default: all)")
    parser.add_argument("--runs", type=int, default=None, help="rounds per figure (default 5; quick 1)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk/nginx")
    parser.add_argument("--gateway-log-level", default="INFO",
                        help="the gateway's --log-level (INFO: one access-log line per request)")
    parser.add_argument("--output", default=str(RESULTS), help="markdown file for the results")
    parser.add_argument("--workers", default="1",
                        help="gateway worker processes (listen.workers: a number or auto); a comma "
                        "list (e.g. 1,auto) runs every figure once per value, reported side by side. "
                        "Figure 6 samples the supervisor's RSS only, so it runs with 1 worker only")
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"),
                        help="the gateway's listen.loop (auto: uvloop where installed); a comma list "
                        "is not supported: run twice to compare")
    parser.add_argument("--uvloop", action="store_true", help="same as --loop uvloop")
    parser.add_argument("--client", default="lean", choices=("lean", "aiohttp"),
                        help="the upstreams' HTTP client (upstreams.<n>.client)")
    parser.add_argument("--py-spy", default=None, metavar="DIR",
                        help="sample the gateway with py-spy during each figure; collapsed stacks "
                        "and a top-functions summary go to DIR (py-spy must be on PATH)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.runs is not None:
        sizes = Sizes(**{**sizes.__dict__, "runs": args.runs})
    only = {int(x) for x in args.only.split(",") if x.strip()} or {1, 2, 3, 4, 5, 6}
    report = Report()
    started = time.monotonic()
    figures: dict[int, Callable[[Stack], None]] = {
        1: lambda st: figure1(st, sizes, report),
        2: lambda st: figure2(st, sizes, report),
        3: lambda st: figure3(st, sizes, report),
        4: lambda st: figure4(st, sizes, report),
        5: lambda st: figure5(st, sizes, report, install=not args.no_install),
        6: lambda st: figure6(st, sizes, report),
    }
    loop = "uvloop" if args.uvloop else args.loop
    settings = [w.strip() for w in str(args.workers).split(",") if w.strip()]
    for workers in settings:
        first = len(report.rows)
        with stack(args.gateway_log_level, loop, _workers(workers), args.client) as st:
            for number in sorted(only):
                if number == 6 and workers != "1":
                    continue  # it samples one process's RSS
                progress(f"figure {number} ({workers} worker(s)) ...")
                with profiled(st, args.py_spy, number):
                    figures[number](st)
        if len(settings) > 1:
            for row in report.rows[first:]:
                row.measure = f"{row.measure} [workers {workers}]"
    elapsed = time.monotonic() - started
    text = render(report, sizes, args, elapsed)
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0


def _workers(text: str) -> int | str:
    return text if text == "auto" else int(text)


def render(report: Report, sizes: Sizes, args: argparse.Namespace, elapsed: float) -> str:
    import aiohttp

    lines = [
        "# Gateway benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {'quick' if args.quick else 'full'} run, "
        f"{sizes.runs} round(s) per figure, {sizes.samples} samples per side per round; "
        f"{elapsed:.0f} s in all.",
        f"Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}; gateway log level "
        f"{args.gateway_log_level}, loop {'uvloop' if args.uvloop else args.loop}, workers {args.workers}, "
        f"client {args.client}. "
        "Upstream, gateway and load generator are separate processes.",
        "",
        report.table(),
    ]
    if report.notes:
        lines += ["", "Notes:", *[f"- {note}" for note in report.notes]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
