"""Prometheus metrics: requests, sub-requests, rollbacks and upstream latency, on a private registry.

One `GatewayMetrics` per app, so several apps (tests) never collide on the global registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests", "Requests handled", ["kind", "status"], registry=self.registry
        )
        self.subrequests = Counter(
            "gateway_subrequests", "Batch sub-requests executed", ["upstream", "status"],
            registry=self.registry,
        )
        self.batches = Counter(
            "gateway_batches", "Batches by format and atomic outcome", ["format", "outcome"],
            registry=self.registry,
        )
        self.rollbacks = Counter(
            "gateway_rollback_actions", "Compensations and transaction rollbacks",
            ["kind", "result"], registry=self.registry,
        )
        self.reloads = Counter(
            "gateway_config_reloads", "Config reloads by result (ok, failed)", ["result"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_latency_seconds", "Upstream call latency", ["upstream"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.upstream_up = Gauge(
            "gateway_upstream_up", "1 while the upstream is up, 0 while down or probing (gateway/health.py); "
            "no sample while unknown", ["upstream"], registry=self.registry,
        )

    def observe_upstream(self, upstream: str, status: int, seconds: float) -> None:
        self.upstream_latency.labels(upstream).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
