"""The OpenAPI 3.1 document of the gateway's own endpoints, generated from the running config.

Owns the paths, operations, responses, headers and the problem-type catalogue (from errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gateway
from gateway.atomicity.state import BatchState
from gateway.batch_endpoints import (
    ATOMIC_FALSE,
    ATOMIC_HEADER,
    ATOMIC_TRUE,
    BATCH_ID_HEADER,
    EXECUTION_HEADER,
    OUTCOME_HEADER,
)
from gateway.batch_lookup import EXECUTED, FAILED, ROLLBACK_FAILED, ROLLED_BACK, UNKNOWN, BatchNotFound
from gateway.config import GatewayConfig
from gateway.errors import (
    BadHttp,
    BatchLost,
    ClientError,
    ForbiddenTarget,
    GatewayError,
    HeadersTooLarge,
    JournalUnavailable,
    MalformedBatch,
    MethodRefused,
    MixedCredentials,
    PayloadTooLarge,
    RequestTimeout,
    RouteNotFound,
    ShuttingDown,
    Uncompensable,
    UnsupportedMediaType,
    UpstreamError,
)
from gateway.formats.multipart_batch import MEDIA_TYPE as MULTIPART
from gateway.formats.multipart_batch import NOT_EXECUTED_STATUS
from gateway.headers import REQUEST_ID_HEADER, REQUEST_ID_PATTERN
from gateway.health import State
from gateway.model import BatchOutcome, ExecutionMode
from gateway.openapi_batch import (
    MULTIPART_BOUNDARY,
    REF,
    Schema,
    batch_schemas,
    multipart_request_schema,
)
from gateway.openapi_dialects import composite_operation, graph_operation, odata_operation
from gateway.problem import PROBLEM_JSON, problem_type

__all__ = [
    "BATCH_ERRORS", "LOOKUP_ERRORS", "NOT_PER_OPERATION", "ProblemType", "build_document", "problem_types",
]

BATCH_ERRORS: tuple[type[GatewayError], ...] = (
    ClientError, MalformedBatch, ForbiddenTarget, RequestTimeout, PayloadTooLarge,
    UnsupportedMediaType, Uncompensable, MixedCredentials, HeadersTooLarge, JournalUnavailable,
    BatchLost, ShuttingDown, GatewayError,
)
"""What a batch endpoint may answer as a problem (GatewayError: an unexpected failure, 500)."""
LOOKUP_ERRORS: tuple[type[GatewayError], ...] = (BatchNotFound, JournalUnavailable, GatewayError)
OWN_ERRORS: tuple[type[GatewayError], ...] = (GatewayError,)
NOT_PER_OPERATION: tuple[type[GatewayError], ...] = (BadHttp, MethodRefused, RouteNotFound, UpstreamError)
"""With their subclasses: answers of the proxy (every other path), of undeclared methods, and of
requests that are not HTTP/1.x; catalogued in `x-problem-types`, on no operation."""


@dataclass(frozen=True, slots=True)
class ProblemType:
    """One documented problem: its `type` URI, HTTP status and stable title."""

    type: str
    status: int
    title: str
    about: str


_UNEXPECTED = "An unexpected failure in the gateway: logged with the request id, never a stack trace."


def _error_classes() -> list[type[GatewayError]]:
    """GatewayError and every subclass the gateway's modules define (imported above)."""
    found: list[type[GatewayError]] = [GatewayError]
    for cls in found:
        found.extend(
            sub for sub in cls.__subclasses__()
            if sub not in found and sub.__module__.startswith("gateway.")
        )
    return found


def _problem(cls: type[GatewayError]) -> ProblemType:
    doc = _UNEXPECTED if cls is GatewayError else cls.__doc__ or ""
    about = doc.split("\n\n")[0].replace("\n    ", " ").strip()
    return ProblemType(problem_type(cls.type_suffix), cls.status, cls.title, about)


