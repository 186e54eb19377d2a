"""OpenTelemetry tracing (issue 13): the span tree of batches and proxied requests, and what the
upstream receives, with tracing on (gateway/otel.py) and off (gateway/tracing.py).

Every test talks to the gateway over a real socket with real loopback upstreams. With tracing on the
spans are captured by the SDK's in-memory exporter through a SimpleSpanProcessor on the app's own
(private) TracerProvider; the demo upstreams record every call's headers (`state_of(server).calls`).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from yarl import URL

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.model import (
    Batch,
    BatchOutcome,
    BatchReport,
    BatchResult,
    ExecutionMode,
    ItemResult,
    RollbackStatus,
    SubRequest,
    SubResponse,
)
from gateway.otel import OtelTracing, processors_from_environment
from gateway.tracing import Tracing, record_rollback, tracing_for
from gateway.upstream import UpstreamCall
from tests.conftest import MakeConfig, MakeGateway, deep_merge, state_of

Client = TestClient[web.Request, web.Application]
MakeTraced = Callable[..., Awaitable[Client]]

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
ENDPOINT = "/batch/v1"
ATOMIC = {"X-Batch-Atomic": "true"}


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(aiohttp_client: Any, make_config: MakeConfig, exporter: InMemorySpanExporter) -> MakeTraced:
    """A gateway with tracing on whose spans land in `exporter`."""

    async def make(overrides: dict[str, Any] | None = None) -> Client:
        config = make_config(
            deep_merge({"tracing": {"enabled": True, "service_name": "gateway-under-test"}}, overrides or {})
        )
        tracing = OtelTracing(config, processor=SimpleSpanProcessor(exporter))
        client: Client = await aiohttp_client(create_app(config, tracing=tracing))
        return client

    return make


def single(method: str, operation: str, body: Any = None) -> dict[str, Any]:
    item: dict[str, Any] = {"method": method, "operation": operation}
    if body is not None:
        item["body"] = body
    return {"SingleItem": item}


def batch(mode: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"Batch": {"batch_execution_type": mode, "items": list(items)}}


async def post_batch(client: Client, document: Any, headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
    async with client.post(ENDPOINT, json=document, headers=headers) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return response.headers["X-Batch-Id"], answer


async def finished(exporter: InMemorySpanExporter, servers: int = 1) -> list[ReadableSpan]:
    """The spans once `servers` server spans have ended (the server span ends after the handler
    returns, which may be just after the client read a streamed answer), by start time."""
    deadline = time.monotonic() + 2
    while True:
        spans = list(exporter.get_finished_spans())
        if sum(span.kind == SpanKind.SERVER for span in spans) >= servers or time.monotonic() > deadline:
            return sorted(spans, key=lambda span: span.start_time or 0)
        await asyncio.sleep(0.01)


def of_kind(spans: Sequence[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.kind == kind]


def only(spans: Sequence[ReadableSpan], kind: SpanKind) -> ReadableSpan:
    [span] = of_kind(spans, kind)
    return span


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def parent_id(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def received(*servers: TestServer) -> list[dict[str, Any]]:
    """Every call the upstreams received: method, path (with query) and propagation headers."""
    calls = []
    for server in servers:
        for call in state_of(server).calls:
            headers = [(name.lower(), value) for name, value in call["headers"]]
            seen: dict[str, Any] = {"method": call["method"], "path": call["path"]}
            for name in ("traceparent", "tracestate", "baggage"):
                seen[name] = [value for n, value in headers if n == name]
            calls.append(seen)
    return calls


def closed_port() -> int:
    """A loopback port that was just bound and closed, so nothing listens on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def split_traceparent(value: str) -> tuple[str, str, str, str]:
    version, trace, parent, flags = value.split("-")
    return version, trace, parent, flags


def all_attribute_values(spans: Sequence[ReadableSpan]) -> Iterator[str]:
    for span in spans:
        yield span.name
        yield from (str(value) for value in attrs(span).values())


