"""OpenTelemetry tracing (the `otel` extra): spans through the SDK, exported as OTEL_* says.

Imported only when `tracing.enabled` is set (see gateway/tracing.py); importing it without the
extra installed is a ConfigError naming `tracing.enabled`.

- A private TracerProvider per `OtelTracing` (the global one is left alone): its Resource has
  `service.name` from OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES), else `tracing.service_name`;
  the SDK's sampler reads OTEL_TRACES_SAMPLER(_ARG); OTEL_SDK_DISABLED turns spans off.
- Export, unless a span processor is handed in (the tests): OTEL_TRACES_EXPORTER, a comma-separated
  list of `otlp` (the default: OTLP/HTTP protobuf, configured by OTEL_EXPORTER_OTLP_*, batched as
  OTEL_BSP_* say), `console` and `none`.
- Propagation: W3C trace context and baggage, extracted from the client's request and injected
  into every upstream call (its own span id), replacing what the call's headers held.
- Spans follow the HTTP semantic conventions: a SERVER span per request ("POST /batch/v1", ERROR
  only for 5xx), an INTERNAL span per batch ("batch batch_json"), a CLIENT span per upstream call
  ("subrequest GET", "undo DELETE", "begin POST", ..., ERROR for 4xx and 5xx and failed calls).
  No query string is recorded (it may carry secrets): `url.path` only, and not even that for
  commit and rollback calls (their path may hold the upstream's transaction token).
- Health checks get no span (they would start a trace every interval). A call made outside any
  request (start-up recovery's undo and replay calls) continues the trace named by the traceparent
  it carries, i.e. the trace of the client request that made the original call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.errors import ConfigError, GatewayError
from gateway.model import Headers
from gateway.tracing import PASS_THROUGH, PROPAGATION_HEADERS, Span, Tracing

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.baggage import get_all as get_all_baggage
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.context import Context
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # the base install: the `otel` extra is optional
    raise ConfigError(
        "<config>", "tracing.enabled", "needs the otel extra: pip install 'batch-gateway[otel]'"
    ) from exc

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.upstream import UpstreamCall

Value = str | int | float | bool

_BAGGAGE = W3CBaggagePropagator()
_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), _BAGGAGE])
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_ENVIRONMENT = "<environment>"
_TOKEN_IN_PATH = frozenset({"commit", "rollback"})
"""Calls whose path may hold an upstream transaction token (`/tx/{token}/commit`): no url.path."""


class _OtelSpan(Span):
    """One SDK span behind the gateway's Span interface; its status is decided when it ends."""

    __slots__ = ("_context", "_failure", "_span", "_status", "_token")

    def __init__(self, span: trace.Span, context: Context) -> None:
        self._span = span
        self._context = context
        """The context naming this span (and the baggage it was started under)."""
        self._status = 0
        self._failure: tuple[str, str] | None = None

    def set_attribute(self, key: str, value: Value) -> None:
        self._span.set_attribute(key, value)

    def set_http_status(self, status: int) -> None:
        self._status = status
        if status:
            self._span.set_attribute("http.response.status_code", status)

    def record_failure(self, kind: str, detail: str) -> None:
        self._failure = (kind, detail)

    def add_event(self, name: str, attributes: dict[str, Value]) -> None:
        self._span.add_event(name, attributes)

    def outgoing_headers(self, headers: Headers) -> Headers:
        """W3C trace context naming this span (formatted here as TraceContextTextMapPropagator
        would, without its carrier round trip: this runs for every call) and the baggage."""
        own = self._span.get_span_context()
        out = [(name, value) for name, value in headers if name.lower() not in PROPAGATION_HEADERS]
        out.append(("traceparent", f"00-{own.trace_id:032x}-{own.span_id:016x}-{own.trace_flags:02x}"))
        if own.trace_state:
            out.append(("tracestate", own.trace_state.to_header()))
        if get_all_baggage(self._context):
            carrier: dict[str, str] = {}
            _BAGGAGE.inject(carrier, context=self._context)
            out.extend(carrier.items())
        return tuple(out)

    # -- current while its block runs, then ended -------------------------------------------------

    def __enter__(self) -> _OtelSpan:
        """The span current (asyncio copies the context into tasks started meanwhile). A class,
        not a generator: it runs once per upstream call."""
        self._token = otel_context.attach(self._context)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self._escaped(exc)
        otel_context.detach(self._token)
        self._end()

    # -- ending -----------------------------------------------------------------------------------

    def _error_status(self, status: int) -> bool:
        """Whether an HTTP status makes the span an error (client spans: 4xx and 5xx)."""
        return status >= 400

    def _failure_is_error(self) -> bool:
        """Whether a recorded failure makes the span an error (client spans: always, e.g. a body
        that broke off after a 200)."""
        return True

    def _escaped(self, exc: BaseException) -> None:
        """An exception left the span's block; a failure already recorded says more."""
        if self._failure is not None:
            return
        if isinstance(exc, GatewayError) and exc.status < 500:  # the client's fault
            self._span.set_attribute("gateway.rejection", type(exc).__name__)
        else:
            self._failure = (type(exc).__name__, str(exc)[:300])

    def _end(self) -> None:
        span, failure, status = self._span, self._failure, self._status
        if (status and self._error_status(status)) or (failure is not None and self._failure_is_error()):
            span.set_attribute("error.type", failure[0] if failure is not None else str(status))
            span.set_status(Status(StatusCode.ERROR, failure[1] if failure is not None else None))
        span.end()