def problem_types() -> list[ProblemType]:
    """Every problem the gateway answers with, one per (type, status, title), by status."""
    seen: dict[tuple[str, int, str], ProblemType] = {}
    for cls in _error_classes():
        problem = _problem(cls)
        seen.setdefault((problem.type, problem.status, problem.title), problem)
    return sorted(seen.values(), key=lambda p: (p.status, p.type))


def build_document(config: GatewayConfig) -> dict[str, Any]:
    """The whole document for this config: its batch paths, prefix, routes and limits."""
    prefix = config.gateway.prefix
    paths: dict[str, Any] = {
        config.batch.json_endpoint.path: {"post": _json_batch(config)},
        config.batch.multipart_endpoint.path: {"post": _multipart_batch(config)},
    }
    if config.batch.odata is not None:
        paths[config.batch.odata.path] = {"post": odata_operation(config, config.batch.odata)}
    if config.batch.graph is not None:
        paths[config.batch.graph.path] = {"post": graph_operation(config, config.batch.graph)}
    if config.batch.composite is not None:
        paths[config.batch.composite.path] = {"post": composite_operation(config, config.batch.composite)}
    for name, operation in _own_operations().items():
        paths[f"{prefix}/{name}"] = {"get": operation}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Batch gateway",
            "version": gateway.__version__,
            "description": (
                "The gateway's own endpoints, generated from its configuration. Every other path is "
                "proxied to the upstream its routing table chooses. Undeclared methods on these "
                "paths answer 405 with `Allow`. Clients ignore answer fields they do not know."
            ),
        },
        "paths": paths,
        "components": _components(config),
        "x-problem-types": [_catalogue_entry(p) for p in problem_types()],
    }


def _catalogue_entry(problem: ProblemType) -> dict[str, Any]:
    return {"type": problem.type, "status": problem.status, "title": problem.title,
            "description": problem.about}


def _components(config: GatewayConfig) -> dict[str, Any]:
    schemas = batch_schemas(config)
    schemas.update(_problem_schemas())
    schemas.update(_own_schemas())
    owner = {
        "type": "apiKey", "in": "header", "name": "Authorization",
        "description": "Whatever credentials sent the batch (any scheme): the journal keeps their HMAC.",
    }
    return {"schemas": schemas, "headers": _headers(), "parameters": _parameters(),
            "securitySchemes": {"BatchOwner": owner}}


# --- headers and parameters ----------------------------------------------------------------------


_GROUP = r"[^=,\s]+=[A-Za-z0-9._-]+"
_GROUPS_PATTERN = rf"^{_GROUP}(?:, {_GROUP})*$"


def _headers() -> dict[str, Any]:
    return {
        "XRequestId": {
            "description": "The request id: the client's `X-Request-ID` when it matches the pattern, "
                           "else a new one. Sent upstream too, and logged.",
            "required": True, "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
        },
        "XBatchId": {
            "description": "The batch's id (look an atomic batch up with it).",
            "required": True, "schema": {"type": "string"},
        },
        "XBatchIdIfStarted": {
            "description": "The batch's id, when the batch had started before this problem.",
            "schema": {"type": "string"},
        },
        "XBatchOutcome": {
            "description": "Atomic batches only: the batch's outcome (a dialect batch with several "
                           "atomic groups: the worst group's).",
            "schema": {"type": "string", "enum": [o.value for o in BatchOutcome]},
        },
        "XBatchGroups": {
            "description": "A dialect batch with several atomic groups (OData change sets or atomicity "
                           "groups): each group's name (percent-encoded) and the batch id it is "
                           "journaled and looked up under, `name=id`, comma-separated. X-Batch-Id is "
                           "then no lookup id.",
            "schema": {"type": "string", "pattern": _GROUPS_PATTERN},
        },
    }