# --- with tracing on: the span tree --------------------------------------------------------------


async def test_serial_batch_is_server_then_batch_then_one_client_span_per_call(
    traced: MakeTraced, exporter: InMemorySpanExporter, legacy: TestServer, ledger: TestServer,
) -> None:
    client = await traced()
    document = batch(
        "Serial",
        single("GET", "/echo/first?api_key=s3cret-value"),
        single("POST", "/orders", {"item": "pen"}),
        single("GET", "/accounts"),
    )
    headers = {"traceparent": CLIENT_TRACEPARENT, "tracestate": "vendor=opaque", "baggage": "tenant=acme"}
    batch_id, _ = await post_batch(client, document, headers)
    spans = await finished(exporter)

    assert len(spans) == 5
    server, inner = only(spans, SpanKind.SERVER), only(spans, SpanKind.INTERNAL)
    calls = of_kind(spans, SpanKind.CLIENT)
    assert {trace_id(span) for span in spans} == {TRACE}  # all in the client's trace
    assert parent_id(server) == PARENT and server.parent is not None and server.parent.is_remote
    assert server.name == "POST /batch/v1"
    assert attrs(server) | {"client.address": "?", "user_agent.original": "?"} == {
        "http.request.method": "POST", "url.path": "/batch/v1", "url.scheme": "http",
        "network.protocol.version": "1.1", "http.route": "/batch/v1", "http.response.status_code": 200,
        "gateway.kind": "batch_json", "gateway.batch_id": batch_id,
        "client.address": "?", "user_agent.original": "?",
    }
    assert attrs(server)["client.address"] == "127.0.0.1"
    assert server.status.status_code == StatusCode.UNSET
    assert server.resource.attributes["service.name"] == "gateway-under-test"

    assert inner.name == "batch batch_json" and parent_id(inner) == span_id(server)
    assert attrs(inner) == {
        "gateway.batch_id": batch_id, "gateway.batch.atomic": False, "gateway.kind": "batch_json",
    }

    assert [parent_id(span) for span in calls] == [span_id(inner)] * 3
    assert [span.name for span in calls] == ["subrequest GET", "subrequest POST", "subrequest GET"]
    ports = {"legacy": URL(str(legacy.make_url(""))).port, "ledger": URL(str(ledger.make_url(""))).port}
    expected = [
        ("legacy", "/echo/first", 200), ("legacy", "/orders", 201), ("ledger", "/accounts", 200),
    ]
    for position, (span, (upstream, path, status)) in enumerate(zip(calls, expected, strict=True)):
        assert attrs(span) == {
            "http.request.method": span.name.split()[1], "server.address": "127.0.0.1",
            "server.port": ports[upstream], "url.path": path, "url.scheme": "http",
            "http.response.status_code": status, "gateway.upstream": upstream,
            "gateway.purpose": "subrequest", "gateway.item": f"/Batch/items/{position}/SingleItem",
        }
        assert span.status.status_code == StatusCode.UNSET
    assert not any("s3cret" in value for value in all_attribute_values(spans))  # no query recorded

    seen = received(legacy, ledger)
    assert [(call["method"], call["path"]) for call in seen] == [
        ("GET", "/echo/first?api_key=s3cret-value"), ("POST", "/orders"), ("GET", "/accounts"),
    ]
    by_path = {call["path"].split("?")[0]: call for call in seen}
    for span in calls:
        call = by_path[attrs(span)["url.path"]]
        assert call["traceparent"] == [f"00-{TRACE}-{span_id(span)}-01"]  # its own client span
        assert call["tracestate"] == ["vendor=opaque"]
        assert call["baggage"] == ["tenant=acme"]


