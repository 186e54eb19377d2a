"""The dashboard screenshot, rendered from a real run: `python -m bench.dashboard [--seconds 60]`.

Starts the demo upstreams (legacy: compensation, ledger: transaction tokens) in one process and the
gateway (`python -m gateway serve`, `listen.workers: 2`, so every scrape is the workers' merged
series) on 127.0.0.1 free ports, drives mixed traffic for `--seconds` while scraping
`/_gateway/metrics` every `--scrape-interval` seconds, then evaluates what the panels of
examples/grafana/batch-gateway.json plot (rates from counter deltas, `histogram_quantile` from bucket
deltas, ratios, gauges) from those scrapes only, and draws them with matplotlib to
docs/dashboard.png. A text summary of the run's figures goes to stdout.

The traffic (all of it real calls to real loopback upstreams):
- proxied GET/POST/PUT on /orders (legacy) and /accounts (ledger), /echo with small delays, a few 404s;
- JSON batches (Serial and Unordered, 1 to 40 items) and multipart batches (atomic);
- atomic JSON batches spanning both upstreams, about a third of them ending in a failing item, so
  they roll back (compensations on legacy, a transaction rollback on ledger);
- `reports`: the legacy service behind a 3-connection pool with `timeouts.pool` 0.25 s and
  `timeouts.total` 1 s, and `offline`: a port nothing listens on (connect errors, health down);
- phases: a burst (x3 proxied traffic and a pool-saturating load on `reports`) at 30-50 % of the run,
  a SIGHUP config reload at 50 %, and at 60-80 % the legacy upstream is told every 2 s to fail its next
  2, 3 or 5 undo DELETEs (undo retries; after 4 attempts a rollback gives up: `rollback_incomplete`).

`--scrapes FILE` keeps the raw expositions (JSON lines); `--replay FILE` renders from such a file
without running anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.run import HOST, free_port, gateway_command, stop, wait_http

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_JSON = ROOT / "examples" / "grafana" / "batch-gateway.json"
DEFAULT_OUTPUT = ROOT / "docs" / "dashboard.png"
COMMAND = "python -m bench.dashboard"

Labels = tuple[tuple[str, str], ...]
Sample = dict[tuple[str, Labels], float]
Scrapes = list[tuple[float, str]]
"""(time, exposition text) of each scrape."""
Key = tuple[str, ...]
By = tuple[str, ...]
Buckets = list[tuple[float, float]]
Phases = list[tuple[float, float]]
UPSTREAM_SECONDS = "gateway_upstream_request_duration_seconds"
BATCH_SIZE = "gateway_batch_subrequests"


# -- the stack: upstreams and gateway -------------------------------------------------------------


async def _serve_upstreams() -> None:
    """The `--serve-upstreams` process: the two demo services; their URLs as one JSON line."""
    from gateway.demo.launcher import start_demo_upstreams

    runners, legacy, ledger = await start_demo_upstreams(idempotency_keys=True)
    print(json.dumps({"legacy": legacy, "ledger": ledger}), flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    for runner in runners:
        await runner.cleanup()


def gateway_config(
    port: int, urls: dict[str, str], closed: int, journal: str, workers: int
) -> dict[str, Any]:
    """The demo config (gateway/demo/launcher.py) plus the `reports` and `offline` upstreams."""
    from gateway.demo.launcher import demo_config_data

    data = demo_config_data(urls["legacy"], urls["ledger"], port=port, journal=journal, idempotency_keys=True)
    check = {"interval": 2, "timeout": 1}
    data["listen"].update({"host": HOST, "workers": workers})
    data["upstreams"]["legacy"].update(
        {"pool_size": 16, "concurrency": 6, "health": {"path": "/echo/health", **check}}
    )
    data["upstreams"]["ledger"].update({"pool_size": 16, "health": {"path": "/echo/health", **check}})
    data["upstreams"]["reports"] = {
        "url": urls["legacy"], "pool_size": 3, "timeouts": {"total": 1.0, "pool": 0.25},
        "health": {"path": "/echo/health", **check},
    }
    data["upstreams"]["offline"] = {
        "url": f"http://{HOST}:{closed}", "timeouts": {"connect": 0.5, "total": 2},
        "health": {"path": "/health", **check, "failures": 3},
    }
    data["routes"] += [
        {"prefix": "/reports", "upstream": "reports", "strip_prefix": True, "add_prefix": "/echo"},
        {"prefix": "/offline", "upstream": "offline"},
    ]
    data["batch"] = {
        "json": {"path": "/batch/v1", "atomic": False},
        "multipart": {"path": "/v1/api/batch", "atomic": True},
        "limits": {"max_response_bytes": 65536},
        "rollback": {"attempts": 4, "initial_backoff": 0.05, "max_backoff": 0.4, "deadline": 10},
    }
    data["shutdown_grace"] = 3
    return data


@dataclass
class Stack:
    gateway_url: str
    urls: dict[str, str]
    gateway: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def stack(workers: int, log_level: str) -> Iterator[Stack]:
    tmp = Path(tempfile.mkdtemp(prefix="gateway-dashboard-"))
    procs: list[subprocess.Popen[Any]] = []
    try:
        upstreams = subprocess.Popen(
            [sys.executable, "-m", "bench.dashboard", "--serve-upstreams"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        procs.append(upstreams)
        assert upstreams.stdout is not None
        line = upstreams.stdout.readline()
        if not line:
            raise RuntimeError("the upstream process failed to start")
        urls = json.loads(line)
        port, closed = free_port(), free_port()  # nothing listens on `closed`: the offline upstream
        config = tmp / "gateway.yaml"
        data = gateway_config(port, urls, closed, str(tmp / "journal.sqlite3"), workers)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        log = tmp / "gateway.log"
        with open(log, "wb") as out:
            gateway = subprocess.Popen(
                gateway_command(log_level, config), stdout=out, stderr=subprocess.STDOUT,
                cwd=tmp,
            )
        procs.append(gateway)
        url = f"http://{HOST}:{port}"
        wait_http(f"{url}/_gateway/readyz", proc=gateway)
        yield Stack(url, urls, gateway, log)
    except BaseException:
        log_file = tmp / "gateway.log"
        if log_file.exists():
            print(log_file.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# -- the traffic ----------------------------------------------------------------------------------


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "error"


def _multipart(parts: list[tuple[str, str, Any]], boundary: str) -> bytes:
    """A multipart/mixed batch: each part an application/http request (method, path, JSON body)."""
    out = []
    for number, (method, path, body) in enumerate(parts, 1):
        payload = "" if body is None else json.dumps(body)
        head = f"{method} {path} HTTP/1.1\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        out.append(
            f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <{number}>\r\n\r\n"
            f"{head}\r\n{payload}\r\n"
        )
    return ("".join(out) + f"--{boundary}--\r\n").encode()


def _item(
    method: str, operation: str, body: Any = None, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {"method": method, "operation": operation}
    if body is not None:
        item["body"] = body
    if headers:
        item["headers"] = headers
    return {"SingleItem": item}


def _batch(mode: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Batch": {"batch_execution_type": mode, "items": items}}


class Traffic:
    """Open-loop (Poisson) senders, one per traffic type, each with its own rate over the run."""

    def __init__(self, session: Any, stack: Stack, seconds: float, rng: random.Random) -> None:
        self.session, self.stack, self.seconds, self.rng = session, stack, seconds, rng
        self.url = stack.gateway_url
        self.started = 0.0
        self.stopped = asyncio.Event()
        self.sent: Counter[tuple[str, str]] = Counter()  # (kind, status class) seen by the client
        self.outcomes: Counter[str] = Counter()  # X-Batch-Outcome of atomic batches, as answered
        self.order_ids: list[str] = []
        self.shed = 0

    def progress(self) -> float:
        return (time.monotonic() - self.started) / self.seconds

    def burst(self) -> bool:
        return 0.30 <= self.progress() < 0.50

    def faulty(self) -> bool:
        return 0.60 <= self.progress() < 0.80

    async def send(
        self, kind: str, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        import aiohttp

        try:
            async with self.session.request(
                method, self.url + path, json=json_body, data=data, headers=headers
            ) as response:
                body = await response.read()
                status, answer_headers = response.status, dict(response.headers)
        except (TimeoutError, aiohttp.ClientError):
            self.sent[(kind, "error")] += 1
            return 0, None, {}
        self.sent[(kind, _status_class(status))] += 1
        parsed: Any = None
        if body[:1] in (b"{", b"["):
            with contextlib.suppress(ValueError):
                parsed = json.loads(body)
        return status, parsed, answer_headers

    def _order(self) -> str:
        return self.rng.choice(self.order_ids) if self.order_ids and self.rng.random() < 0.93 else "404"

    # one action per traffic type --------------------------------------------------------------

    async def proxied(self) -> None:
        r = self.rng.random()
        if r < 0.30:
            await self.send("proxy", "GET", f"/orders/{self._order()}")
        elif r < 0.45:
            status, body, _ = await self.send("proxy", "POST", "/orders", json_body={"item": "book"})
            if status == 201 and isinstance(body, dict) and len(self.order_ids) < 500:
                self.order_ids.append(str(body["id"]))
        elif r < 0.52:
            await self.send("proxy", "PUT", f"/orders/{self._order()}", json_body={"item": "pen"})
        elif r < 0.67:
            await self.send("proxy", "GET", "/accounts")
        elif r < 0.75:
            await self.send("proxy", "POST", "/accounts", json_body={"owner": "ann"})
        else:
            await self.send("proxy", "GET", f"/echo/p?delay_ms={self.rng.choice([1, 5, 10, 20, 40])}")

    async def reports(self) -> None:
        """The small-pool upstream; its answer takes 40-250 ms (the burst saturates its pool)."""
        await self.send("proxy", "GET", f"/reports/r?delay_ms={self.rng.randint(40, 250)}")

    async def troubled(self) -> None:
        """Upstream errors: a closed port (connect) or an answer slower than timeouts.total."""
        if self.rng.random() < 0.6:
            await self.send("proxy", "GET", "/offline/status")
        else:
            await self.send("proxy", "GET", "/reports/slow?delay_ms=1500")

    def _read_items(self, n: int) -> list[dict[str, Any]]:
        items = []
        for _ in range(n):
            r = self.rng.random()
            if r < 0.45:
                items.append(_item("GET", f"/echo/b?delay_ms={self.rng.choice([2, 5, 10, 20, 30])}"))
            elif r < 0.65:
                items.append(_item("GET", f"/orders/{self._order()}"))
            elif r < 0.90:
                items.append(_item("GET", "/accounts"))
            elif r < 0.97:
                items.append(_item("GET", "/ledger/echo/x?delay_ms=5"))
            elif r < 0.99:
                items.append(_item("GET", "/offline/x"))  # a connect error for this item only
            else:
                items.append(_item("GET", "/legacy/bytes/100000"))  # over limits.max_response_bytes
        return items

    async def json_batch(self) -> None:
        size = self.rng.choices([1, 2, 3, 4, 6, 8, 12, 16, 24, 40], [3, 5, 6, 6, 6, 5, 4, 3, 2, 1])[0]
        mode = "Unordered" if self.rng.random() < 0.6 else "Serial"
        await self.send("batch_json", "POST", "/batch/v1", json_body=_batch(mode, self._read_items(size)))

    async def atomic_batch(self) -> None:
        """Writes on both upstreams; about a third end in a failing item, so all is rolled back."""
        items = [
            _item("POST", "/orders", {"item": "ink"}),
            _item("POST", "/accounts", {"owner": "bo"}),
        ]
        if self.order_ids and self.rng.random() < 0.5:
            items.append(_item("PUT", f"/orders/{self.rng.choice(self.order_ids)}", {"item": "changed"}))
        if self.rng.random() < 0.5:
            items.append(_item("POST", "/orders", {"item": "cap"}))
        r = self.rng.random()
        if r < 0.22:
            items.append(_item("GET", "/orders/404"))  # 404: the batch rolls back
        elif r < 0.34:
            items.append(_item("POST", "/accounts", {"owner": "cy"}, {"X-Demo-Fail": "500"}))
        _, _, headers = await self.send(
            "batch_json", "POST", "/batch/v1", json_body=_batch("Serial", items),
            headers={"X-Batch-Atomic": "true"},
        )
        self.outcomes[headers.get("X-Batch-Outcome", "none")] += 1

    async def multipart_batch(self) -> None:
        parts: list[tuple[str, str, Any]] = [
            ("POST", "/accounts", {"owner": "di"}), ("GET", "/accounts", None)
        ]
        parts += [("POST", "/orders", {"item": "mug"})] * self.rng.randint(0, 3)
        if self.rng.random() < 0.25:
            parts.append(("GET", "/orders/404", None))
        boundary = f"b{self.rng.getrandbits(32):08x}"
        _, _, headers = await self.send(
            "batch_multipart", "POST", "/v1/api/batch", data=_multipart(parts, boundary),
            headers={"Content-Type": f"multipart/mixed; boundary={boundary}"},
        )
        self.outcomes[headers.get("X-Batch-Outcome", "none")] += 1

    async def undo_faults(self) -> None:
        """In the fault window: the legacy service is told to fail its next k DELETEs on /orders
        (only undos send those) with 503; k = 5 is above rollback.attempts (4): that undo gives up."""
        times = self.rng.choice([2, 3, 5])
        async with self.session.post(
            self.stack.urls["legacy"] + "/_demo/faults",
            json={"path_prefix": "/orders/", "method": "DELETE", "status": 503, "times": times},
        ) as response:
            await response.read()

    # pacing ---------------------------------------------------------------------------------

    async def paced(
        self, rate: Callable[[], float], action: Callable[[], Awaitable[None]], limit: int = 48
    ) -> None:
        """Poisson arrivals at `rate()` per second; at most `limit` of them in flight (more are shed)."""
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task[None]] = set()
        next_at = loop.time()
        while not self.stopped.is_set():
            per_second = rate()
            if per_second <= 0:
                await asyncio.sleep(0.1)
                next_at = loop.time()
                continue
            next_at = max(next_at + self.rng.expovariate(per_second), loop.time() - 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), max(0.0, next_at - loop.time()))
            if self.stopped.is_set():
                break
            if len(in_flight) >= limit:
                self.shed += 1
                continue
            task = asyncio.ensure_future(action())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=5)

    def senders(self) -> list[Awaitable[None]]:
        return [
            self.paced(lambda: 90.0 if self.burst() else 30.0, self.proxied),
            self.paced(lambda: 70.0 if self.burst() else 6.0, self.reports, limit=24),
            self.paced(lambda: 1.5, self.troubled),
            self.paced(lambda: 5.0, self.json_batch),
            self.paced(lambda: 2.5, self.atomic_batch),
            self.paced(lambda: 1.0, self.multipart_batch),
            self.paced(lambda: 0.5 if self.faulty() else 0.0, self.undo_faults),
        ]


async def scrape_loop(
    session: Any, url: str, interval: float, stopped: asyncio.Event, scrapes: list[tuple[float, str]]
) -> None:
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        async with session.get(url + "/_gateway/metrics") as response:
            text = await response.text()
            if response.status != 200:
                raise RuntimeError(f"/_gateway/metrics answered {response.status}: {text[:300]}")
        scrapes.append((time.time(), text))
        if stopped.is_set():
            return
        next_at += interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), max(0.0, next_at - loop.time()))


async def drive(st: Stack, seconds: float, interval: float, seed: int) -> tuple[Scrapes, Traffic]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=200)
    timeout = aiohttp.ClientTimeout(total=15)
    scrapes: list[tuple[float, str]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        traffic = Traffic(session, st, seconds, random.Random(seed))
        scraper_stop = asyncio.Event()
        async with aiohttp.ClientSession() as scrape_session:  # its own connections: never queued
            scraper = asyncio.ensure_future(scrape_loop(scrape_session, st.gateway_url, interval,
                                                        scraper_stop, scrapes))
            await asyncio.sleep(interval)  # one scrape before any traffic
            traffic.started = time.monotonic()
            senders = [asyncio.ensure_future(s) for s in traffic.senders()]
            reloaded = False
            while traffic.progress() < 1.0:
                await asyncio.sleep(0.2)
                if scraper.done():
                    scraper.result()
                if not reloaded and traffic.progress() >= 0.5:
                    reloaded = True  # an unchanged config, re-read: gateway_config_reloads_total
                    st.gateway.send_signal(signal.SIGHUP)
            traffic.stopped.set()
            await asyncio.gather(*senders)
            await asyncio.sleep(interval * 1.5)  # the tail: in-flight gauges back to idle
            scraper_stop.set()
            await scraper
    return scrapes, traffic


# -- evaluating the panels from the scrapes -------------------------------------------------------


def parse(text: str) -> Sample:
    samples: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


Where = dict[str, str]
"""Label matchers as in PromQL: `{"kind": "proxy"}` is `kind=~"proxy"`, `{"kind": "!gateway"}` is
`kind!~"gateway"` (full-match regular expressions)."""


def _matches(labels: dict[str, str], where: Where | None) -> bool:
    for name, pattern in (where or {}).items():
        negated = pattern.startswith("!")
        hit = re.fullmatch(pattern.lstrip("!"), labels.get(name, "")) is not None
        if hit == negated:
            return False
    return True


@dataclass
class Series:
    """One plotted line: values at the evaluation times (NaN where PromQL would have no point)."""

    name: str
    values: list[float]


@dataclass
class Eval:
    """The scrapes and PromQL-like evaluations over them.

    `rate` is the per-second increase over a window of `window` seconds ending at each scrape (the
    dashboard uses `$__rate_interval`), summed per group like `sum by (...)`. A counter reset (a
    value below the previous one) counts from zero, as in Prometheus. A series that first appears
    in a scrape counts from zero (the gateway creates series at their first increment); Prometheus'
    rate() would drop that first increment, the only difference.
    """

    times: list[float]
    samples: list[Sample]
    window: float
    steps: list[int] = field(init=False)

    def __post_init__(self) -> None:
        interval = (self.times[-1] - self.times[0]) / max(1, len(self.times) - 1)
        self.lag = max(1, round(self.window / interval))
        self.steps = list(range(self.lag, len(self.times)))

    @property
    def clock(self) -> list[datetime]:
        return [datetime.fromtimestamp(self.times[i]) for i in self.steps]

    def _select(self, i: int, name: str, where: Where | None) -> Iterator[tuple[Labels, float]]:
        for (sample_name, labels), value in self.samples[i].items():
            if sample_name == name and _matches(dict(labels), where):
                yield labels, value

    def _increase(self, name: str, start: int, end: int, where: Where | None) -> dict[Labels, float]:
        """Per series: the counter's increase from scrape `start` to `end` (resets handled)."""
        total: dict[Labels, float] = defaultdict(float)
        previous = {labels: value for labels, value in self._select(start, name, where)}
        for i in range(start + 1, end + 1):
            current = {labels: value for labels, value in self._select(i, name, where)}
            for labels, value in current.items():
                before = previous.get(labels, 0.0)
                total[labels] += value - before if value >= before else value
            previous = current
        return total

    @staticmethod
    def _group(labels: Labels, by: tuple[str, ...]) -> tuple[str, ...]:
        as_dict = dict(labels)
        return tuple(as_dict.get(name, "") for name in by)

    def increase_by(self, name: str, by: By, where: Where | None, start: int, end: int) -> dict[Key, float]:
        grouped: dict[Key, float] = defaultdict(float)
        for labels, value in self._increase(name, start, end, where).items():
            grouped[self._group(labels, by)] += value
        return grouped

    def _collect(self, per_step: list[dict[Key, float]], legend: str, by: By) -> list[Series]:
        keys = sorted({key for step in per_step for key in step})
        return [
            Series(legend.format(**dict(zip(by, key, strict=True))),
                   [step.get(key, math.nan) for step in per_step])
            for key in keys
        ]

    def rate(self, name: str, by: tuple[str, ...], legend: str, where: Where | None = None) -> list[Series]:
        per_step = []
        for i in self.steps:
            seconds = self.times[i] - self.times[i - self.lag]
            grouped = self.increase_by(name, by, where, i - self.lag, i)
            per_step.append({key: value / seconds for key, value in grouped.items()})
        return self._collect(per_step, legend, by)

    def gauge(
        self, name: str, by: By, legend: str, where: Where | None = None, agg: str = "sum"
    ) -> list[Series]:
        per_step = []
        for i in self.steps:
            grouped: dict[tuple[str, ...], list[float]] = defaultdict(list)
            for labels, value in self._select(i, name, where):
                grouped[self._group(labels, by)].append(value)
            pick = min if agg == "min" else sum
            per_step.append({key: float(pick(values)) for key, values in grouped.items()})
        return self._collect(per_step, legend, by)

    def buckets(self, name: str, by: By, where: Where | None, start: int, end: int) -> dict[Key, Buckets]:
        """`sum by (by..., le) (increase(name_bucket[...]))`: per group, (le, cumulative count)."""
        grouped = self.increase_by(f"{name}_bucket", (*by, "le"), where, start, end)
        out: dict[tuple[str, ...], list[tuple[float, float]]] = defaultdict(list)
        for key, value in grouped.items():
            out[key[:-1]].append((float(key[-1]), value))
        return {key: sorted(values) for key, values in out.items()}

    def quantile(self, q: float, name: str, by: By, legend: str, where: Where | None = None) -> list[Series]:
        per_step = []
        for i in self.steps:
            groups = self.buckets(name, by, where, i - self.lag, i)
            per_step.append({key: histogram_quantile(q, b) for key, b in groups.items()})
        return self._collect(per_step, legend, by)

    def ratio(self, numerator: list[Series], denominator: list[Series]) -> list[Series]:
        """`a / b` matched on the legend (the same `by` labels); no point where b is 0 or absent."""
        den = {s.name: s.values for s in denominator}
        out = []
        for s in numerator:
            d = den.get(s.name)
            if d is None:
                continue
            pairs = zip(s.values, d, strict=True)
            out.append(Series(s.name, [a / b if b and not math.isnan(b) else math.nan for a, b in pairs]))
        for name, values in den.items():  # a denominator without failures: ratio 0 (a = 0 there)
            if name not in {s.name for s in numerator}:
                out.append(Series(name, [0.0 if v and not math.isnan(v) else math.nan for v in values]))
        return sorted(out, key=lambda s: s.name)

    def whole_run(self, name: str, by: By, where: Where | None = None) -> dict[Key, float]:
        """`sum by (...) (increase(name[$__range]))` over the whole run."""
        return dict(self.increase_by(name, by, where, 0, len(self.times) - 1))

    def whole_run_quantile(self, q: float, name: str, by: By, where: Where | None = None) -> dict[Key, float]:
        groups = self.buckets(name, by, where, 0, len(self.times) - 1)
        return {key: histogram_quantile(q, b) for key, b in groups.items()}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs, sorted by bound."""
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    total = buckets[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    for index, (upper, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(upper):
                return buckets[-2][0]
            lower, below = (0.0, 0.0) if index == 0 else buckets[index - 1]
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
    return buckets[-2][0]


# -- the panels -----------------------------------------------------------------------------------

NOT_HEALTH = {"purpose": "!health_check"}
NOT_SCRAPE = {"kind": "!gateway"}


Evaluation = Callable[["Eval"], list[Series]]


@dataclass
class Panel:
    """One panel of the dashboard (by its title) and how to evaluate its queries over the scrapes."""

    title: str
    unit: str
    series: Evaluation | None = None
    style: str = "lines"  # lines | latency | heatmap | outcomes | events | states
    log: bool = False  # a log y axis (the dashboard's scaleDistribution log 10)
    note: str = ""


def _latency(ev: Eval) -> list[Series]:
    out = []
    for q in (0.5, 0.95, 0.99):
        for s in ev.quantile(q, UPSTREAM_SECONDS, ("upstream",), "{upstream}", NOT_HEALTH):
            out.append(Series(f"{s.name} p{round(q * 100)}", s.values))
    return out


def _five_xx(ev: Eval) -> list[Series]:
    failed = {"status_class": "5xx|error", **NOT_HEALTH}
    return ev.ratio(
        ev.rate("gateway_upstream_requests_total", ("upstream",), "{upstream}", failed),
        ev.rate("gateway_upstream_requests_total", ("upstream",), "{upstream}", NOT_HEALTH),
    )


def _pool_use(ev: Eval) -> list[Series]:
    return ev.ratio(
        ev.gauge("gateway_upstream_pool_connections_in_use", ("upstream",), "{upstream}"),
        ev.gauge("gateway_upstream_pool_connections_limit", ("upstream",), "{upstream}"),
    )


def _in_flight(ev: Eval) -> list[Series]:
    return ev.gauge("gateway_http_requests_in_flight", ("kind",), "requests {kind}", NOT_SCRAPE) + ev.gauge(
        "gateway_batches_in_flight", ("atomic",), "batches atomic={atomic}"
    )


def _batch_size_quantiles(ev: Eval) -> list[Series]:
    out = []
    for q in (0.5, 0.95):
        for s in ev.quantile(q, BATCH_SIZE, ("kind",), "{kind}"):
            out.append(Series(f"{s.name} p{round(q * 100)}", s.values))
    return out


def _rate(name: str, by: tuple[str, ...], legend: str, where: Where | None = None) -> Evaluation:
    return lambda ev: ev.rate(name, by, legend, where)


def _p95(name: str, by: tuple[str, ...], legend: str, where: Where | None = None) -> Evaluation:
    return lambda ev: ev.quantile(0.95, name, by, legend, where)


def _gauge(name: str, by: tuple[str, ...], legend: str) -> Evaluation:
    return lambda ev: ev.gauge(name, by, legend)


PANELS: list[Panel] = [
    # Traffic
    Panel("Requests/s by kind", "req/s", _rate("gateway_http_requests_total", ("kind",), "{kind}")),
    Panel("Proxied requests/s by upstream", "req/s",
          _rate("gateway_http_requests_total", ("upstream",), "{upstream}", {"kind": "proxy"})),
    Panel("Upstream calls/s by purpose", "calls/s",
          _rate("gateway_upstream_requests_total", ("purpose",), "{purpose}")),
    Panel("In flight", "count", _in_flight),
    # Errors
    Panel("Responses/s by status class", "req/s",
          _rate("gateway_http_requests_total", ("status_class", "origin"), "{status_class} ({origin})",
                NOT_SCRAPE)),
    Panel("5xx ratio by upstream", "ratio", _five_xx, note="5xx or no answer, health checks left out"),
    Panel("Upstream errors/s by kind", "errors/s",
          _rate("gateway_upstream_errors_total", ("upstream", "kind"), "{upstream} {kind}")),
    Panel("Limits hit/s", "hits/s", _rate("gateway_limits_hit_total", ("limit",), "{limit}")),
    # Latency
    Panel("Upstream latency p50 / p95 / p99 by upstream", "s", _latency, style="latency", log=True,
          note="solid p50, dashed p95, dotted p99; health checks left out"),
    Panel("Upstream latency p95 by purpose", "s",
          _p95("gateway_upstream_request_duration_seconds", ("purpose",), "{purpose}", NOT_HEALTH), log=True),
    Panel("Request latency p95 by kind", "s",
          _p95("gateway_http_request_duration_seconds", ("kind",), "{kind}", NOT_SCRAPE), log=True),
    # Batch sizes
    Panel("Batch size distribution", "sub-requests per batch", style="heatmap"),
    Panel("Batch size p50 / p95 by kind", "sub-requests", _batch_size_quantiles),
    Panel("Sub-requests/s by outcome", "calls/s",
          _rate("gateway_subrequests_total", ("outcome",), "{outcome}")),
    # Atomic outcomes
    Panel("Atomic batch outcomes/s", "batches/s",
          _rate("gateway_batches_total", ("outcome",), "{outcome}", {"atomic": "true"})),
    Panel("Rollback actions/s by kind and result", "actions/s",
          _rate("gateway_rollback_actions_total", ("kind", "result"), "{kind} {result}")),
    Panel("Undo retries/s by upstream", "retries/s",
          _rate("gateway_undo_retries_total", ("upstream",), "{upstream}")),
    Panel("Atomic batches by outcome (time range)", "batches", style="outcomes"),
    # Pool saturation
    Panel("Pool connections in use / limit", "ratio", _pool_use),
    Panel("Pool wait p95 by upstream", "s",
          _p95("gateway_upstream_pool_wait_seconds", ("upstream",), "{upstream}"), log=True),
    Panel("Batch slot wait p95 by upstream", "s",
          _p95("gateway_batch_slot_wait_seconds", ("upstream",), "{upstream}"), log=True),
    Panel("Upstream calls in flight by upstream", "calls",
          _gauge("gateway_upstream_requests_in_flight", ("upstream",), "{upstream}")),
    # Journal, health, process
    Panel("Journal write latency p95 by operation", "s",
          _p95("gateway_journal_write_duration_seconds", ("operation",), "{operation}")),
    Panel("Upstream up", "", style="states"),
    Panel("Config reloads and recovered batches (time range)", "", style="events"),
    Panel("Gateway CPU", "cores", _rate("process_cpu_seconds_total", (), "cores (all workers)"),
          note="rate(process_cpu_seconds_total)"),
]


# -- rendering ------------------------------------------------------------------------------------

BG, PANEL_BG, BORDER, TEXT, MUTED, GRID = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e", "#25282d"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0",
           "#37872d", "#fade2a", "#ff9830", "#c4162a", "#1f60c4", "#8f3bb8", "#96d98d", "#ffb357"]
"""Grafana's classic palette, in its order."""
GRAFANA = {  # Grafana's named colours, as the dashboard's overrides use them
    "green": "#73bf69", "dark-green": "#37872d", "yellow": "#fade2a", "orange": "#ff9830",
    "red": "#f2495c", "dark-red": "#c4162a", "blue": "#8ab8ff", "dark-blue": "#1f60c4",
    "purple": "#b877d9", "dark-purple": "#8f3bb8", "text": "#8e8e8e",
}
FIXED = {  # the colours the Grafana dashboard's overrides give these series
    "committed": "green", "rolled_back": "orange", "rollback_incomplete": "red", "processed": "blue",
    "executed": "green", "failed": "red", "skipped": "text", "rollback_failed": "dark-red",
    "2xx (upstream)": "green", "2xx (gateway)": "dark-green", "3xx (upstream)": "blue",
    "3xx (gateway)": "dark-blue", "4xx (upstream)": "yellow", "4xx (gateway)": "orange",
    "5xx (upstream)": "red", "5xx (gateway)": "dark-red", "error (upstream)": "purple",
    "error (gateway)": "dark-purple",
}
UPSTREAMS = {"legacy": "#73bf69", "ledger": "#8ab8ff", "reports": "#fade2a", "offline": "#f2495c"}
"""Only in the picture: an upstream keeps its colour from panel to panel (Grafana's go by order)."""
COLUMNS, WIDTH, ROW_HEIGHT, ROW_TITLE, GAP, MARGIN = 4, 22.0, 2.9, 0.34, 0.12, 0.15
"""The grid in inches: 4 panels of 6 Grafana units a row, like the dashboard's gridPos."""