class _ServerSpan(_OtelSpan):
    """A request the gateway serves: named "METHOD route" once the route is known."""

    __slots__ = ("_method", "_route")

    def __init__(self, span: trace.Span, context: Context, method: str) -> None:
        super().__init__(span, context)
        self._method = method
        self._route = ""

    def set_attribute(self, key: str, value: Value) -> None:
        if key == "http.route" and isinstance(value, str):
            self._route = value
        super().set_attribute(key, value)

    def record_failure(self, kind: str, detail: str) -> None:
        """The gateway refused or failed the request: `gateway.rejection` names the kind; only a
        5xx answer makes the span an error (a 4xx is the client's, per the HTTP conventions)."""
        self._span.set_attribute("gateway.rejection", kind)
        super().record_failure(kind, detail)

    def _error_status(self, status: int) -> bool:
        return status >= 500

    def _failure_is_error(self) -> bool:
        return not self._status  # with an answer, its status decides

    def _end(self) -> None:
        if self._route:
            name = "HTTP" if self._method == "_OTHER" else self._method
            self._span.update_name(f"{name} {self._route}")
        super()._end()


class _BatchSpan(_OtelSpan):
    """A batch: an error only when it failed as a whole (an exception, not an item's status)."""

    def _error_status(self, status: int) -> bool:
        return False


