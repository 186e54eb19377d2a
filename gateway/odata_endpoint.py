"""The OData `$batch` endpoint (`batch.odata.path`): 4.01 JSON or multipart (V4 / V2) by Content-Type,
run as a dependency graph; every refusal answers in the OData error shape, not problem+json.
"""

from __future__ import annotations

from aiohttp import web

from gateway.access_log import REJECTION
from gateway.batch_endpoints import BATCH_ID_HEADER, outer_request, read_body, write_answer
from gateway.config import GatewayConfig, ODataEndpoint
from gateway.dialect_endpoints import answer_headers, running_graph
from gateway.errors import ClientError, GatewayError, MethodRefused, UnsupportedMediaType
from gateway.formats._odata import ServiceRoot, continue_on_error, gateway_error_document
from gateway.formats.odata_json import ODataJsonBatch, ODataJsonCodec
from gateway.formats.odata_multipart import ODataMultipartBatch, ODataMultipartCodec, odata_version
from gateway.graph_model import GraphBatch, GraphResult
from gateway.headers import REQUEST_ID_HEADER
from gateway.model import BatchLimits
from gateway.planning import OuterRequest
from gateway.runtime import BATCH_ID, KIND, REQUEST_ID, gateway_of

KIND_NAME = "batch_odata"
BATCH_LEVEL_HEADERS = (
    "Accept", "Prefer", "OData-Version", "OData-MaxVersion", "DataServiceVersion", "MaxDataServiceVersion",
)
"""Headers of the outer request that are about the batch, not inherited by its requests."""
_V2_KEY = web.RequestKey("odata_v2", bool)


async def odata_batch(request: web.Request) -> web.StreamResponse:
    request[KIND] = KIND_NAME
    endpoint = _endpoint(request)
    try:
        return await _serve(request, endpoint)
    except GatewayError as exc:
        request[REJECTION] = exc  # on the access line, as the middleware does for problem+json
        return error_response(request, exc)


async def _serve(request: web.Request, endpoint: ODataEndpoint) -> web.StreamResponse:
    config = gateway_of(request).config
    media = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    limits = _limits(config, endpoint)
    root = ServiceRoot.of(endpoint.path, (*_origins(request), *endpoint.public_origins))
    keep_going = continue_on_error(request.headers.getall("Prefer", []))
    if media == "application/json":
        json_codec = ODataJsonCodec(limits)
        body = await read_body(request, limits.max_body_bytes, "/")
        json_batch = json_codec.decode(body, root, continue_on_error=keep_going)
        _check_groups(json_batch.graph, endpoint)
        async with running_graph(request, json_batch.graph, KIND_NAME, _outer(request)) as result:
            return await _json_answer(request, json_batch, result, json_codec)
    if media == "multipart/mixed":
        version = _version(request)
        request[_V2_KEY] = version == 2
        codec = ODataMultipartCodec(limits)
        body = await read_body(request, limits.max_body_bytes, "body")
        batch = codec.decode(
            body, request.headers["Content-Type"], root, version=version, continue_on_error=keep_going
        )
        _check_groups(batch.graph, endpoint)
        async with running_graph(request, batch.graph, KIND_NAME, _outer(request)) as result:
            return await _multipart_answer(request, batch, result, codec)
    got = repr(media) if media else "no Content-Type"
    raise UnsupportedMediaType(
        f"an OData $batch is application/json (OData 4.01 JSON batch) or multipart/mixed, got {got}",
        where="Content-Type",
    )


def _endpoint(request: web.Request) -> ODataEndpoint:
    endpoint = gateway_of(request).config.batch.odata
    if endpoint is None:  # a reload removed it while this request was routed: not served any more
        raise web.HTTPNotFound()
    return endpoint