def _colour(name: str, index: int) -> str:
    if name in FIXED:
        return GRAFANA[FIXED[name]]
    if name.endswith("undo_failed"):
        return GRAFANA["red"]
    words = name.split(" ")
    if words[0] in UPSTREAMS and (len(words) == 1 or words[1] in ("p50", "p95", "p99")):
        return UPSTREAMS[words[0]]
    return PALETTE[index % len(PALETTE)]


def _format_value(value: float, unit: str) -> str:
    if unit == "s":
        if value == 0:
            return "0"
        if value < 1e-3:
            return f"{value * 1e6:.0f} µs"
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
    if unit == "ratio":
        return f"{value * 100:.0f}%"
    return f"{value:.3g}"


@dataclass
class Box:
    """A panel's rectangle on the figure, in inches from the bottom left."""

    fig: Any
    left: float
    bottom: float
    width: float
    height: float

    def rect(self, left: float, bottom: float, right: float, top: float) -> tuple[float, float, float, float]:
        """Figure coordinates of the part inside the given margins (inches)."""
        fig_width, fig_height = self.fig.get_size_inches()
        return ((self.left + left) / fig_width, (self.bottom + bottom) / fig_height,
                (self.width - left - right) / fig_width, (self.height - bottom - top) / fig_height)

    def axes(self, bottom: float, left: float = 0.55, right: float = 0.15, top: float = 0.36) -> Any:
        ax = self.fig.add_axes(self.rect(left, bottom, right, top))
        ax.set_facecolor(PANEL_BG)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(colors=MUTED, labelsize=7, length=0, pad=3)
        ax.grid(True, color=GRID, linewidth=0.7)
        ax.set_axisbelow(True)
        return ax