def _caseless_values(values: tuple[str, ...]) -> str:
    words = "|".join("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in v) for v in values)
    return rf"^[ \t]*(?:{words})[ \t]*$"


def _parameters() -> dict[str, Any]:
    return {
        "XRequestId": {
            "name": REQUEST_ID_HEADER, "in": "header", "required": False,
            "description": f"Kept when it matches `{REQUEST_ID_PATTERN}`; any other value is replaced.",
            "schema": {"type": "string"},
        },
        "XBatchAtomic": {
            "name": ATOMIC_HEADER, "in": "header", "required": False,
            "description": "All-or-nothing execution: "
                           f"{'/'.join(ATOMIC_TRUE)} or {'/'.join(ATOMIC_FALSE)}, any case "
                           "(default: the endpoint's `atomic` setting).",
            "schema": {"type": "string", "pattern": _caseless_values(ATOMIC_TRUE + ATOMIC_FALSE)},
        },
        "XBatchExecution": {
            "name": EXECUTION_HEADER, "in": "header", "required": False,
            "description": "How the parts run (default: the endpoint's `execution` setting).",
            "schema": {"type": "string",
                       "pattern": rf"^[ \t]*(?:{'|'.join(m.value for m in ExecutionMode)})[ \t]*$"},
        },
    }


def _header_refs(*names: str) -> dict[str, Any]:
    wire = {"XRequestId": REQUEST_ID_HEADER, "XBatchId": BATCH_ID_HEADER,
            "XBatchIdIfStarted": BATCH_ID_HEADER, "XBatchOutcome": OUTCOME_HEADER}
    return {wire[name]: {"$ref": f"#/components/headers/{name}"} for name in names}


def _param_refs(*names: str) -> list[dict[str, str]]:
    return [{"$ref": f"#/components/parameters/{name}"} for name in names]


# --- problems ------------------------------------------------------------------------------------


def _problem_schemas() -> dict[str, Schema]:
    return {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details; `x-problem-types` lists every type.",
            "required": ["type", "title", "status", "detail", "instance", "request_id"],
            "properties": {
                "type": {"type": "string", "enum": sorted({p.type for p in problem_types()})},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "instance": {"type": "string", "description": "The request's path."},
                "request_id": {"type": "string", "pattern": REQUEST_ID_PATTERN},
                "where": {"type": "string", "description": "JSON pointer, `part N` or a header name."},
                "pointer": {"type": "string", "description": "RFC 6901 pointer, for JSON input."},
            },
        }
    }


def _problem_responses(
    errors: tuple[type[GatewayError], ...], *headers: str
) -> dict[str, Any]:
    by_status: dict[int, list[ProblemType]] = {}
    for problem in (_problem(cls) for cls in errors):
        if problem not in by_status.setdefault(problem.status, []):
            by_status[problem.status].append(problem)
    return {str(code): _problem_response(found, headers) for code, found in sorted(by_status.items())}


def _problem_response(problems: list[ProblemType], headers: tuple[str, ...]) -> dict[str, Any]:
    schema = _problem_schemas()["Problem"]  # a copy, with this status and its types pinned
    schema["properties"].update(
        status={"const": problems[0].status}, type={"enum": sorted({p.type for p in problems})}
    )
    return {
        "description": "; ".join(f"{p.title} ({p.type.rsplit('/', 1)[-1]}) {p.about}" for p in problems),
        "headers": _header_refs("XRequestId", *headers),
        "content": {PROBLEM_JSON: {"schema": schema}},
    }


# --- the batch endpoints -------------------------------------------------------------------------


def _json_batch(config: GatewayConfig) -> dict[str, Any]:
    endpoint = config.batch.json_endpoint
    return {
        "operationId": "JsonBatch",
        "summary": "JSON batch (seed 000 shapes, with extensions)",
        "description": (
            f"Atomic by default: {str(endpoint.atomic).lower()}. Processed batches answer 200 "
            "whatever their items returned; a malformed batch executes nothing."
        ),
        "parameters": _param_refs("XRequestId", "XBatchAtomic"),
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF + "BatchRequest"}}}},
        "responses": {
            "200": {
                "description": "Processed; the answer mirrors the request item for item.",
                "headers": _header_refs("XRequestId", "XBatchId", "XBatchOutcome"),
                "content": {"application/json": {"schema": {"$ref": REF + "BatchAnswer"}}},
                "links": _lookup_links(),
            },
            **_problem_responses(BATCH_ERRORS, "XBatchIdIfStarted"),
        },
    }


