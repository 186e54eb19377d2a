"""Prometheus metrics: requests, upstream calls, pools, batches, rollbacks, journal and limits.

One `GatewayMetrics` per app (a private registry, so several apps in one process never collide);
with `workers: N` every worker writes to PROMETHEUS_MULTIPROC_DIR and one scrape sums them all.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from bisect import bisect_left
from typing import Any

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call] # no `_created` series (they double every counter)

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
RECOVERED_VARIABLE = "GATEWAY_RECOVERED_OUTCOMES"
"""Set by the supervisor for a worker: the outcomes of the recovery it ran before starting it."""
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30)
_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def multiprocess_dir() -> str | None:
    """The directory the workers share their metrics through, when running with workers."""
    return os.environ.get(MULTIPROC_VARIABLE) or None


def status_class(status: int) -> str:
    """`2xx` ... `5xx`; `error` when there was no HTTP status (the call failed or was refused)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "error"


def method_label(method: str) -> str:
    """The method, or `other` for an extension method (a client must not mint label values)."""
    return method if method in _METHODS else "other"


class GatewayMetrics:
    """Every series the gateway exports; label values are bounded by the config, never by clients."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        self.requests = Counter(
            "gateway_http_requests", "HTTP requests served, by what answered them (origin: upstream or "
            "gateway)", ["kind", "route", "upstream", "method", "status_class", "origin"], registry=r,
        )
        self.request_duration = Histogram(
            "gateway_http_request_duration_seconds", "Time from request to the end of the answer",
            ["kind", "route", "upstream", "method", "status_class"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.requests_in_flight = Gauge(
            "gateway_http_requests_in_flight", "Requests being served", ["kind"], registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_calls = Counter(
            "gateway_upstream_requests", "Calls made to upstreams, by purpose (proxy, subrequest, "
            "snapshot, undo, begin, commit, rollback, replay, health_check)",
            ["upstream", "purpose", "status_class"], registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_request_duration_seconds", "Upstream call time to the end of the response "
            "head (proxy) or body (batch calls)", ["upstream", "purpose", "status_class"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_in_flight = Gauge(
            "gateway_upstream_requests_in_flight", "Upstream calls under way", ["upstream", "purpose"],
            registry=r, multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream calls that failed without a usable answer, by kind "
            "(connect, connect_timeout, timeout, tls, reset, invalid_response, oversize, not_sent, "
            "busy)", ["upstream", "kind"], registry=r,
        )
        self.pool_in_use = Gauge(
            "gateway_upstream_pool_connections_in_use", "Pooled connections held by a call",
            ["upstream"], registry=r, multiprocess_mode="livesum",
        )
        self.pool_limit = Gauge(
            "gateway_upstream_pool_connections_limit", "Pooled connections allowed (pool_size, summed "
            "over workers)", ["upstream"], registry=r, multiprocess_mode="livesum",
        )
        self.pool_wait = Histogram(
            "gateway_upstream_pool_wait_seconds", "Time a call waited for a pooled connection",
            ["upstream"], buckets=_WAIT_BUCKETS, registry=r,
        )
        self.slot_wait = Histogram(
            "gateway_batch_slot_wait_seconds", "Time a sub-request waited for one of its upstream's "
            "`concurrency` slots", ["upstream"], buckets=_WAIT_BUCKETS, registry=r,
        )
        self.subrequests = Counter(
            "gateway_subrequests", "Batch sub-requests by outcome (executed, failed, skipped, "
            "rolled_back, rollback_failed)", ["upstream", "status_class", "outcome"], registry=r,
        )
        self.batch_size = Histogram(
            "gateway_batch_subrequests", "Sub-requests per batch", ["kind"], buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batches = Counter(
            "gateway_batches", "Batches by endpoint, atomicity and outcome", ["kind", "atomic", "outcome"],
            registry=r,
        )
        self.batches_in_flight = Gauge(
            "gateway_batches_in_flight", "Batches running (an atomic one until its rollback ends)",
            ["atomic"], registry=r, multiprocess_mode="livesum",
        )
        self.rollbacks = Counter(
            "gateway_rollback_actions", "Compensations and transaction rollbacks", ["kind", "result"],
            registry=r,
        )
        self.undo_retries = Counter(
            "gateway_undo_retries", "Rollback attempts after the first one: compensation undos and "
            "transaction rollbacks", ["upstream"], registry=r,
        )
        self.limits_hit = Counter(
            "gateway_limits_hit", "Requests or calls refused by a configured limit (its config key)",
            ["limit"], registry=r,
        )
        self.journal_write = Histogram(
            "gateway_journal_write_duration_seconds", "Journal write (and fsync) time", ["operation"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.journal_bytes = Histogram(
            "gateway_journal_write_bytes", "Bytes per journal write", ["operation"],
            buckets=_BYTES_BUCKETS, registry=r,
        )
        self.recovered = Counter(
            "gateway_recovered_batches", "Batches finished by crash recovery, by outcome", ["outcome"],
            registry=r,
        )
        self.reloads = Counter(
            "gateway_config_reloads", "Config reloads by result (ok, failed)", ["result"], registry=r,
        )
        self.upstream_up = Gauge(
            "gateway_upstream_up", "1 while the upstream is up, 0 while down or probing "
            "(gateway/health.py); no sample while unknown; with workers, the lowest of them",
            ["upstream"], registry=r, multiprocess_mode="livemin",
        )
        self._published_limits: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._process = _ProcessMetrics(r, self.multiprocess)

    # -- upstream calls -------------------------------------------------------------------------

    def child(self, metric: Counter | Gauge | Histogram, *labels: str) -> Any:
        """The series `metric.labels(*labels)` as a gathering one (see `_Gathered`), memoized: the
        hot path looks each series up once, and an update is an addition, not a lock."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = _gathered(metric, metric.labels(*labels))
        return found

    def flush(self) -> None:
        """Write every gathered update to prometheus-client (before each scrape; with workers
        also every second, see gateway/app.py, so the merged scrape lags by at most that)."""
        for series in self._children.values():
            series.flush()

    def upstream_error(self, upstream: str, kind: str, limit: str | None) -> None:
        self.upstream_errors.labels(upstream, kind).inc()
        if limit is not None:
            self.limits_hit.labels(limit).inc()

    def forget(self, gauge: Gauge, *labels: str) -> None:
        """Drop a gauge's sample. Not possible with workers (prometheus-client's multiprocess
        files keep it): there a removed upstream's last value stays until the restart."""
        if not self.multiprocess:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
            self._children.pop((id(gauge), labels), None)

    def protocol_error(self, status: int) -> None:
        """A request aiohttp could not parse (answered by the gateway's connection guard)."""
        self.requests.labels("protocol_error", "", "", "other", status_class(status), "gateway").inc()

    def set_pool_limits(self, limits: dict[str, int]) -> None:
        """The configured pool sizes; an upstream a reload removed loses its sample."""
        for labels in list(self._published_limits - limits.keys()):
            self.forget(self.pool_limit, labels)
        for upstream, size in limits.items():
            self.pool_limit.labels(upstream).set(size)
        self._published_limits = set(limits)

    def refresh_process(self) -> None:
        self._process.refresh()

    def render(self) -> bytes:
        """The exposition text: this process's registry, or every worker's series merged."""
        self.flush()
        self._process.refresh()
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