def _frame(box: Box, title: str, note: str) -> None:
    from matplotlib.patches import FancyBboxPatch

    fig_width, fig_height = box.fig.get_size_inches()
    box.fig.patches.append(FancyBboxPatch(
        (box.left / fig_width, box.bottom / fig_height), box.width / fig_width, box.height / fig_height,
        boxstyle="round,pad=0,rounding_size=0.003", transform=box.fig.transFigure, facecolor=PANEL_BG,
        edgecolor=BORDER, linewidth=0.8, zorder=-1,
    ))
    top = (box.bottom + box.height - 0.09) / fig_height
    box.fig.text((box.left + 0.12) / fig_width, top, title, color=TEXT, fontsize=9.5, fontweight="bold",
                 va="top")
    if note:
        box.fig.text((box.left + box.width - 0.12) / fig_width, top - 0.01 / fig_height, note, color=MUTED,
                     fontsize=6.5, va="top", ha="right")


def _time_axis(ax: Any) -> None:
    import matplotlib.dates as mdates

    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=4, maxticks=7))  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]


def _legend_columns(names: list[str], width: float) -> int:
    longest = max((len(name) for name in names), default=1)
    return max(1, min(len(names), int(width / (0.3 + 0.052 * longest))))


def _draw_lines(box: Box, ev: Eval, series: list[Series], panel: Panel, phases: Phases) -> None:
    names = [s.name for s in series]
    columns = _legend_columns(names, box.width - 0.2)
    legend_rows = math.ceil(len(names) / columns) if names else 0
    ax = box.axes(bottom=0.3 + 0.135 * legend_rows)
    clock = ev.clock
    dashes = {"p50": "-", "p95": (0, (4, 2)), "p99": (0, (1, 1.5))}
    fill = not panel.log and len(series) <= 4
    first_seen: dict[str, int] = {}
    for index, s in enumerate(series):
        linestyle: Any = "-"
        colour = _colour(s.name, index)
        words = s.name.rsplit(" ", 1)
        if len(words) == 2 and words[1] in dashes:
            first_seen.setdefault(words[0], len(first_seen))
            colour, linestyle = _colour(words[0], first_seen[words[0]]), dashes[words[1]]
        ax.plot(clock, s.values, color=colour, linestyle=linestyle, linewidth=1.25, label=s.name)
        if fill:
            ax.fill_between(clock, s.values, color=colour, alpha=0.1, linewidth=0)
    for start, end in phases:
        ax.axvspan(datetime.fromtimestamp(start), datetime.fromtimestamp(end), color="#ffffff", alpha=0.045,
                   lw=0)
    values = [v for s in series for v in s.values if not math.isnan(v)]
    if not values:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center", color=MUTED,
                fontsize=10)
    _time_axis(ax)
    ax.set_xlim(clock[0], clock[-1])
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    top = max(values, default=1.0) or 1.0
    positive = [v for v in values if v > 0]
    if panel.log and positive:
        from matplotlib.ticker import LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 2, top * 2.5)
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=6))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_ylim(0, min(top * 1.1, 1.0) if panel.unit == "ratio" and top <= 1.0 else top * 1.1)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _format_value(v, panel.unit)))
    if names:
        fig_width, fig_height = box.fig.get_size_inches()
        legend = ax.legend(
            loc="lower left",
            bbox_to_anchor=((box.left + 0.08) / fig_width, (box.bottom + 0.04) / fig_height),
            bbox_transform=box.fig.transFigure, fontsize=6.8, ncol=columns, frameon=False, handlelength=1.6,
            handletextpad=0.4, borderpad=0.1, labelspacing=0.2, columnspacing=1.0,
        )
        for text in legend.get_texts():
            text.set_color(TEXT)