def _multipart_batch(config: GatewayConfig) -> dict[str, Any]:
    endpoint = config.batch.multipart_endpoint
    return {
        "operationId": "MultipartBatch",
        "summary": "multipart/mixed batch of application/http parts (seed 003)",
        "description": (
            f"Exactly `{MULTIPART}` with a `boundary` parameter (required). Atomic by default: "
            f"{str(endpoint.atomic).lower()}; execution by default: {endpoint.execution}."
        ),
        "parameters": _param_refs("XRequestId", "XBatchAtomic", "XBatchExecution"),
        "requestBody": {"required": True, "content": {MULTIPART: {
            "schema": multipart_request_schema(config),
            "x-media-type-parameters": {"boundary": MULTIPART_BOUNDARY},
        }}},
        "responses": {
            "200": {
                "description": (
                    "One application/http answer part per request part, in order; a part not "
                    f"executed answers {NOT_EXECUTED_STATUS} with a JSON reason."
                ),
                "headers": _header_refs("XRequestId", "XBatchId", "XBatchOutcome"),
                "content": {MULTIPART: {"schema": {"type": "array", "items": {
                    "type": "string", "contentMediaType": "application/http",
                    "pattern": r"^HTTP/1\.1 [1-5][0-9]{2}[ \r]"}},
                    "x-media-type-parameters": {"boundary": MULTIPART_BOUNDARY}}},
                "links": _lookup_links(),
            },
            **_problem_responses(BATCH_ERRORS, "XBatchIdIfStarted"),
        },
    }


def _lookup_links() -> dict[str, Any]:
    note = "What became of an atomic batch (same Authorization as the batch)."
    return {
        "BatchById": {"operationId": "BatchLookup", "description": note,
                      "parameters": {"batch_id": f"$response.header.{BATCH_ID_HEADER}"}},
        "BatchByRequestId": {"operationId": "BatchLookupByRequest", "description": note,
                             "parameters": {"request_id": f"$response.header.{REQUEST_ID_HEADER}"}},
    }


# --- the gateway's own endpoints -----------------------------------------------------------------


def _json_answer(description: str, schema: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "headers": _header_refs("XRequestId"),
            "content": {"application/json": {"schema": {"$ref": REF + schema}}}, **extra}


def _own_operations() -> dict[str, dict[str, Any]]:
    lookup_params = [{"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    by_request = [{"name": "request_id", "in": "query", "required": False,
                   "description": "The X-Request-ID the batch was sent with.",
                   "schema": {"type": "string"}}]
    lookup_note = ("For the credentials (`Authorization`) that sent the batch; an unknown, pruned or "
                   "another owner's batch, and a lookup without credentials, all answer the same 404.")
    return {
        "healthz": _own("Healthz", "The process is alive.", _json_answer("alive", "Health")),
        "readyz": _own("Readyz", "Readiness (see the README).", _json_answer("ready", "Readiness"),
                       {"503": _json_answer("not ready; `reasons` says why", "Readiness")}),
        "metrics": _own("Metrics", "Prometheus text exposition.", {
            "description": "Prometheus text format", "headers": _header_refs("XRequestId"),
            "content": {"text/plain": {"schema": {"type": "string"}}}}),
        "openapi.json": _own("OpenApi", "This document.", _json_answer("this document", "OpenApiDocument")),
        "batches/{batch_id}": {**_own("BatchLookup", lookup_note, _lookup_answer(), params=lookup_params,
                                      errors=LOOKUP_ERRORS), "security": _OWNER_OPTIONAL},
        "batches": {**_own("BatchLookupByRequest", lookup_note, _lookup_answer(), params=by_request,
                           errors=LOOKUP_ERRORS), "security": _OWNER_OPTIONAL},
    }


