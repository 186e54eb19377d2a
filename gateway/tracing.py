"""Tracing: a server span per request, a span per batch, a client span per upstream call.

`tracing_for(config)` gives `Tracing` (off: no spans, but each upstream call still gets its own
W3C traceparent span id) or, with `tracing.enabled`, the OpenTelemetry one in gateway/otel.py.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from gateway.config import GatewayConfig
from gateway.model import BatchOutcome, BatchReport, Headers, Item, ItemResult, ResultNode, iter_calls

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.upstream import UpstreamCall

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
PROPAGATION_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})


def child_traceparent(value: str) -> str | None:
    """`value` with a fresh parent id (a new span in the same trace), or None when it is not a
    valid W3C traceparent (version ff, an all-zero trace or parent id)."""
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    if version == "00" and rest:
        return None
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"  # we speak version 00


class Span:
    """One span as the gateway sees it; this base records nothing."""

    def set_attribute(self, key: str, value: str | int | float | bool) -> None:
        """An attribute (OpenTelemetry semantic-convention names where there is one)."""

    def set_http_status(self, status: int) -> None:
        """The HTTP status of the request or call; 0 when there was none."""

    def record_failure(self, kind: str, detail: str) -> None:
        """The call or request failed without an HTTP status of its own (or the gateway refused)."""

    def outgoing_headers(self, headers: Headers) -> Headers:
        """`headers` as they go upstream: traceparent naming this span (when there is a trace),
        tracestate and baggage passed on."""
        return headers

    def add_event(self, name: str, attributes: dict[str, str | int | float | bool]) -> None:
        """A timestamped event on the span (e.g. one call's rollback status on its batch span)."""


class _PassThroughSpan(Span):
    """Tracing off: a traceparent the call carries gets a span id of its own."""

    def outgoing_headers(self, headers: Headers) -> Headers:
        out: list[tuple[str, str]] = []
        for name, value in headers:
            if name.lower() == "traceparent":
                child = child_traceparent(value)
                if child is None:
                    continue  # an invalid traceparent is dropped, not passed on (W3C trace context)
                value = child
            out.append((name, value))
        return tuple(out)


_NOTHING = Span()
PASS_THROUGH: Span = _PassThroughSpan()
"""The span of a call that is not traced: its traceparent (if any) gets a fresh parent id."""


class Tracing:
    """Tracing off: no spans are recorded or exported."""

    enabled = False

    @contextmanager
    def server_span(self, request: web.Request) -> Iterator[Span]:
        """The span of one HTTP request the gateway serves (the client's trace when it sent one)."""
        yield _NOTHING

    @contextmanager
    def batch_span(self, *, batch_id: str, kind: str, atomic: bool) -> Iterator[Span]:
        """The span of one batch, inside its request's server span."""
        yield _NOTHING

    @contextmanager
    def client_span(self, call: UpstreamCall) -> Iterator[Span]:
        """The span of one upstream call (sub-request, snapshot, undo, begin/commit/rollback,
        proxied request); `outgoing_headers` gives the headers that carry it."""
        yield PASS_THROUGH

    def shutdown(self) -> None:
        """Flush and stop exporting (at process exit)."""


def tracing_for(config: GatewayConfig) -> Tracing:
    """Tracing as configured; `tracing.enabled` without the `otel` extra is a ConfigError (raised
    by importing gateway/otel.py), as is an OTEL_TRACES_EXPORTER or OTLP protocol it cannot do."""
    if not config.tracing.enabled:
        return Tracing()
    from gateway.otel import OtelTracing  # imported only when asked for: the extra is optional

    return OtelTracing(config)


def record_rollback(span: Span, item: Item, report: BatchReport) -> None:
    """On an atomic batch's span: one `gateway.rollback` event per call (its item pointer or part,
    its rollback status and detail) when the batch did not commit, and the count of each status.

    `item` is the batch as decoded (its calls line up with the report's results, depth first).
    """
    if report.atomic_outcome is None:
        return
    counts: dict[str, int] = {}
    detailed = report.atomic_outcome is not BatchOutcome.COMMITTED
    for call, result in zip(iter_calls(item), _results(report.root), strict=False):
        if result.rollback is None:
            continue
        status = result.rollback.value
        counts[status] = counts.get(status, 0) + 1
        if detailed:
            attributes: dict[str, str | int | float | bool] = {
                "gateway.item": call.where, "gateway.rollback.status": status,
            }
            if result.rollback_detail:
                attributes["gateway.rollback.detail"] = result.rollback_detail
            span.add_event("gateway.rollback", attributes)
    for status, count in sorted(counts.items()):
        span.set_attribute(f"gateway.batch.calls.{status}", count)


def _results(node: ResultNode) -> list[ItemResult]:
    if isinstance(node, ItemResult):
        return [node]
    return [leaf for child in node.items for leaf in _results(child)]