async def test_unordered_batch_gives_every_concurrent_call_its_own_span(
    traced: MakeTraced, exporter: InMemorySpanExporter, legacy: TestServer, ledger: TestServer,
) -> None:
    client = await traced()
    document = batch(
        "Unordered",
        single("GET", "/echo/a?delay_ms=60"),
        single("GET", "/echo/b?delay_ms=60"),
        batch("Serial", single("GET", "/echo/c?delay_ms=10"), single("GET", "/accounts")),
        single("GET", "/echo/d?delay_ms=60"),
    )
    batch_id, _ = await post_batch(client, document, {"traceparent": CLIENT_TRACEPARENT})
    spans = await finished(exporter)

    server, inner = only(spans, SpanKind.SERVER), only(spans, SpanKind.INTERNAL)
    calls = of_kind(spans, SpanKind.CLIENT)
    assert len(spans) == 7 and len(calls) == 5
    assert {trace_id(span) for span in spans} == {TRACE}
    assert parent_id(server) == PARENT and parent_id(inner) == span_id(server)
    assert attrs(inner)["gateway.batch_id"] == batch_id
    # each call ran in a task of its own, yet its span is the batch span's child (context copied)
    assert [parent_id(span) for span in calls] == [span_id(inner)] * 5
    assert sorted(attrs(span)["gateway.item"] for span in calls) == [
        "/Batch/items/0/SingleItem", "/Batch/items/1/SingleItem",
        "/Batch/items/2/Batch/items/0/SingleItem", "/Batch/items/2/Batch/items/1/SingleItem",
        "/Batch/items/3/SingleItem",
    ]
    first, second = (s for s in calls if attrs(s)["url.path"] in ("/echo/a", "/echo/b"))
    assert first.end_time is not None and second.start_time is not None
    assert second.start_time < first.end_time  # they did overlap

    seen = received(legacy, ledger)
    parents = [split_traceparent(call["traceparent"][0]) for call in seen]
    assert len(seen) == 5
    assert {(version, trace, flags) for version, trace, _, flags in parents} == {("00", TRACE, "01")}
    assert sorted(parent for _, _, parent, _ in parents) == sorted(span_id(span) for span in calls)
    assert len({parent for _, _, parent, _ in parents}) == 5 and PARENT not in {p for _, _, p, _ in parents}