_OWNER_OPTIONAL: list[dict[str, list[str]]] = [{"BatchOwner": []}, {}]
"""Without credentials a lookup is allowed, and answers the same 404 as an unknown batch (no 401:
the answer tells nothing about which batches exist)."""


def _own(
    operation_id: str, summary: str, ok: dict[str, Any], more: dict[str, Any] | None = None, *,
    params: list[dict[str, Any]] | None = None, errors: tuple[type[GatewayError], ...] = OWN_ERRORS,
) -> dict[str, Any]:
    return {
        "operationId": operation_id, "summary": summary,
        "parameters": [*_param_refs("XRequestId"), *(params or [])],
        "responses": {"200": ok, **(more or {}), **_problem_responses(errors)},
    }


def _lookup_answer() -> dict[str, Any]:
    answer = _json_answer("the batch as its journal knows it", "BatchLookup")
    answer["headers"] = {
        **answer["headers"],
        "Cache-Control": {"required": True, "schema": {"const": "no-store"}},
        "Vary": {"required": True, "schema": {"const": "Authorization"}},
    }
    return answer


def _own_schemas() -> dict[str, Schema]:
    text: Schema = {"type": "string"}
    return {
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"const": "ok"}}},
        "Readiness": {
            "type": "object",
            "required": ["ready", "journal", "recovered", "stopping", "reasons", "upstreams"],
            "properties": {
                "ready": {"type": "boolean"}, "journal": {"enum": ["ok", "unusable"]},
                "recovered": {"type": "boolean"}, "stopping": {"type": "boolean"},
                "reasons": {"type": "array", "items": text},
                "upstreams": {"type": "object", "additionalProperties": {"$ref": REF + "UpstreamHealth"}},
            },
        },
        "UpstreamHealth": {
            "type": "object",
            "required": ["state", "since", "last_error", "consecutive_failures", "required", "active_check"],
            "properties": {
                "state": {"enum": [s.value for s in State]}, "since": text,
                "last_error": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["kind", "detail", "at"],
                    "properties": {"kind": text, "detail": text, "at": text}}]},
                "consecutive_failures": {"type": "integer", "minimum": 0},
                "required": {"type": "boolean"}, "active_check": {"type": "boolean"},
            },
        },
        "OpenApiDocument": {"type": "object", "required": ["openapi", "info", "paths"],
                            "additionalProperties": True,
                            "properties": {"openapi": {"type": "string", "pattern": r"^3\.1\.\d+$"}}},
        "BatchLookup": _lookup_schema(),
        "BatchState": {"type": "string", "enum": [s.value for s in BatchState]},
    }


def _lookup_schema() -> Schema:
    text: Schema = {"type": "string"}
    nullable_text: Schema = {"type": ["string", "null"]}
    item = {
        "type": "object",
        "required": ["where", "method", "path", "upstream", "state", "rollback", "detail"],
        "properties": {
            "where": nullable_text, "method": nullable_text, "path": nullable_text,
            "upstream": nullable_text, "state": text, "detail": nullable_text,
            "rollback": {"enum": [EXECUTED, ROLLED_BACK, ROLLBACK_FAILED, FAILED, UNKNOWN]},
        },
    }
    return {
        "type": "object",
        "required": ["batch_id", "state", "detail", "items", "transactions"],
        "properties": {
            "batch_id": text, "state": {"$ref": REF + "BatchState"}, "detail": nullable_text,
            "items": {"type": "array", "items": item},
            "transactions": {"type": "array", "items": {
                "type": "object", "required": ["upstream", "state"],
                "properties": {"upstream": text, "state": text}}},
        },
    }