def _limits(config: GatewayConfig, endpoint: ODataEndpoint) -> BatchLimits:
    limits = config.batch.limits.batch_limits()
    return BatchLimits(
        max_body_bytes=limits.max_body_bytes,
        max_items=min(limits.max_items, endpoint.max_items),
        max_depth=limits.max_depth,
        max_part_headers=limits.max_part_headers,
        max_part_header_bytes=limits.max_part_header_bytes,
    )


def _origins(request: web.Request) -> list[str]:
    """Absolute request URLs are accepted on the origin the client used to reach the gateway (and
    on `batch.odata.public_origins`)."""
    return [f"{request.scheme}://{request.host}"]


def _version(request: web.Request) -> int:
    headers = request.headers
    return odata_version(
        headers.get("OData-Version"), headers.get("OData-MaxVersion"),
        headers.get("DataServiceVersion"), headers.get("MaxDataServiceVersion"),
    )


def _check_groups(graph: GraphBatch, endpoint: ODataEndpoint) -> None:
    if not endpoint.atomic and any(item.group is not None for item in graph.items):
        raise ClientError(
            "change sets and atomicity groups are switched off at this endpoint (batch.odata.atomic: "
            "false); send the requests outside a change set",
            where=next(item.request.where for item in graph.items if item.group is not None),
        )


def _outer(request: web.Request) -> OuterRequest:
    outer = outer_request(request)
    for name in BATCH_LEVEL_HEADERS:
        outer.headers.popall(name, None)
    return outer


async def _json_answer(
    request: web.Request, batch: ODataJsonBatch, result: GraphResult, codec: ODataJsonCodec
) -> web.StreamResponse:
    headers = answer_headers(request, "application/json", result)
    headers["OData-Version"] = "4.01"
    if "Prefer" in request.headers and continue_on_error(request.headers.getall("Prefer")) is not None:
        headers["Preference-Applied"] = f"continue-on-error={'true' if batch.continue_on_error else 'false'}"
    return await write_answer(request, codec.encode_chunks(batch, result), "application/json", headers)


async def _multipart_answer(
    request: web.Request, batch: ODataMultipartBatch, result: GraphResult, codec: ODataMultipartCodec
) -> web.StreamResponse:
    """Written as it is framed (the upstream bodies are never copied into one answer)."""
    chunks, content_type = codec.encode_chunks(batch, result)
    headers = answer_headers(request, content_type, result)
    if batch.version == 2:
        headers["DataServiceVersion"] = "2.0"
        return await write_answer(request, chunks, content_type, headers, status=202)
    headers["OData-Version"] = "4.0"
    if batch.continue_on_error:
        headers["Preference-Applied"] = "continue-on-error"
    return await write_answer(request, chunks, content_type, headers)


def error_response(request: web.Request, error: GatewayError) -> web.Response:
    """A refused batch: the error's status, `{"error": {"code", "message", "target"}}`."""
    v2 = request.get(_V2_KEY, False)
    response = web.Response(
        status=error.status,
        body=gateway_error_document(error, v2=v2),
        content_type="application/json",
    )
    response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
    response.headers["DataServiceVersion" if v2 else "OData-Version"] = "2.0" if v2 else "4.0"
    if isinstance(error, MethodRefused):
        response.headers["Allow"] = ", ".join(error.allow)
    if BATCH_ID in request:
        response.headers[BATCH_ID_HEADER] = request[BATCH_ID]
    return response


async def _method_not_allowed(request: web.Request) -> web.Response:
    request[KIND] = KIND_NAME
    error = MethodRefused(f"the OData batch endpoint {request.path} takes POST only", allow=("POST",))
    request[REJECTION] = error
    return error_response(request, error)


def add_odata_routes(app: web.Application, config: GatewayConfig) -> None:
    """Register `batch.odata.path` (nothing when the key is absent)."""
    if config.batch.odata is None:
        return
    app.router.add_post(config.batch.odata.path, odata_batch)
    app.router.add_route("*", config.batch.odata.path, _method_not_allowed)