def _draw_heatmap(box: Box, ev: Eval) -> None:
    import matplotlib.dates as mdates
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    per_step = [ev.buckets(BATCH_SIZE, (), None, i - ev.lag, i).get((), []) for i in ev.steps]
    bounds = sorted({le for step in per_step for le, _ in step})
    ax = box.axes(bottom=0.3, left=0.75, right=0.75)
    if not bounds:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", color=MUTED)
        return
    grid = np.zeros((len(bounds), len(per_step)))
    for column, step in enumerate(per_step):
        below = 0.0
        for row, (_, cumulative) in enumerate(step):
            grid[row, column] = cumulative - below  # one bucket's own count (non-cumulative)
            below = cumulative
    used = [row for row in range(len(bounds)) if grid[row].any()]
    low, high = (min(used), max(used)) if used else (0, len(bounds) - 1)
    grid = grid[low: high + 1]
    names = []
    for row in range(low, high + 1):
        lower, upper = (0.0 if row == 0 else bounds[row - 1]), bounds[row]
        if math.isinf(upper):
            names.append(f"> {lower:g}")
        else:
            names.append(f"{lower + 1:g}-{upper:g}" if upper - lower > 1 else f"{upper:g}")
    colours = ["#1b2a4a", "#3274d9", "#5ac8fa", "#fade2a", "#ff780a"]
    cmap = LinearSegmentedColormap.from_list("grafana", colours)
    cmap.set_bad(PANEL_BG)
    x = mdates.date2num(ev.clock)  # type: ignore[no-untyped-call]
    step = (x[-1] - x[0]) / max(1, len(x) - 1)
    edges = np.concatenate([[x[0] - step / 2], x + step / 2])
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), np.ma.masked_where(grid == 0, grid), cmap=cmap,
                         shading="flat", edgecolors=PANEL_BG, linewidth=0.6)
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels(names)
    ax.grid(False)
    ax.xaxis_date()
    _time_axis(ax)
    ax.set_ylabel("sub-requests per batch", color=MUTED, fontsize=7)
    cax = box.fig.add_axes(box.rect(box.width - 0.62, 0.3, 0.5, 0.36))
    bar = box.fig.colorbar(mesh, cax=cax)
    bar.ax.tick_params(colors=MUTED, labelsize=6.5, length=0)
    bar.outline.set_visible(False)
    bar.set_label(f"batches per {ev.window:g} s", color=MUTED, fontsize=6.5)


