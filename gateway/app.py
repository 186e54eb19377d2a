"""aiohttp wiring: middleware (request id, problem+json, access log, metrics) and the route table.

`create_app(config)` is the one entry point; the CLI and the tests both use it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web

from gateway.access_log import FAILURE, REJECTION, install, log_access
from gateway.atomicity.recovery import Recovery
from gateway.batch_endpoints import add_batch_routes
from gateway.batch_lookup import batch_lookup, batch_lookup_by_request
from gateway.batch_service import BatchService
from gateway.config import GatewayConfig
from gateway.dialect_endpoints import COMPOSITE_KIND, GRAPH_KIND, add_dialect_routes
from gateway.errors import (
    BadHttp,
    ClientError,
    GatewayError,
    MethodRefused,
    UnsupportedVersion,
    UpstreamError,
)
from gateway.headers import TrustedProxies, new_request_id
from gateway.health import UpstreamHealth, health_of, readiness
from gateway.metrics import (
    GatewayMetrics,
    count_recovered,
    method_label,
    recovered_by_supervisor,
    status_class,
)
from gateway.odata_endpoint import KIND_NAME as ODATA_KIND
from gateway.odata_endpoint import add_odata_routes
from gateway.openapi import build_document
from gateway.problem import PROBLEM_JSON, problem_body
from gateway.proxy import proxy_handler
from gateway.routing import RouteTable
from gateway.runtime import (
    BATCH_ID,
    GATEWAY,
    GATEWAY_REF,
    KIND,
    PINNED,
    REQUEST_ID,
    UPSTREAM,
    Gateway,
    GatewayRef,
    Served,
    gateway_of,
    route_label,
    served,
)
from gateway.takeover import start_takeover
from gateway.tracing import Span, Tracing, tracing_for
from gateway.upstream import UpstreamPool

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
log = structlog.get_logger("gateway.access")


def problem_response(error: GatewayError, request: web.Request) -> web.Response:
    body = problem_body(error, request_id=request[REQUEST_ID], instance=request.path)
    response = web.Response(status=error.status, body=body, content_type=PROBLEM_JSON)
    response.headers["X-Request-ID"] = request[REQUEST_ID]
    if isinstance(error, MethodRefused):  # RFC 9110 section 15.5.6: a 405 says what is allowed
        response.headers["Allow"] = ", ".join(error.allow)
    if BATCH_ID in request:  # the batch ran (or runs): its id lets the client look it up
        response.headers["X-Batch-Id"] = request[BATCH_ID]
    return response


def _http_exception_error(exc: web.HTTPException) -> GatewayError:
    error = ClientError(exc.text or exc.reason)
    error.status, error.title = exc.status, exc.reason
    return error


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, one access-log line, metrics, and every error as problem+json."""
    incoming = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = incoming if _REQUEST_ID_RE.match(incoming) else new_request_id()
    structlog.contextvars.bind_contextvars(request_id=request[REQUEST_ID])
    started = time.perf_counter()
    response: web.StreamResponse
    pinned = request[PINNED] = request.app[GATEWAY_REF].current  # a reload never changes it now
    pinned.active += 1
    in_flight = pinned.metrics.child(pinned.metrics.requests_in_flight, _kind_of(request))
    in_flight.inc()
    tracing = pinned.pool.tracing
    try:
        if tracing.enabled:
            with tracing.server_span(request) as span:
                response = await _answer(request, handler)
                span.set_http_status(response.status)
                _describe(span, request)
        else:
            response = await _answer(request, handler)
    finally:
        in_flight.dec()
        pinned.active -= 1
        structlog.contextvars.unbind_contextvars("request_id", "batch_id")
    if not response.prepared:
        response.headers.setdefault("X-Request-ID", request[REQUEST_ID])
    done = served(request)  # computed once for the metrics and the access line
    _count(request, response, started, done)
    log_access(request, response, started, done)
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.version not in (HttpVersion10, HttpVersion11):  # HTTP/0.9 ("GET /"), "HTTP/2.0"
        response = problem_response(_unsupported(request.version), request)
        response.force_close()
        return response
    return await _handle(request, handler)


def _kind_of(request: web.Request) -> str:
    """The kind before the handler says (in-flight gauge): batch endpoints are known by path."""
    config = request.app[GATEWAY_REF].current.config
    if request.path == config.batch.json_endpoint.path:
        return "batch_json"
    if request.path == config.batch.multipart_endpoint.path:
        return "batch_multipart"
    batch = config.batch
    dialects = ((batch.graph, GRAPH_KIND), (batch.composite, COMPOSITE_KIND), (batch.odata, ODATA_KIND))
    for endpoint, kind in dialects:
        if endpoint is not None and request.path == endpoint.path:
            return kind
    return "gateway" if request.path.startswith(config.gateway.prefix + "/") else "proxy"