async def test_atomic_batch_rolled_back_has_snapshot_undo_begin_and_rollback_spans(
    traced: MakeTraced, exporter: InMemorySpanExporter, legacy: TestServer, ledger: TestServer,
) -> None:
    """legacy (compensation): a snapshot before the PUT, an undo per executed call; ledger (token):
    begin, then rollback. The last call answers 404, so everything is rolled back."""
    client = await traced()
    state_of(legacy).store.create({"item": "order 1"})
    document = batch(
        "Serial",
        single("POST", "/orders", {"item": "ink"}),
        single("POST", "/accounts", {"owner": "ann"}),
        single("PUT", "/orders/1", {"item": "changed"}),
        single("GET", "/orders/404"),
    )
    batch_id, answer = await post_batch(client, document, {**ATOMIC, "traceparent": CLIENT_TRACEPARENT})
    assert answer["atomic"]["outcome"] == "rolled_back"
    spans = await finished(exporter)

    server, inner = only(spans, SpanKind.SERVER), only(spans, SpanKind.INTERNAL)
    calls = of_kind(spans, SpanKind.CLIENT)
    assert {trace_id(span) for span in spans} == {TRACE}
    assert parent_id(server) == PARENT and parent_id(inner) == span_id(server)
    assert inner.name == "batch batch_json"
    assert {k: v for k, v in attrs(inner).items() if not k.startswith("gateway.batch.calls.")} == {
        "gateway.batch_id": batch_id, "gateway.batch.atomic": True, "gateway.kind": "batch_json",
        "gateway.batch.outcome": "rolled_back",
    }
    rollbacks = [
        (event.attributes or {}).get("gateway.rollback.status")
        for event in inner.events
        if event.name == "gateway.rollback"
    ]
    assert rollbacks == ["rolled_back", "rolled_back", "rolled_back", "failed"]  # one per call, in order
    # the atomic run is a task of its own: the batch span was current when it was created
    assert [parent_id(span) for span in calls] == [span_id(inner)] * len(calls)
    described = sorted(
        (attrs(s)["gateway.purpose"], s.name, attrs(s)["gateway.upstream"], attrs(s).get("gateway.item"),
         attrs(s).get("url.path"), attrs(s)["http.response.status_code"])
        for s in calls
    )
    assert described == sorted([
        ("subrequest", "subrequest POST", "legacy", "/Batch/items/0/SingleItem", "/orders", 201),
        ("begin", "begin POST", "ledger", None, "/tx", 201),
        ("subrequest", "subrequest POST", "ledger", "/Batch/items/1/SingleItem", "/accounts", 201),
        ("snapshot", "snapshot GET", "legacy", "/Batch/items/2/SingleItem", "/orders/1", 200),
        ("subrequest", "subrequest PUT", "legacy", "/Batch/items/2/SingleItem", "/orders/1", 200),
        ("subrequest", "subrequest GET", "legacy", "/Batch/items/3/SingleItem", "/orders/404", 404),
        ("undo", "undo PUT", "legacy", "/Batch/items/2/SingleItem", "/orders/1", 200),
        ("undo", "undo DELETE", "legacy", "/Batch/items/0/SingleItem", "/orders/2", 204),
        ("rollback", "rollback POST", "ledger", None, None, 200),  # no url.path: it holds the token
    ])
    templates = {attrs(s)["gateway.purpose"]: attrs(s).get("url.template") for s in calls}
    assert templates["rollback"] == "/tx/{token}/rollback"  # the shape of the path, not the token
    assert templates["begin"] == "/tx" and templates["subrequest"] is None
    failing = next(s for s in calls if attrs(s).get("url.path") == "/orders/404")
    assert failing.status.status_code == StatusCode.ERROR and attrs(failing)["error.type"] == "404"
    assert all(s.status.status_code == StatusCode.UNSET for s in calls if s is not failing)
    assert server.status.status_code == StatusCode.UNSET  # the batch was answered 200

    seen = received(legacy, ledger)
    assert len(seen) == len(calls) == 9
    own = {f"00-{TRACE}-{span_id(span)}-01" for span in calls}
    assert {call["traceparent"][0] for call in seen} == own  # every call, undo and rollback its own id
    rollback_call = next(call for call in seen if call["path"].endswith("/rollback"))
    rollback_span = next(s for s in calls if attrs(s)["gateway.purpose"] == "rollback")
    assert rollback_call["traceparent"] == [f"00-{TRACE}-{span_id(rollback_span)}-01"]
    assert state_of(legacy).store.records == {"1": {"item": "order 1", "id": "1"}}


async def test_multipart_batch_spans_name_the_part(
    traced: MakeTraced, exporter: InMemorySpanExporter, legacy: TestServer,
) -> None:
    client = await traced()
    body = (
        "--b\r\nContent-Type: application/http\r\n\r\nGET /echo/one HTTP/1.1\r\n\r\n\r\n"
        "--b\r\nContent-Type: application/http\r\n\r\nGET /echo/two HTTP/1.1\r\n\r\n\r\n--b--\r\n"
    )
    headers = {"Content-Type": "multipart/mixed; boundary=b", "X-Batch-Atomic": "false",
               "traceparent": CLIENT_TRACEPARENT}
    async with client.post("/v1/api/batch", data=body.encode(), headers=headers) as response:
        assert response.status == 200, await response.text()
    spans = await finished(exporter)
    server, inner = only(spans, SpanKind.SERVER), only(spans, SpanKind.INTERNAL)
    calls = of_kind(spans, SpanKind.CLIENT)
    assert server.name == "POST /v1/api/batch" and inner.name == "batch batch_multipart"
    assert sorted(attrs(span)["gateway.item"] for span in calls) == ["part 1", "part 2"]
    assert {parent_id(span) for span in calls} == {span_id(inner)}
    assert sorted(call["traceparent"][0] for call in received(legacy)) == sorted(
        f"00-{TRACE}-{span_id(span)}-01" for span in calls
    )


