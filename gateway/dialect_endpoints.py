"""The Microsoft Graph (`batch.graph`) and Salesforce Composite (`batch.composite`) batch endpoints:
read the body within limits, decode, run as a dependency graph, answer in the dialect's shapes.

Every refusal the endpoint makes (bad input, limits, planning, journal) answers in the dialect's own
error shape with the gateway's status; only an unexpected failure (500) stays problem+json.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import quote

import structlog
from aiohttp import web

from gateway.access_log import REJECTION
from gateway.batch_endpoints import (
    BATCH_ID_HEADER,
    GROUPS_HEADER,
    OUTCOME_HEADER,
    outer_request,
    read_body,
    wants_atomic,
    write_answer,
)
from gateway.batch_service import new_batch_id
from gateway.config import CompositeEndpoint, GatewayConfig, GraphEndpoint
from gateway.errors import GatewayError, MethodRefused, UnsupportedMediaType
from gateway.formats import composite_batch, graph_batch
from gateway.formats.composite_batch import CompositeBatchCodec, api_prefix
from gateway.formats.graph_batch import GraphBatchCodec, GraphSite
from gateway.graph_model import GraphBatch, GraphResult, worst_outcome
from gateway.headers import REQUEST_ID_HEADER
from gateway.model import BatchLimits
from gateway.planning import OuterRequest
from gateway.problem import problem_type
from gateway.runtime import BATCH_ID, KIND, REQUEST_ID, gateway_of

GRAPH_KIND = "batch_graph"
COMPOSITE_KIND = "batch_composite"
JSON = "application/json"
Endpoint = GraphEndpoint | CompositeEndpoint


# --- Microsoft Graph ---------------------------------------------------------------------------


async def graph_batch_endpoint(request: web.Request) -> web.StreamResponse:
    request[KIND] = GRAPH_KIND
    try:
        endpoint = gateway_of(request).config.batch.graph
        if endpoint is None:  # a reload removed it while this request was routed
            raise web.HTTPNotFound()
        return await _serve_graph(request, endpoint)
    except GatewayError as exc:
        request[REJECTION] = exc  # on the access line, as the middleware does for problem+json
        return graph_error(request, exc)


async def _serve_graph(request: web.Request, endpoint: GraphEndpoint) -> web.StreamResponse:
    config = gateway_of(request).config
    _json_only(request, "Graph")
    atomic = wants_atomic(request, endpoint)
    limits = _limits(config, endpoint)
    site = GraphSite.of(endpoint.path, [f"{request.scheme}://{request.host}", *endpoint.public_origins])
    codec = GraphBatchCodec(limits)
    batch = codec.decode(await read_body(request, limits.max_body_bytes, "/"), site, atomic=atomic)
    async with running_graph(request, batch, GRAPH_KIND) as result:
        return await _answer(request, codec.encode_chunks(batch, result), result)


def graph_error(request: web.Request, error: GatewayError) -> web.Response:
    """`{"error": {"code", "message", "innerError": {...}}}`: `code` is the problem type's name
    (README "Problem types"), `innerError` carries its URI, where, the request id and the date."""
    inner = {"type": problem_type(error.type_suffix), "request-id": request[REQUEST_ID],
             "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if error.where is not None:
        inner["where"] = error.where
    body = graph_batch.error_document(error.type_suffix, error.detail, inner)
    return _error_response(request, error, body)


# --- Salesforce Composite ----------------------------------------------------------------------


async def composite_batch_endpoint(request: web.Request) -> web.StreamResponse:
    request[KIND] = COMPOSITE_KIND
    try:
        endpoint = gateway_of(request).config.batch.composite
        if endpoint is None:
            raise web.HTTPNotFound()
        return await _serve_composite(request, endpoint)
    except GatewayError as exc:
        request[REJECTION] = exc
        return composite_error(request, exc)


async def _serve_composite(request: web.Request, endpoint: CompositeEndpoint) -> web.StreamResponse:
    config = gateway_of(request).config
    _json_only(request, "composite")
    atomic = wants_atomic(request, endpoint)
    limits = _limits(config, endpoint)
    codec = CompositeBatchCodec(limits, prefix=api_prefix(endpoint.path))
    batch = codec.decode(await read_body(request, limits.max_body_bytes, "/"), atomic=atomic)
    async with running_graph(request, batch.graph, COMPOSITE_KIND) as result:
        return await _answer(request, codec.encode_chunks(batch, result), result)


def composite_error(request: web.Request, error: GatewayError) -> web.Response:
    """`[{"message", "errorCode", "fields"}]`: `errorCode` is the problem type's name in upper
    snake case (`MALFORMED_BATCH`), `fields` the JSON pointer (or header) at fault."""
    code = error.type_suffix.upper().replace("-", "_")
    return _error_response(request, error, composite_batch.error_document(code, error.detail, error.where))


# --- shared ------------------------------------------------------------------------------------


def _json_only(request: web.Request, dialect: str) -> None:
    media = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if media != JSON and not media.endswith("+json"):
        got = repr(media) if media else "no Content-Type"
        raise UnsupportedMediaType(
            f"a {dialect} batch is application/json (required: a cross-site form post cannot send "
            f"it without a CORS preflight), got {got}",
            where="Content-Type",
        )


def _limits(config: GatewayConfig, endpoint: Endpoint) -> BatchLimits:
    limits = config.batch.limits.batch_limits()
    return BatchLimits(
        max_body_bytes=limits.max_body_bytes,
        max_items=min(limits.max_items, endpoint.max_items),
        max_depth=limits.max_depth,
        max_part_headers=limits.max_part_headers,
        max_part_header_bytes=limits.max_part_header_bytes,
    )


@asynccontextmanager
async def running_graph(
    request: web.Request, graph: GraphBatch, kind: str, outer: OuterRequest | None = None
) -> AsyncIterator[GraphResult]:
    """Run the graph (for every dialect's endpoint); its result (and the bytes it holds) counts
    against the batch budget until the answer is built. `outer`: what the calls inherit (default:
    the whole HTTP request, as on the source formats' endpoints)."""
    gateway = gateway_of(request)
    service = gateway.batches
    batch_id = new_batch_id()
    request[BATCH_ID] = batch_id
    structlog.contextvars.bind_contextvars(batch_id=batch_id)
    atomic = any(item.group is not None for item in graph.items)
    budget = service.new_budget()
    try:
        with gateway.pool.tracing.batch_span(batch_id=batch_id, kind=kind, atomic=atomic) as span:
            result = await service.run_graph(
                graph, outer or outer_request(request), batch_id=batch_id, budget=budget, kind=kind
            )
            worst = worst_outcome(result)
            if worst is not None:
                span.set_attribute("gateway.batch.outcome", worst.value)
        yield result
    finally:
        budget.release()


def answer_headers(request: web.Request, content_type: str, result: GraphResult) -> dict[str, str]:
    """Content-Type, request and batch ids and, when the batch had atomic groups, the worst outcome
    (and, with several groups, each group's own batch id: the one a lookup takes)."""
    headers = {
        "Content-Type": content_type,
        REQUEST_ID_HEADER: request[REQUEST_ID],
        BATCH_ID_HEADER: request[BATCH_ID],
    }
    worst = worst_outcome(result)
    if worst is not None:
        headers[OUTCOME_HEADER] = worst.value
    if len(result.group_batches) > 1:  # each group is journaled, and looked up, under its own id
        headers[GROUPS_HEADER] = ", ".join(
            f"{quote(name, safe='')}={batch_id}" for name, batch_id in result.group_batches
        )
    return headers


async def _answer(request: web.Request, chunks: Iterator[bytes], result: GraphResult) -> web.StreamResponse:
    """Written as it is encoded (chunked when over one chunk), while the batch's budget still holds."""
    return await write_answer(request, chunks, JSON, answer_headers(request, JSON, result))


def _error_response(request: web.Request, error: GatewayError, body: bytes) -> web.Response:
    response = web.Response(status=error.status, body=body, content_type=JSON)
    response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
    if isinstance(error, MethodRefused):
        response.headers["Allow"] = ", ".join(error.allow)
    if BATCH_ID in request:  # the batch had started: its id lets the client look it up
        response.headers[BATCH_ID_HEADER] = request[BATCH_ID]
    return response


def _refusing(
    kind: str, render: Callable[[web.Request, GatewayError], web.Response]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def method_not_allowed(request: web.Request) -> web.Response:
        request[KIND] = kind
        error = MethodRefused(f"the batch endpoint {request.path} takes POST only", allow=("POST",))
        request[REJECTION] = error
        return render(request, error)

    return method_not_allowed


def add_dialect_routes(app: web.Application, config: GatewayConfig) -> None:
    """Register `batch.graph.path` and `batch.composite.path` (nothing for an absent key)."""
    if config.batch.graph is not None:
        app.router.add_post(config.batch.graph.path, graph_batch_endpoint)
        app.router.add_route("*", config.batch.graph.path, _refusing(GRAPH_KIND, graph_error))
    if config.batch.composite is not None:
        app.router.add_post(config.batch.composite.path, composite_batch_endpoint)
        app.router.add_route("*", config.batch.composite.path, _refusing(COMPOSITE_KIND, composite_error))