class _GatheredCounter:
    """A counter's increments gathered until `flush` (see `_gathered`)."""

    __slots__ = ("_child", "_pending")

    def __init__(self, child: Any) -> None:
        self._child, self._pending = child, 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self._pending += amount

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, 0.0
            self._child.inc(pending)


class _GatheredGauge:
    """A gauge's increments and decrements gathered until `flush`; `set` writes at once."""

    __slots__ = ("_child", "_pending")

    def __init__(self, child: Any) -> None:
        self._child, self._pending = child, 0.0

    def inc(self, amount: float = 1) -> None:
        self._pending += amount

    def dec(self, amount: float = 1) -> None:
        self._pending -= amount

    def set(self, value: float) -> None:
        self._pending = 0.0
        self._child.set(value)

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, 0.0
            self._child.inc(pending)


class _GatheredHistogram:
    """A histogram's observations counted per bucket until `flush`, which adds them to the
    child's bucket and sum values: what `Histogram.observe` does one at a time (it reads the
    same `_upper_bounds`, `_buckets` and `_sum`; tests/test_metrics.py checks the exposition
    is the same as prometheus-client's own)."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        index = bisect_left(self._bounds, amount)  # the first bucket whose bound is >= amount
        if index < len(self._counts):
            self._counts[index] += 1
        self._sum += amount

    def flush(self) -> None:
        counts = self._counts
        if not any(counts) and not self._sum:
            return
        child = self._child
        child._sum.inc(self._sum)
        for index, count in enumerate(counts):
            if count:
                child._buckets[index].inc(count)
        self._counts, self._sum = [0] * len(counts), 0.0


def _gathered(metric: Counter | Gauge | Histogram, child: Any) -> Any:
    """A series whose updates are gathered in plain Python and written to its prometheus-client
    child by `flush`: each prometheus-client update takes a lock and a few checks, about 1 us; a
    proxied request made 14 of them (about a tenth of its CPU)."""
    if isinstance(metric, Histogram):
        return _GatheredHistogram(child)
    if isinstance(metric, Gauge):
        return _GatheredGauge(child)
    return _GatheredCounter(child)


def count_recovered(metrics: GatewayMetrics, outcomes: list[str]) -> None:
    for outcome in outcomes:
        metrics.recovered.labels(outcome).inc()


def recovered_by_supervisor() -> list[str]:
    """The outcomes the supervisor's recovery handed to this worker (comma-separated)."""
    text = os.environ.get(RECOVERED_VARIABLE, "")
    return [part for part in text.split(",") if part.isidentifier()]