def _describe(span: Span, request: web.Request) -> None:
    span.set_attribute("gateway.kind", request.get(KIND, "proxy"))
    route = route_label(request)
    if route:
        span.set_attribute("http.route", route)
    if UPSTREAM in request:
        span.set_attribute("gateway.upstream", request[UPSTREAM])
    if BATCH_ID in request:
        span.set_attribute("gateway.batch_id", request[BATCH_ID])
    rejection = request.get(REJECTION)
    if rejection is not None:
        span.record_failure(type(rejection).__name__, rejection.detail)


def _unsupported(version: HttpVersion) -> GatewayError:
    """HTTP/0.9 is malformed for an HTTP/1.x server (400); a newer version is 505."""
    text = f"HTTP/{version.major}.{version.minor} requests are not served; use HTTP/1.0 or HTTP/1.1"
    return BadHttp(text) if version < HttpVersion10 else UnsupportedVersion(text)


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        request[REJECTION] = exc  # on the access line: one line per request
        return problem_response(exc, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        request[REJECTION] = _http_exception_error(exc)
        return problem_response(request[REJECTION], request)
    except Exception as exc:
        request[FAILURE] = exc  # traceback on the access line: one line per request
        request[REJECTION] = GatewayError("the gateway failed to handle the request")
        return problem_response(request[REJECTION], request)


def _count(
    request: web.Request, response: web.StreamResponse, started: float, done: Served
) -> None:
    """The request's counter and duration; `origin` says whether the upstream or the gateway
    chose the status (a proxied answer relayed, or the gateway's own)."""
    metrics = gateway_of(request).metrics
    kind, route, upstream = done.kind, done.route, done.upstream or ""
    method = method_label(request.method)
    cls = status_class(response.status)
    metrics.child(metrics.requests, kind, route, upstream, method, cls, done.origin).inc()
    metrics.child(metrics.request_duration, kind, route, upstream, method, cls).observe(
        time.perf_counter() - started
    )
    rejection = request.get(REJECTION)
    if rejection is not None and rejection.limit is not None and not isinstance(rejection, UpstreamError):
        metrics.limits_hit.labels(rejection.limit).inc()  # an upstream call's limit: counted by the pool


async def healthz(request: web.Request) -> web.Response:
    request[KIND] = "gateway"
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    request[KIND] = "gateway"
    report = await readiness(gateway_of(request))  # the policy is in gateway/health.py
    return web.json_response(report, status=200 if report["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    request[KIND] = "gateway"
    gateway = gateway_of(request)
    response = web.Response(body=gateway.metrics.render())
    response.headers["Content-Type"] = gateway.metrics.content_type
    return response


async def openapi(request: web.Request) -> web.Response:
    """The document generated from this generation's config (gateway/openapi.py), built once."""
    request[KIND] = "gateway"
    gateway = gateway_of(request)
    if "openapi" not in gateway.extras:
        gateway.extras["openapi"] = json.dumps(build_document(gateway.config)).encode()
    return web.Response(body=gateway.extras["openapi"], content_type="application/json")


async def _only_get(request: web.Request) -> web.Response:
    request[KIND] = "gateway"
    raise MethodRefused(f"{request.path} takes GET and HEAD only", allow=("GET", "HEAD"))


def build_gateway(config: GatewayConfig, tracing: Tracing | None = None) -> Gateway:
    metrics_ = GatewayMetrics()
    health = UpstreamHealth(config, metrics_)
    pool = UpstreamPool(
        config,
        max_response_bytes=config.batch.limits.max_response_bytes,
        on_outcome=health.record,
        metrics=metrics_,
        tracing=tracing or tracing_for(config),
    )
    pool.publish_limits()
    routes = RouteTable(config)
    batches = BatchService(config, routes, pool, metrics_)
    return Gateway(
        config=config, routes=routes, pool=pool, metrics=metrics_, batches=batches,
        trusted_proxies=TrustedProxies(config.trusted_proxies), extras={"health": health},
    )


async def _prune_periodically(gateway: Gateway, every: float = 3600.0) -> None:
    """Delete finished batches older than the retention: at start-up, then every hour."""
    while True:
        pruned = await gateway.batches.journal.prune(gateway.config.journal.retention_hours * 3600)
        if pruned:
            log.info("journal_pruned", batches=pruned)
        await asyncio.sleep(every)


def reserved_route_warnings(config: GatewayConfig) -> list[str]:
    """A route covering a gateway path is allowed (e.g. `/`), but never silently shadowed: one text
    per such route, logged at start-up and printed by `gateway check-config`."""
    reserved = (
        config.gateway.prefix,
        config.batch.json_endpoint.path,
        config.batch.multipart_endpoint.path,
    )
    texts = []
    for route in config.routes:
        covered = [p for p in reserved if route.prefix == "/" or p.startswith(route.prefix + "/")]
        if covered:
            texts.append(
                f"route {route.prefix!r} (upstream {route.upstream}) is partly shadowed: "
                f"{', '.join(covered)} answered by the gateway"
            )
    return texts


def _warn_reserved(config: GatewayConfig) -> None:
    for text in reserved_route_warnings(config):
        log.warning("route_partly_shadowed", detail=text)


def create_app(
    config: GatewayConfig, *, recover: bool = True, tracing: Tracing | None = None
) -> web.Application:
    """The whole gateway as an aiohttp application (upstream sessions open on start-up).

    `recover=False` is for worker processes: their supervisor recovered before starting them.
    `tracing` replaces the configured one (tests capture spans with it).
    """
    gateway = build_gateway(config, tracing)
    gateway.extras["recover_on_start"] = recover
    # auto_decompress off: a proxied body reaches the upstream byte for byte as the client sent it
    # (aiohttp would inflate a gzip body and forward it still labelled gzip); the batch endpoints
    # decode an encoded body themselves, with a cap.
    app = web.Application(middlewares=[request_context], handler_args={"auto_decompress": False})
    app[GATEWAY] = gateway
    app[GATEWAY_REF] = GatewayRef(gateway)
    prefix = config.gateway.prefix
    for path, handler in (
        ("healthz", healthz), ("readyz", readyz), ("metrics", metrics), ("openapi.json", openapi),
        ("batches/{batch_id}", batch_lookup), ("batches", batch_lookup_by_request),
    ):
        app.router.add_get(f"{prefix}/{path}", handler)
        app.router.add_route("*", f"{prefix}/{path}", _only_get)
    add_batch_routes(app, config)
    add_dialect_routes(app, config)
    add_odata_routes(app, config)
    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    _warn_reserved(config)
    install(app)  # counts the bytes of streamed answers for the access line
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open pools and journal, roll back what a crash left, prune; on stop drain and close."""
    gateway = app[GATEWAY]
    gateway.extras["recovered"] = False
    await gateway.pool.start()
    await gateway.batches.journal.open()
    try:
        health_of(gateway).start(gateway.pool, gateway.routes)  # active checks, where configured
        if gateway.extras["recover_on_start"]:
            report = await Recovery(
                gateway.config, gateway.routes, gateway.pool, gateway.batches.journal
            ).run()
            if report.outcomes:
                log.warning("recovery_done", batches={k: v.value for k, v in report.outcomes.items()})
            count_recovered(gateway.metrics, [v.value for v in report.outcomes.values()])
            for batch_id, reason in report.needs_operator.items():
                log.error("batch_needs_operator", batch_id=batch_id, reason=reason,
                          hint=f"gateway batches show {batch_id}")
        else:  # a worker: its supervisor recovered (what it found is handed over in the environment)
            count_recovered(gateway.metrics, recovered_by_supervisor())
        gateway.extras["recovered"] = True
        pruner = asyncio.create_task(_prune_periodically(gateway))
        refresher = asyncio.create_task(_refresh_process_metrics(gateway))
        taker = start_takeover(app[GATEWAY_REF])  # a shared journal: dead replicas' batches
        yield
        pruner.cancel()
        refresher.cancel()
        if taker is not None:
            taker.cancel()
    finally:
        gateway = app[GATEWAY_REF].current  # after reloads: the newest generation
        deadline = gateway.batches.shutdown.deadline  # set by serve(): one deadline for it all
        left = gateway.config.shutdown_grace if deadline is None else deadline - time.monotonic()
        await gateway.batches.drain(left)
        for retiring in list(gateway.extras.get("retiring", ())):
            retiring.cancel()
        await health_of(gateway).stop()
        for pool in gateway.extras.get("pools", [gateway.pool]):  # after reloads: every generation's
            await pool.close()
        await gateway.batches.journal.close()
        gateway.pool.tracing.shutdown()
        gateway.metrics.flush()  # with workers: this worker's last updates into the shared files


async def _refresh_process_metrics(gateway: Gateway, every: float = 1.0, process_every: int = 5) -> None:
    """With workers, each one writes its gathered updates every second and its process and GC
    figures every five, for the merged scrape (one process writes its own at each scrape)."""
    ticks = 0
    while gateway.metrics.multiprocess:
        gateway.metrics.flush()
        if ticks % process_every == 0:
            gateway.metrics.refresh_process()
        ticks += 1
        await asyncio.sleep(every)
