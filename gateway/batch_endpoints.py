"""The two batch endpoints: read the body within limits, decode, run, encode in the client's format.

Control headers (`X-Batch-Atomic`, `X-Batch-Execution`) are read here and never forwarded upstream.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway.atomicity.untrusted import DecodedTooLarge, UnknownCoding, UntrustedValue, decoded_body
from gateway.batch_service import new_batch_id
from gateway.budget import ByteBudget
from gateway.config import BatchEndpoint, CompositeEndpoint, GatewayConfig, GraphEndpoint
from gateway.errors import (
    ClientError,
    MethodRefused,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway.formats.json_batch import JsonBatchCodec
from gateway.formats.multipart_batch import MultipartBatchCodec
from gateway.headers import REQUEST_ID_HEADER
from gateway.model import BatchReport, ExecutionMode, Item
from gateway.planning import OuterRequest
from gateway.runtime import BATCH_ID, KIND, REQUEST_ID, gateway_of
from gateway.tracing import record_rollback

log = structlog.get_logger("gateway.batch")
ATOMIC_HEADER = "X-Batch-Atomic"
EXECUTION_HEADER = "X-Batch-Execution"
CONTROL_HEADERS = (ATOMIC_HEADER, EXECUTION_HEADER)
ATOMIC_TRUE = ("true", "1", "yes")
ATOMIC_FALSE = ("false", "0", "no")
"""The values `X-Batch-Atomic` takes (any case, surrounding whitespace ignored)."""
BATCH_ID_HEADER = "X-Batch-Id"
OUTCOME_HEADER = "X-Batch-Outcome"
GROUPS_HEADER = "X-Batch-Groups"
"""A batch dialect's answer with several atomic groups: `name=batch id` of each, comma-separated."""
"""Answer headers: the batch's id (also on its problem answers), an atomic batch's outcome."""


async def read_body(request: web.Request, limit: int, where: str) -> bytes:
    """The whole request body, refusing more than `limit` bytes before reading them all, and a
    body that does not arrive within `proxy.body_timeout` (408).

    `where` names the whole body the way the format's codec does (JSON pointer `/`, `body`).
    """
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"batch body is {request.content_length} bytes; the maximum is {limit} bytes",
            where=where, limit="limits.max_body_bytes",
        )
    body = bytearray()
    seconds = gateway_of(request).config.proxy.body_timeout
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.content.iter_chunked(64 * 1024):
                body.extend(chunk)
                if len(body) > limit:
                    raise PayloadTooLarge(
                        f"batch body exceeds the maximum of {limit} bytes", where=where,
                        limit="limits.max_body_bytes",
                    )
    except TimeoutError:
        raise RequestTimeout(
            f"the batch body did not arrive within {seconds} s (proxy.body_timeout)", where=where,
            limit="proxy.body_timeout",
        ) from None
    return decoded(request, bytes(body), limit, where)


def decoded(request: web.Request, body: bytes, limit: int, where: str) -> bytes:
    """A batch body with its Content-Encoding undone: gzip or deflate, decoded size capped at
    `limit` (413 above: a zip bomb); any other coding is 415."""
    try:
        return decoded_body(list(request.headers.items()), body, limit)
    except UnknownCoding as exc:
        raise UnsupportedMediaType(f"{exc} on batch bodies", where="Content-Encoding") from None
    except DecodedTooLarge:
        raise PayloadTooLarge(
            f"the decoded batch body is over {limit} bytes", where=where, limit="limits.max_body_bytes"
        ) from None
    except UntrustedValue as exc:
        raise ClientError(f"the batch body cannot be decoded: {exc}", where="Content-Encoding") from None


def outer_request(request: web.Request) -> OuterRequest:
    headers = CIMultiDict(request.headers)
    for name in CONTROL_HEADERS:
        headers.popall(name, None)
    return OuterRequest(
        headers=headers,
        raw_query=request.rel_url.raw_query_string,
        client_ip=request.remote,
        proto=request.scheme,
        host=request.host,
        request_id=request[REQUEST_ID],
        trusted_peer=gateway_of(request).trusted_proxies.trusts(request.remote),
    )


def wants_atomic(request: web.Request, endpoint: BatchEndpoint | GraphEndpoint | CompositeEndpoint) -> bool:
    """`X-Batch-Atomic`, else the endpoint's `atomic` default; any other value is a 400."""
    value = request.headers.get(ATOMIC_HEADER)
    if value is None:
        return endpoint.atomic
    if value.strip().lower() in ATOMIC_TRUE:
        return True
    if value.strip().lower() in ATOMIC_FALSE:
        return False
    raise ClientError(f"{ATOMIC_HEADER} must be true or false, got {value[:50]!r}", where=ATOMIC_HEADER)