def _draw_totals(box: Box, rows: list[tuple[str, float | None]]) -> None:
    """A Grafana bar gauge / stat: a name over a bar per value ("no data": no such series)."""
    ax = box.axes(bottom=0.15, left=0.15, right=0.15, top=0.4)
    ax.grid(False)
    ax.set_xticks([])
    ax.set_yticks([])
    top = max([value or 0.0 for _, value in rows] + [1.0])
    count = len(rows)
    for index, (name, value) in enumerate(rows):
        y = count - 1 - index
        colour = _colour(name.split(" ")[-1], index) if name.split(" ")[-1] in FIXED else "#5794f2"
        if "failed" in name or "incomplete" in name:
            colour = GRAFANA["red"]
        ax.barh(y, 1.0, left=0, height=0.42, color="#22252b")
        if value:
            ax.barh(y, value / top, left=0, height=0.42, color=colour)
        ax.text(0, y + 0.3, name, color=TEXT, fontsize=8, va="bottom")
        shown = "no data" if value is None else f"{value:.0f}"
        ax.text(1.0, y + 0.3, shown, color=TEXT if value is not None else MUTED, fontsize=9.5,
                fontweight="bold" if value is not None else "normal", va="bottom", ha="right")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(-0.5, count - 0.1)


def _draw_outcomes(box: Box, ev: Eval) -> None:
    totals = ev.whole_run("gateway_batches_total", ("outcome",), {"atomic": "true"})
    order = ["committed", "rolled_back", "rollback_incomplete"]
    names = order + sorted(k[0] for k in totals if k[0] not in order)
    _draw_totals(box, [(name, round(totals[(name,)]) if (name,) in totals else None) for name in names])