async def test_proxied_request_is_a_server_span_with_one_proxy_client_span(
    traced: MakeTraced, exporter: InMemorySpanExporter, legacy: TestServer,
) -> None:
    client = await traced()
    headers = {"traceparent": CLIENT_TRACEPARENT, "tracestate": "vendor=opaque", "baggage": "tenant=acme"}
    async with client.get("/echo/proxied?token=s3cret", headers=headers) as response:
        assert response.status == 200
        echo = await response.json()
    spans = await finished(exporter)

    assert len(spans) == 2
    server, call = only(spans, SpanKind.SERVER), only(spans, SpanKind.CLIENT)
    assert server.name == "GET /echo" and parent_id(server) == PARENT and trace_id(server) == TRACE
    assert attrs(server)["http.route"] == "/echo" and attrs(server)["url.path"] == "/echo/proxied"
    assert attrs(server)["gateway.upstream"] == "legacy" and attrs(server)["gateway.kind"] == "proxy"
    assert attrs(server)["http.response.status_code"] == 200
    assert call.name == "proxy GET" and parent_id(call) == span_id(server) and trace_id(call) == TRACE
    assert attrs(call)["gateway.purpose"] == "proxy" and attrs(call)["url.path"] == "/echo/proxied"
    assert attrs(call)["http.response.status_code"] == 200 and "gateway.item" not in attrs(call)
    assert not any("s3cret" in value for value in all_attribute_values(spans))

    seen = [(name.lower(), value) for name, value in echo["headers"]]
    assert [v for n, v in seen if n == "traceparent"] == [f"00-{TRACE}-{span_id(call)}-01"]
    assert [v for n, v in seen if n == "tracestate"] == ["vendor=opaque"]
    assert [v for n, v in seen if n == "baggage"] == ["tenant=acme"]


async def test_unreachable_upstream_makes_error_spans(
    traced: MakeTraced, exporter: InMemorySpanExporter,
) -> None:
    client = await traced({"upstreams": {"legacy": {"url": f"http://127.0.0.1:{closed_port()}"}}})
    async with client.get("/orders/1") as response:
        assert response.status == 502
    spans = await finished(exporter)
    server, call = only(spans, SpanKind.SERVER), only(spans, SpanKind.CLIENT)
    assert call.status.status_code == StatusCode.ERROR
    assert attrs(call)["error.type"] == "connect" and "http.response.status_code" not in attrs(call)
    assert "unreachable" in (call.status.description or "")
    assert server.status.status_code == StatusCode.ERROR
    assert attrs(server)["http.response.status_code"] == 502
    assert attrs(server)["error.type"] == attrs(server)["gateway.rejection"] == "UpstreamUnavailable"


async def test_a_client_error_is_not_a_server_error(
    traced: MakeTraced, exporter: InMemorySpanExporter, legacy: TestServer,
) -> None:
    client = await traced()
    headers = {"Content-Type": "application/json"}
    async with client.post(ENDPOINT, data=b'{"Batch": 1', headers=headers) as response:
        assert response.status == 400
    spans = await finished(exporter)
    assert len(spans) == 1  # nothing ran: no batch span, no client span
    [server] = spans
    assert server.name == "POST /batch/v1"
    assert server.status.status_code == StatusCode.UNSET  # 4xx: unset on a server span
    assert attrs(server)["http.response.status_code"] == 400
    assert attrs(server)["gateway.rejection"] == "MalformedBatch" and "error.type" not in attrs(server)
    assert state_of(legacy).calls == []


async def test_without_a_client_trace_the_gateway_starts_one(
    traced: MakeTraced, exporter: InMemorySpanExporter, legacy: TestServer,
) -> None:
    client = await traced()
    await post_batch(client, batch("Unordered", single("GET", "/echo/1"), single("GET", "/echo/2")), {})
    spans = await finished(exporter)
    server = only(spans, SpanKind.SERVER)
    assert server.parent is None
    new_trace = trace_id(server)
    assert {trace_id(span) for span in spans} == {new_trace}
    parents = [split_traceparent(call["traceparent"][0]) for call in received(legacy)]
    assert {trace for _, trace, _, _ in parents} == {new_trace}
    assert all(int(flags, 16) & 1 for _, _, _, flags in parents)  # sampled
    assert sorted(p for _, _, p, _ in parents) == sorted(span_id(s) for s in of_kind(spans, SpanKind.CLIENT))