class OtelTracing(Tracing):
    """OpenTelemetry spans on a private TracerProvider; `processor` replaces the OTEL_* export."""

    enabled = True

    def __init__(self, config: GatewayConfig, *, processor: SpanProcessor | None = None) -> None:
        detected = OTELResourceDetector().detect().attributes  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
        attributes: dict[str, Value] = {
            SERVICE_NAME: str(detected.get(SERVICE_NAME) or config.tracing.service_name),
        }
        if SERVICE_VERSION not in detected:
            attributes[SERVICE_VERSION] = __version__
        processors = [processor] if processor is not None else processors_from_environment(os.environ)
        self.provider = TracerProvider(
            resource=Resource.create(attributes), shutdown_on_exit=processor is None
        )
        for each in processors:
            self.provider.add_span_processor(each)
        self._tracer = self.provider.get_tracer("gateway", __version__)
        self._off = isinstance(self._tracer, trace.NoOpTracer)
        """OTEL_SDK_DISABLED: no spans at all, calls get fresh parent ids as with tracing off."""
        self._shut_down = False

    @contextmanager
    def server_span(self, request: web.Request) -> Iterator[Span]:
        if self._off:
            with super().server_span(request) as nothing:
                yield nothing
            return
        parent = _PROPAGATOR.extract(request.headers)  # the client's trace and baggage, if valid
        method = request.method if request.method in _KNOWN_METHODS else "_OTHER"
        attributes: dict[str, Value] = {
            "http.request.method": method,
            "url.path": request.rel_url.raw_path,
            "url.scheme": request.scheme,
            "network.protocol.version": f"{request.version.major}.{request.version.minor}",
        }
        if method == "_OTHER":
            attributes["http.request.method_original"] = request.method[:64]
        if request.remote:
            attributes["client.address"] = request.remote
        agent = request.headers.get("User-Agent")
        if agent:
            attributes["user_agent.original"] = agent[:256]
        span = self._tracer.start_span(
            "HTTP" if method == "_OTHER" else method, context=parent, kind=SpanKind.SERVER,
            attributes=attributes, record_exception=False, set_status_on_exception=False,
        )
        with _ServerSpan(span, trace.set_span_in_context(span, parent), method) as wrapped:
            yield wrapped

    @contextmanager
    def batch_span(self, *, batch_id: str, kind: str, atomic: bool) -> Iterator[Span]:
        if self._off:
            with super().batch_span(batch_id=batch_id, kind=kind, atomic=atomic) as nothing:
                yield nothing
            return
        parent = otel_context.get_current()
        span = self._tracer.start_span(
            f"batch {kind}", context=parent, kind=SpanKind.INTERNAL,
            attributes={"gateway.batch_id": batch_id, "gateway.batch.atomic": atomic,
                        "gateway.kind": kind},
            record_exception=False, set_status_on_exception=False,
        )
        with _BatchSpan(span, trace.set_span_in_context(span, parent)) as wrapped:
            yield wrapped

    @contextmanager
    def client_span(self, call: UpstreamCall) -> Iterator[Span]:
        if self._off or call.purpose == "health_check":
            yield PASS_THROUGH
            return
        parent = otel_context.get_current()
        if not trace.get_current_span(parent).get_span_context().is_valid:
            # outside any request (start-up recovery): the trace of the call's own traceparent
            parent = _PROPAGATOR.extract(_lowercase(call.headers), context=parent)
        method = call.method if call.method in _KNOWN_METHODS else "_OTHER"
        url = call.url
        attributes: dict[str, Value] = {
            "http.request.method": method,
            "server.address": url.host or "",
            "url.scheme": url.scheme,
            "gateway.upstream": call.upstream,
            "gateway.purpose": call.purpose,
        }
        if url.port is not None:
            attributes["server.port"] = url.port
        if call.purpose not in _TOKEN_IN_PATH:
            attributes["url.path"] = url.raw_path
        if call.path_template is not None:  # e.g. /tx/{token}/rollback: the shape, not the token
            attributes["url.template"] = call.path_template
        if method == "_OTHER":
            attributes["http.request.method_original"] = call.method[:64]
        if call.item is not None:
            attributes["gateway.item"] = call.item
        span = self._tracer.start_span(
            f"{call.purpose} {'HTTP' if method == '_OTHER' else method}", context=parent,
            kind=SpanKind.CLIENT, attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        )
        with _OtelSpan(span, trace.set_span_in_context(span, parent)) as wrapped:
            yield wrapped

    def shutdown(self) -> None:
        """Export what is pending and stop (once; later calls do nothing)."""
        if not self._shut_down:
            self._shut_down = True
            self.provider.shutdown()


def processors_from_environment(environ: Mapping[str, str]) -> list[SpanProcessor]:
    """The span processors OTEL_TRACES_EXPORTER asks for (default `otlp`); ConfigError for an
    exporter or an OTLP protocol this install cannot do (checked before any is started)."""
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    chosen = [name for name in dict.fromkeys(names) if name and name != "none"]
    for name in chosen:
        if name not in ("otlp", "console"):
            raise ConfigError(
                _ENVIRONMENT, "OTEL_TRACES_EXPORTER",
                f"unknown span exporter {name!r} (use otlp, console or none)",
            )
    if "otlp" in chosen:
        _check_otlp_protocol(environ)
    return [
        BatchSpanProcessor(_otlp_exporter() if name == "otlp" else ConsoleSpanExporter())
        for name in chosen
    ]


def _check_otlp_protocol(environ: Mapping[str, str]) -> None:
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(variable, "").strip().lower()
        if protocol:
            if protocol != "http/protobuf":
                raise ConfigError(
                    _ENVIRONMENT, variable,
                    f"OTLP protocol {protocol!r} is not available; the otel extra exports "
                    "http/protobuf",
                )
            return


def _otlp_exporter() -> SpanExporter:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ConfigError(
            "<config>", "tracing.enabled",
            "the OTLP exporter is missing: pip install 'batch-gateway[otel]'",
        ) from exc
    return OTLPSpanExporter()  # endpoint, headers, timeout, TLS, compression: OTEL_EXPORTER_OTLP_*


def _lowercase(headers: Headers) -> dict[str, str]:
    """The propagation headers of a call, for extraction (the first of each name)."""
    found: dict[str, str] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in PROPAGATION_HEADERS:
            found.setdefault(lowered, value)
    return found