def _draw_events(box: Box, ev: Eval) -> None:
    rows: list[tuple[str, float | None]] = []
    for metric, label, prefix in (("gateway_config_reloads_total", "result", "reload"),
                                  ("gateway_recovered_batches_total", "outcome", "recovered")):
        totals = ev.whole_run(metric, (label,))
        rows += [(f"{prefix} {key[0]}", round(value)) for key, value in sorted(totals.items())]
        if not totals:
            rows.append((f"{prefix} (any {label})", None))
    _draw_totals(box, rows)


def _draw_states(box: Box, ev: Eval) -> None:
    import matplotlib.dates as mdates

    series = ev.gauge("gateway_upstream_up", ("upstream",), "{upstream}", agg="min")
    ax = box.axes(bottom=0.45)
    x = list(mdates.date2num(ev.clock))  # type: ignore[no-untyped-call]
    step = (x[-1] - x[0]) / max(1, len(x) - 1)
    edges = [x[0] - step / 2] + [(a + b) / 2 for a, b in itertools.pairwise(x)] + [x[-1] + step / 2]
    for row, s in enumerate(series):
        for column, value in enumerate(s.values):  # a value holds until the next scrape's midpoint
            colour = "#3a3d42" if math.isnan(value) else (GRAFANA["green"] if value >= 1 else GRAFANA["red"])
            ax.barh(row, edges[column + 1] - edges[column], left=edges[column], height=0.75, color=colour,
                    linewidth=0)
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels([s.name for s in series], color=TEXT, fontsize=7.5)
    ax.set_ylim(-0.6, len(series) - 0.4)
    ax.set_xlim(x[0] - step / 2, x[-1] + step / 2)
    ax.invert_yaxis()
    ax.xaxis_date()
    _time_axis(ax)
    ax.grid(False)
    fig_width, fig_height = box.fig.get_size_inches()
    box.fig.text((box.left + 0.12) / fig_width, (box.bottom + 0.08) / fig_height,
                 "green: 1 (up)    red: 0 (down or probing)    grey: no sample (unknown)", color=MUTED,
                 fontsize=6.5)