@pytest.mark.parametrize("invalid", [
    f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01", f"ff-{TRACE}-{PARENT}-01", "garbage",
])
async def test_an_invalid_client_traceparent_is_replaced_by_a_new_trace(
    traced: MakeTraced, exporter: InMemorySpanExporter, legacy: TestServer, invalid: str,
) -> None:
    client = await traced()
    await post_batch(client, batch("Serial", single("GET", "/echo/x")), {"traceparent": invalid})
    spans = await finished(exporter)
    server, call = only(spans, SpanKind.SERVER), only(spans, SpanKind.CLIENT)
    assert server.parent is None and trace_id(server) not in (TRACE, "0" * 32)
    [seen] = received(legacy)
    assert seen["traceparent"] == [f"00-{trace_id(server)}-{span_id(call)}-03"]  # sampled, random id


async def test_an_unsampled_client_trace_records_nothing_but_each_call_gets_its_own_id(
    traced: MakeTraced, exporter: InMemorySpanExporter, legacy: TestServer,
) -> None:
    client = await traced()
    unsampled = f"00-{TRACE}-{PARENT}-00"
    document = batch("Unordered", *(single("GET", f"/echo/{n}") for n in range(3)))
    await post_batch(client, document, {"traceparent": unsampled})
    await asyncio.sleep(0.05)
    assert exporter.get_finished_spans() == ()  # the default sampler follows the client's decision
    parents = [split_traceparent(call["traceparent"][0]) for call in received(legacy)]
    assert {(v, t, f) for v, t, _, f in parents} == {("00", TRACE, "00")}
    assert len({p for _, _, p, _ in parents} - {PARENT}) == 3


# --- with tracing off (gateway/tracing.py): still one parent id per call --------------------------


async def test_tracing_off_each_call_gets_its_own_parent_id_in_the_clients_trace(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer,
) -> None:
    client = await make_gateway()
    assert client.app is not None
    document = batch(
        "Unordered", single("GET", "/echo/1"), single("GET", "/echo/2"), single("GET", "/accounts")
    )
    headers = {"traceparent": CLIENT_TRACEPARENT, "tracestate": "vendor=opaque", "baggage": "tenant=acme"}
    await post_batch(client, document, headers)
    async with client.get("/echo/proxied", headers=headers) as response:
        assert response.status == 200
    seen = received(legacy, ledger)
    assert len(seen) == 4
    parents = [split_traceparent(call["traceparent"][0]) for call in seen]
    assert {(v, t, f) for v, t, _, f in parents} == {("00", TRACE, "01")}
    ids = [p for _, _, p, _ in parents]
    assert len(set(ids)) == 4 and PARENT not in ids
    assert all(call["tracestate"] == ["vendor=opaque"] for call in seen)
    assert all(call["baggage"] == ["tenant=acme"] for call in seen)


@pytest.mark.parametrize("invalid", [
    f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01", f"ff-{TRACE}-{PARENT}-01",
    f"00-{TRACE}-{PARENT}-01-extra", f"00-{TRACE.upper()}-{PARENT}-01", "garbage",
])
async def test_tracing_off_an_invalid_traceparent_is_dropped(
    make_gateway: MakeGateway, legacy: TestServer, invalid: str,
) -> None:
    client = await make_gateway()
    await post_batch(client, batch("Serial", single("GET", "/echo/1")), {"traceparent": invalid})
    async with client.get("/echo/proxied", headers={"traceparent": invalid}) as response:
        assert response.status == 200
    seen = received(legacy)
    assert [call["traceparent"] for call in seen] == [[], []]