def execution_mode(request: web.Request, endpoint: BatchEndpoint) -> ExecutionMode:
    value = request.headers.get(EXECUTION_HEADER, endpoint.execution)
    try:
        return ExecutionMode(value.strip())
    except ValueError:
        raise ClientError(
            f"{EXECUTION_HEADER} must be Serial or Unordered, got {value[:50]!r}",
            where=EXECUTION_HEADER,
        ) from None


async def run_batch(
    request: web.Request, item: Item, endpoint: BatchEndpoint, budget: ByteBudget
) -> BatchReport:
    service = gateway_of(request).batches
    batch_id = new_batch_id()
    request[BATCH_ID] = batch_id
    structlog.contextvars.bind_contextvars(batch_id=batch_id)
    atomic = wants_atomic(request, endpoint)
    outer = outer_request(request)
    gateway = gateway_of(request)
    kind = request.get(KIND, "batch")
    with gateway.pool.tracing.batch_span(batch_id=batch_id, kind=kind, atomic=atomic) as span:
        if atomic:
            report = await service.run_atomic(item, outer, batch_id=batch_id, budget=budget, kind=kind)
        else:
            report = await service.run(item, outer, batch_id=batch_id, budget=budget, kind=kind)
        if report.atomic_outcome is not None:
            span.set_attribute("gateway.batch.outcome", report.atomic_outcome.value)
            record_rollback(span, item, report)
        return report


async def write_answer(
    request: web.Request, chunks: Iterator[bytes], content_type: str, headers: dict[str, str],
    status: int = 200,
) -> web.StreamResponse:
    """A small answer goes out with Content-Length; a bigger one chunked, as it is encoded."""
    headers = {**headers, "Content-Type": content_type, REQUEST_ID_HEADER: request[REQUEST_ID]}
    first = next(chunks, b"")
    second = next(chunks, None)
    if second is None:
        return web.Response(status=status, body=first, headers=headers)
    response = web.StreamResponse(status=status, headers=headers)
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for chunk in itertools.chain((first, second), chunks):
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError:  # the client went away while its answer was being written
        log.info("client_went_away", during="batch answer")
    return response


def report_headers(report: BatchReport) -> dict[str, str]:
    headers = {BATCH_ID_HEADER: report.batch_id}
    if report.atomic_outcome is not None:
        headers[OUTCOME_HEADER] = report.atomic_outcome.value
    return headers


async def json_batch(request: web.Request) -> web.StreamResponse:
    request[KIND] = "batch_json"
    config = gateway_of(request).config
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        got = repr(ctype) if ctype else "no Content-Type"
        raise UnsupportedMediaType(
            f"the JSON batch endpoint takes application/json (required: a cross-site form post "
            f"cannot send it without a CORS preflight), got {got}",
            where="Content-Type",
        )
    codec = JsonBatchCodec(config.batch.limits.batch_limits())
    item = codec.decode(await read_body(request, config.batch.limits.max_body_bytes, "/"))
    budget = gateway_of(request).batches.new_budget()
    try:
        report = await run_batch(request, item, config.batch.json_endpoint, budget)
        return await write_answer(
            request, codec.encode_chunks(report), "application/json", report_headers(report)
        )
    finally:
        budget.release()


async def multipart_batch(request: web.Request) -> web.StreamResponse:
    request[KIND] = "batch_multipart"
    config = gateway_of(request).config
    endpoint = config.batch.multipart_endpoint
    codec = MultipartBatchCodec(config.batch.limits.batch_limits())
    body = await read_body(request, config.batch.limits.max_body_bytes, "body")
    batch = codec.decode(
        body, request.headers.get("Content-Type", ""), execution_mode(request, endpoint)
    )
    budget = gateway_of(request).batches.new_budget()
    try:
        report = await run_batch(request, batch, endpoint, budget)
        content_ids = [getattr(part, "content_id", None) for part in batch.items]
        chunks, content_type = codec.encode_chunks(report, content_ids=content_ids)
        return await write_answer(request, chunks, content_type, report_headers(report))
    finally:
        budget.release()


def add_batch_routes(app: web.Application, config: GatewayConfig) -> None:
    app.router.add_post(config.batch.json_endpoint.path, json_batch)
    app.router.add_post(config.batch.multipart_endpoint.path, multipart_batch)
    for path in (config.batch.json_endpoint.path, config.batch.multipart_endpoint.path):
        app.router.add_route("*", path, _method_not_allowed)


async def _method_not_allowed(request: web.Request) -> web.Response:
    request[KIND] = "batch"
    raise MethodRefused(f"the batch endpoint {request.path} takes POST only", allow=("POST",))