class _ProcessMetrics:
    """Process and GC series. In one process the stock collectors. With workers (custom collectors
    are not merged) the same names and types: CPU seconds and GC collections as counters summed
    over workers (each worker adds what it used since its last refresh), memory and descriptors as
    gauges with a `pid` label per live worker."""

    _GAUGES = (
        ("process_resident_memory_bytes", "Worker resident memory in bytes"),
        ("process_virtual_memory_bytes", "Worker virtual memory in bytes"),
        ("process_open_fds", "Worker open file descriptors"),
        ("process_max_fds", "Worker file descriptor limit"),
        ("process_start_time_seconds", "Worker start time (Unix epoch seconds)"),
    )

    def __init__(self, registry: CollectorRegistry, shared: bool) -> None:
        self._shared = shared
        if not shared:
            prometheus_client.ProcessCollector(registry=registry)
            prometheus_client.GCCollector(registry=registry)
            prometheus_client.PlatformCollector(registry=registry)
            return
        self._registry = registry
        self._collector = prometheus_client.ProcessCollector(registry=None)
        self._lock = threading.Lock()
        self._gauges: dict[str, Gauge] = {}
        self._cpu: Counter | None = None
        self._gc: Counter | None = None
        self._seen_cpu = 0.0
        self._seen_gc: dict[int, int] = {}

    def _create(self) -> tuple[Counter, Counter]:
        """The series, made on the first refresh: a process that never serves (the supervisor,
        recovering) writes no sample of its own."""
        registry = self._registry
        self._gauges = {
            name: Gauge(name, text, registry=registry, multiprocess_mode="liveall")
            for name, text in self._GAUGES
        }
        self._cpu = Counter(
            "process_cpu_seconds", "CPU time (user and system) of all workers in seconds",
            registry=registry,
        )
        self._gc = Counter(
            "python_gc_collections", "Garbage collections of all workers, by generation",
            ["generation"], registry=registry,
        )
        return self._cpu, self._gc

    def refresh(self) -> None:
        """Write this process's current values (the scraped worker's own at each scrape; every
        worker also refreshes on its own timer, see gateway/app.py)."""
        if not self._shared:
            return
        with self._lock:
            if self._cpu is None or self._gc is None:
                self._create()
            cpu, collections = self._cpu, self._gc
            assert cpu is not None and collections is not None
            for family in self._collector.collect():
                for sample in family.samples:
                    if sample.name == "process_cpu_seconds_total":
                        cpu.inc(max(0.0, sample.value - self._seen_cpu))
                        self._seen_cpu = max(self._seen_cpu, sample.value)
                    gauge = self._gauges.get(sample.name)
                    if gauge is not None:
                        gauge.set(sample.value)
            for generation, stats in enumerate(gc.get_stats()):
                done = stats["collections"]
                collections.labels(str(generation)).inc(max(0, done - self._seen_gc.get(generation, 0)))
                self._seen_gc[generation] = done