async def test_tracing_off_is_the_plain_tracing(make_config: MakeConfig) -> None:
    assert type(tracing_for(make_config())) is Tracing


# --- OtelTracing on its own: parents outside a request, rollback events, config ------------------


def _tracing(config: GatewayConfig, exporter: InMemorySpanExporter) -> OtelTracing:
    return OtelTracing(config, processor=SimpleSpanProcessor(exporter))


def test_a_call_outside_any_request_continues_the_trace_it_carries(
    make_config: MakeConfig, exporter: InMemorySpanExporter,
) -> None:
    """Start-up recovery's undo and replay calls carry the journaled traceparent of the client."""
    tracing = _tracing(make_config(), exporter)
    headers = (("traceparent", CLIENT_TRACEPARENT), ("X-Other", "1"))
    call = UpstreamCall("legacy", "DELETE", URL("http://127.0.0.1:9/orders/4"), headers, purpose="undo",
                        item="/Batch/items/0/SingleItem")
    with tracing.client_span(call) as span:
        sent = span.outgoing_headers(call.headers)
    [recorded] = exporter.get_finished_spans()
    assert trace_id(recorded) == TRACE and parent_id(recorded) == PARENT
    assert sent == (("X-Other", "1"), ("traceparent", f"00-{TRACE}-{span_id(recorded)}-01"))
    tracing.shutdown()


def test_health_checks_get_no_span_and_a_fresh_parent_id(
    make_config: MakeConfig, exporter: InMemorySpanExporter,
) -> None:
    tracing = _tracing(make_config(), exporter)
    call = UpstreamCall("legacy", "GET", URL("http://127.0.0.1:9/health"),
                        (("traceparent", CLIENT_TRACEPARENT),), purpose="health_check")
    with tracing.client_span(call) as span:
        [(name, value)] = span.outgoing_headers(call.headers)
    assert exporter.get_finished_spans() == ()
    assert name == "traceparent" and value.startswith(f"00-{TRACE}-") and PARENT not in value


def test_rollback_status_is_an_event_per_call_on_the_batch_span(
    make_config: MakeConfig, exporter: InMemorySpanExporter,
) -> None:
    tracing = _tracing(make_config(), exporter)
    nested = "/Batch/items/1/Batch/items/0/SingleItem"
    item = Batch(ExecutionMode.SERIAL, (
        SubRequest("POST", "/orders", where="/Batch/items/0/SingleItem"),
        Batch(ExecutionMode.SERIAL, (SubRequest("GET", "/orders/9", where=nested),)),
    ))
    root = BatchResult(ExecutionMode.SERIAL, (
        ItemResult(SubResponse(201), RollbackStatus.ROLLED_BACK, "DELETE /orders/4"),
        BatchResult(ExecutionMode.SERIAL, (ItemResult(SubResponse(404), RollbackStatus.FAILED),)),
    ))
    report = BatchReport(root, "b1", atomic_outcome=BatchOutcome.ROLLED_BACK)
    with tracing.batch_span(batch_id="b1", kind="batch_json", atomic=True) as span:
        record_rollback(span, item, report)
    [recorded] = exporter.get_finished_spans()
    assert [(event.name, dict(event.attributes or {})) for event in recorded.events] == [
        ("gateway.rollback", {"gateway.item": "/Batch/items/0/SingleItem",
                              "gateway.rollback.status": "rolled_back",
                              "gateway.rollback.detail": "DELETE /orders/4"}),
        ("gateway.rollback", {"gateway.item": nested, "gateway.rollback.status": "failed"}),
    ]
    assert attrs(recorded)["gateway.batch.calls.rolled_back"] == 1
    assert attrs(recorded)["gateway.batch.calls.failed"] == 1
    tracing.shutdown()