def layout() -> list[tuple[str, list[tuple[Panel, int]]]]:
    """The Grafana dashboard's rows and panels, in its order, with each panel's width in quarters."""
    document = json.loads(DASHBOARD_JSON.read_text())
    by_title = {panel.title: panel for panel in PANELS}
    rows: list[tuple[str, list[tuple[Panel, int]]]] = []
    for item in document["panels"]:
        if item["type"] == "row":
            rows.append((item["title"], []))
        elif item["title"] in by_title:
            rows[-1][1].append((by_title[item["title"]], max(1, round(item["gridPos"]["w"] / 6))))
        else:
            raise SystemExit(f"bench/dashboard.py does not draw the panel {item['title']!r}")
    return rows


def render(ev: Eval, path: Path, footer: list[str], phases: list[tuple[float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = layout()
    header, bottom = 0.62, 0.55
    height = header + len(sections) * (ROW_TITLE + ROW_HEIGHT + GAP) + bottom
    fig = plt.figure(figsize=(WIDTH, height), facecolor=BG)
    fig.text(MARGIN / WIDTH, 1 - 0.16 / height, "Batch gateway", color=TEXT, fontsize=15, fontweight="bold",
             va="top")
    clock = ev.clock
    shaded = "; ".join(f"{datetime.fromtimestamp(a):%H:%M:%S}-{datetime.fromtimestamp(b):%H:%M:%S}"
                       for a, b in phases)
    fig.text(2.1 / WIDTH, 1 - 0.2 / height,
             f"examples/grafana/batch-gateway.json    {clock[0]:%Y-%m-%d %H:%M:%S} to "
             f"{clock[-1]:%H:%M:%S}    "
             f"rate and histogram_quantile over {ev.window:g} s    shaded: {shaded}",
             color=MUTED, fontsize=9, va="top")
    cell = (WIDTH - 2 * MARGIN - GAP * (COLUMNS - 1)) / COLUMNS
    top = height - header
    for section, panels in sections:
        fig.text(MARGIN / WIDTH, (top - 0.06) / height, f"\u25be  {section}", color=TEXT, fontsize=11,
                 fontweight="bold", va="top")
        top -= ROW_TITLE
        column = 0
        for panel, quarters in panels:
            width = cell * quarters + GAP * (quarters - 1)
            box = Box(fig, MARGIN + column * (cell + GAP), top - ROW_HEIGHT, width, ROW_HEIGHT)
            _frame(box, panel.title, panel.note)
            if panel.style == "heatmap":
                _draw_heatmap(box, ev)
            elif panel.style == "outcomes":
                _draw_outcomes(box, ev)
            elif panel.style == "events":
                _draw_events(box, ev)
            elif panel.style == "states":
                _draw_states(box, ev)
            else:
                assert panel.series is not None
                _draw_lines(box, ev, panel.series(ev), panel, phases)
            column += quarters
        top -= ROW_HEIGHT + GAP
    for line, text in enumerate(footer):
        fig.text(MARGIN / WIDTH, (bottom - 0.2 - 0.17 * line) / height, text, color=MUTED, fontsize=8.5,
                 va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72, facecolor=BG)
    plt.close(fig)
    _shrink(path)


def _shrink(path: Path) -> None:
    """Quantise to a 256-colour palette (a dashboard has few colours): a much smaller PNG."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    small.save(path, optimize=True)


# -- the text summary -----------------------------------------------------------------------------


def cross_check(ev: Eval, traffic: Traffic) -> list[str]:
    """What the load generator saw against what the gateway counted (they should be equal)."""
    counted = ev.whole_run("gateway_http_requests_total", ("kind", "status_class"), NOT_SCRAPE)
    seen: dict[Key, float] = {key: float(n) for key, n in traffic.sent.items()}
    atomic = ev.whole_run("gateway_batches_total", ("outcome",), {"atomic": "true"})
    answered: dict[Key, float] = {(outcome,): float(n) for outcome, n in traffic.outcomes.items()}
    lines = []
    for what, gateway, client in (("requests by kind and status class", counted, seen),
                                  ("atomic batches by outcome (X-Batch-Outcome)", atomic, answered)):
        keys = sorted(set(gateway) | set(client))
        differ = [f"{' '.join(k)}: gateway {gateway.get(k, 0):.0f}, client {client.get(k, 0):.0f}"
                  for k in keys if round(gateway.get(k, 0)) != round(client.get(k, 0))]
        shown = ", ".join(f"{' '.join(k)} {client.get(k, 0):.0f}" for k in keys)
        lines.append(f"client saw {what}: {shown}; gateway metrics "
                     + ("agree" if not differ else "DIFFER: " + "; ".join(differ)))
    if traffic.shed:
        lines.append(f"arrivals the load generator shed (too many of its own in flight): {traffic.shed}")
    return lines


def summary(ev: Eval, traffic: Traffic | None) -> str:
    last = len(ev.times) - 1
    seconds = ev.times[last] - ev.times[0]
    lines = [f"{len(ev.times)} scrapes over {seconds:.0f} s"]

    def table(title: str, values: dict[tuple[str, ...], float], digits: int = 0) -> None:
        shown = ", ".join(f"{' '.join(k) or 'all'} {v:.{digits}f}" for k, v in sorted(values.items()) if v)
        lines.append(f"{title}: {shown or 'none'}")

    table("requests by kind", ev.whole_run("gateway_http_requests_total", ("kind",)))
    table("responses by status class (not /_gateway)",
          ev.whole_run("gateway_http_requests_total", ("status_class", "origin"), NOT_SCRAPE))
    if traffic is not None:
        lines += cross_check(ev, traffic)
    table("upstream calls by purpose", ev.whole_run("gateway_upstream_requests_total", ("purpose",)))
    table("upstream errors", ev.whole_run("gateway_upstream_errors_total", ("upstream", "kind")))
    table("limits hit", ev.whole_run("gateway_limits_hit_total", ("limit",)))
    table("batches", ev.whole_run("gateway_batches_total", ("kind", "atomic", "outcome")))
    table("sub-requests by outcome", ev.whole_run("gateway_subrequests_total", ("outcome",)))
    table("rollback actions", ev.whole_run("gateway_rollback_actions_total", ("kind", "result")))
    table("undo retries", ev.whole_run("gateway_undo_retries_total", ("upstream",)))
    table("config reloads", ev.whole_run("gateway_config_reloads_total", ("result",)))
    for q in (0.5, 0.95, 0.99):
        got = ev.whole_run_quantile(q, "gateway_upstream_request_duration_seconds", ("upstream",), NOT_HEALTH)
        lines.append(f"upstream latency p{round(q * 100)} over the run: " + ", ".join(
            f"{k[0]} {_format_value(v, 's')}" for k, v in sorted(got.items())))
    got = ev.whole_run_quantile(0.5, "gateway_batch_subrequests", ("kind",))
    got95 = ev.whole_run_quantile(0.95, "gateway_batch_subrequests", ("kind",))
    lines.append("batch size p50 / p95: " + ", ".join(
        f"{k[0]} {v:.1f} / {got95[k]:.1f}" for k, v in sorted(got.items())))

    def peak(series: list[Series], unit: str) -> str:
        return ", ".join(
            f"{s.name} {_format_value(max((v for v in s.values if not math.isnan(v)), default=0), unit)}"
            for s in series)

    lines.append("peak pool in use / limit: " + peak(_pool_use(ev), "ratio"))
    limits = ev.gauge("gateway_upstream_pool_connections_limit", ("upstream",), "{upstream}")
    lines.append("pool limits (summed over workers): " + ", ".join(
        f"{s.name} {s.values[-1]:g}" for s in limits))
    lines.append("peak pool wait p95: " + peak(ev.quantile(
        0.95, "gateway_upstream_pool_wait_seconds", ("upstream",), "{upstream}"), "s"))
    lines.append("peak slot wait p95: " + peak(ev.quantile(
        0.95, "gateway_batch_slot_wait_seconds", ("upstream",), "{upstream}"), "s"))
    got = ev.whole_run_quantile(0.95, "gateway_journal_write_duration_seconds", ("operation",))
    lines.append("journal write p95 over the run: " + ", ".join(
        f"{k[0]} {_format_value(v, 's')}" for k, v in sorted(got.items())))
    up = ev.gauge("gateway_upstream_up", ("upstream",), "{upstream}", agg="min")
    lines.append("upstream up at the end: " + ", ".join(f"{s.name} {s.values[-1]:g}" for s in up))
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="traffic duration (default 60)")
    parser.add_argument("--scrape-interval", type=float, default=2.0, help="seconds between scrapes")
    parser.add_argument("--window", type=float, default=10.0,
                        help="rate/quantile window in seconds (Grafana's $__rate_interval)")
    parser.add_argument("--workers", type=int, default=2, help="gateway listen.workers (default 2)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="the PNG to write")
    parser.add_argument("--scrapes", default=None, metavar="FILE",
                        help="also keep the raw scrapes (JSON lines)")
    parser.add_argument("--replay", default=None, metavar="FILE",
                        help="render from kept scrapes, run nothing")
    parser.add_argument("--seed", type=int, default=13, help="the traffic's random seed")
    parser.add_argument("--gateway-log-level", default="WARNING")
    parser.add_argument("--serve-upstreams", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve_upstreams:
        asyncio.run(_serve_upstreams())
        return 0
    drawn = {panel.title for _, row in layout() for panel, _ in row}
    missing = [panel.title for panel in PANELS if panel.title not in drawn]
    if missing:
        raise SystemExit(f"panels missing from {DASHBOARD_JSON.relative_to(ROOT)}: {missing}")
    traffic: Traffic | None = None
    if args.replay:
        kept = [json.loads(line) for line in Path(args.replay).read_text().splitlines() if line.strip()]
        run = kept[0]
        scrapes = [(item["t"], item["text"]) for item in kept[1:]]
    else:
        with stack(args.workers, args.gateway_log_level) as st:
            print(f"gateway {st.gateway_url} ({args.workers} workers), upstreams {st.urls}; "
                  f"{args.seconds:g} s of traffic ...", file=sys.stderr, flush=True)
            scrapes, traffic = asyncio.run(drive(st, args.seconds, args.scrape_interval, args.seed))
        start = scrapes[1][0]  # the traffic starts one interval after the first scrape
        defaults = _parser().parse_args([])
        options = "".join(
            f" --{name.replace('_', '-')} {getattr(args, name):g}"
            for name in ("seconds", "scrape_interval", "workers", "seed")
            if getattr(args, name) != getattr(defaults, name)
        )
        run = {
            "command": COMMAND + options, "interval": args.scrape_interval, "workers": args.workers,
            "phases": [(start + 0.30 * args.seconds, start + 0.50 * args.seconds),
                       (start + 0.60 * args.seconds, start + 0.80 * args.seconds)],
        }
        if args.scrapes:
            with open(args.scrapes, "w") as out:
                out.write(json.dumps(run) + "\n")
                for t, text in scrapes:
                    out.write(json.dumps({"t": t, "text": text}) + "\n")
    ev = Eval([t for t, _ in scrapes], [parse(text) for _, text in scrapes], args.window)
    footer = [
        f"Rendered from a real bench run, not by Grafana: `{run['command']}`, {len(scrapes)} scrapes of "
        f"/_gateway/metrics every {run['interval']:g} s from a gateway with listen.workers: {run['workers']} "
        "(one scrape: every worker's series merged). Each panel is its dashboard PromQL evaluated in Python "
        "over the scraped samples only.",
        "Traffic: proxied calls, JSON and multipart batches, atomic batches (a third fail an item and roll "
        "back), a closed port and a 1 s timeout. Shaded: a burst (30-50 % of the run), and 60-80 %, when the "
        "legacy upstream is told to fail its next few undo DELETEs (503) every 2 s; a config reload (SIGHUP) "
        "at 50 %.",
    ]
    phases = [(float(a), float(b)) for a, b in run["phases"]]
    output = Path(args.output)
    render(ev, output, footer, phases)
    print(summary(ev, traffic))
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