def test_service_name_comes_from_the_environment_before_the_config(
    make_config: MakeConfig, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config({"tracing": {"enabled": True, "service_name": "from-config"}})
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    resource = _tracing(config, exporter).provider.resource.attributes
    assert resource["service.name"] == "from-config"
    assert resource["deployment.environment"] == "test" and resource["service.version"] == "0.1.0"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert _tracing(config, exporter).provider.resource.attributes["service.name"] == "from-env"


def test_exporters_follow_otel_traces_exporter() -> None:
    assert processors_from_environment({"OTEL_TRACES_EXPORTER": "none"}) == []
    for chosen in (
        processors_from_environment({}),  # otlp by default
        processors_from_environment({"OTEL_TRACES_EXPORTER": "console"}),
        processors_from_environment({"OTEL_TRACES_EXPORTER": "otlp, console",
                                     "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}),
    ):
        assert chosen and all(isinstance(p, BatchSpanProcessor) for p in chosen)
        for processor in chosen:
            processor.shutdown()
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: unknown span exporter 'zipkin'"):
        processors_from_environment({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: OTLP protocol 'grpc'"):
        processors_from_environment({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})


def test_without_the_otel_extra_enabling_tracing_is_a_config_error(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "gateway.otel")
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    with pytest.raises(ConfigError) as raised:
        tracing_for(make_config({"tracing": {"enabled": True}}))
    assert str(raised.value) == (
        "<config>: tracing.enabled: needs the otel extra: pip install 'batch-gateway[otel]'"
    )


async def test_sdk_disabled_records_nothing_and_passes_parent_ids_on_as_when_off(
    make_config: MakeConfig, exporter: InMemorySpanExporter, aiohttp_client: Any, legacy: TestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    config = make_config({"tracing": {"enabled": True}})
    client: Client = await aiohttp_client(create_app(config, tracing=_tracing(config, exporter)))
    await post_batch(client, batch("Unordered", single("GET", "/echo/1"), single("GET", "/echo/2")),
                     {"traceparent": CLIENT_TRACEPARENT})
    assert exporter.get_finished_spans() == ()
    parents = [split_traceparent(call["traceparent"][0]) for call in received(legacy)]
    assert {t for _, t, _, _ in parents} == {TRACE} and len({p for _, _, p, _ in parents} - {PARENT}) == 2


# --- OTLP export as the OTEL_* variables say -------------------------------------------------------


async def test_spans_are_exported_over_otlp_http_to_the_configured_endpoint(
    make_config: MakeConfig, aiohttp_client: Any, aiohttp_server: Any, legacy: TestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bodies: list[tuple[str, bytes]] = []

    async def collect(request: web.Request) -> web.Response:
        bodies.append((request.headers.get("Content-Type", ""), await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    collector_app = web.Application()
    collector_app.router.add_post("/v1/traces", collect)
    collector: TestServer = await aiohttp_server(collector_app)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", str(collector.make_url("")).rstrip("/"))
    monkeypatch.setenv("OTEL_SERVICE_NAME", "exported-gateway")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    config = make_config({"tracing": {"enabled": True}})
    tracing = tracing_for(config)
    assert isinstance(tracing, OtelTracing)
    client: Client = await aiohttp_client(create_app(config, tracing=tracing))
    async with client.get("/echo/exported", headers={"traceparent": CLIENT_TRACEPARENT}) as response:
        assert response.status == 200
    await asyncio.sleep(0.05)  # the server span ends just after the answer
    await asyncio.to_thread(tracing.shutdown)  # flushes: the exporter posts to the collector (this loop)

    assert bodies and {content_type for content_type, _ in bodies} == {"application/x-protobuf"}
    names, services, traces = [], set(), set()
    for _, body in bodies:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            resource = resource_spans.resource.attributes
            services |= {a.value.string_value for a in resource if a.key == "service.name"}
            for scope_spans in resource_spans.scope_spans:
                names += [span.name for span in scope_spans.spans]
                traces |= {span.trace_id.hex() for span in scope_spans.spans}
    assert sorted(names) == ["GET /echo", "proxy GET"]
    assert services == {"exported-gateway"} and traces == {TRACE}
