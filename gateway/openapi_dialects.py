"""The OpenAPI operations of the Graph (`batch.graph`) and Salesforce Composite (`batch.composite`)
batch endpoints, for gateway/openapi.py: request and answer schemas from the codecs' constants.
"""

from __future__ import annotations

from typing import Any

from gateway.batch_endpoints import BATCH_ID_HEADER, OUTCOME_HEADER
from gateway.config import CompositeEndpoint, GraphEndpoint
from gateway.errors import (
    BatchLost,
    ClientError,
    ForbiddenTarget,
    HeadersTooLarge,
    JournalUnavailable,
    MalformedBatch,
    MethodRefused,
    MixedCredentials,
    PayloadTooLarge,
    RequestTimeout,
    ShuttingDown,
    Uncompensable,
    UnsupportedMediaType,
)
from gateway.formats._graph_answers import ITEM_STATUS_HEADER
from gateway.formats.composite_batch import REFERENCE_ID, api_prefix
from gateway.formats.graph_batch import MAX_ID_LENGTH, GraphSite
from gateway.formats.json_batch import TOKEN_PATTERN
from gateway.headers import REQUEST_ID_HEADER
from gateway.problem import PROBLEM_JSON

Schema = dict[str, Any]
JSON = "application/json"
_HEADER_REF = "#/components/headers/"
_PARAM_REF = "#/components/parameters/"
REFUSALS = (
    ClientError, MalformedBatch, ForbiddenTarget, RequestTimeout, PayloadTooLarge, UnsupportedMediaType,
    Uncompensable, MixedCredentials, HeadersTooLarge, MethodRefused, JournalUnavailable, BatchLost,
    ShuttingDown,
)
"""What these endpoints refuse with, in the dialect's error shape (a 500 stays problem+json)."""
_TEXT: Schema = {"type": "string"}
_METHOD: Schema = {"type": "string", "pattern": f"^{TOKEN_PATTERN}$",
                   "description": "An HTTP method token (any case; sent upper-cased)."}
_STRING_MAP: Schema = {"type": "object", "additionalProperties": _TEXT}


def graph_operation(endpoint: GraphEndpoint) -> dict[str, Any]:
    """The OpenAPI operation of `batch.graph.path` (Microsoft Graph JSON batching)."""
    root = GraphSite.of(endpoint.path).root or "/"
    request: Schema = {
        "type": "object", "additionalProperties": False, "required": ["id", "method", "url"],
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH,
                   "description": "Unique within the batch, compared case-insensitively."},
            "method": _METHOD,
            "url": {"type": "string", "minLength": 1, "description": (
                "A gateway target relative to the service root; an absolute URL only on the gateway's "
                f"own origin under `{root}` (stripped).")},
            "headers": {"type": "object", "additionalProperties": {
                "oneOf": [_TEXT, {"type": "array", "items": _TEXT}]}},
            "body": {"description": "A JSON value is sent as JSON; a string is base64 and needs a "
                                    "Content-Type header."},
            "dependsOn": {"type": "array", "items": _TEXT, "description": "Ids of earlier requests."},
            "depends_on": {"type": "array", "items": _TEXT, "description": "Alias of dependsOn."},
        },
    }
    answer: Schema = {
        "type": "object", "additionalProperties": False, "required": ["id", "status", "headers", "body"],
        "properties": {
            "id": _TEXT, "status": {"type": "integer", "minimum": 100, "maximum": 599},
            "headers": {**_STRING_MAP, "description": f"The upstream's headers; `{ITEM_STATUS_HEADER}` "
                                                      "in an atomic batch whose change did not stay."},
            "body": {"description": "JSON for a JSON answer, else base64; null when empty. 424 "
                                    "(Failed Dependency) for a request whose dependency failed."},
        },
    }
    error: Schema = {
        "type": "object", "additionalProperties": False, "required": ["error"],
        "properties": {"error": {
            "type": "object", "additionalProperties": False, "required": ["code", "message", "innerError"],
            "properties": {
                "code": {**_TEXT, "description": "The problem type's name (README \"Problem types\")."},
                "message": _TEXT,
                "innerError": {"type": "object", "additionalProperties": False,
                               "required": ["type", "request-id", "date"],
                               "properties": {"type": _TEXT, "request-id": _TEXT, "date": _TEXT,
                                              "where": _TEXT}},
            },
        }},
    }
    return _operation(
        "GraphBatch", "Microsoft Graph JSON batch ($batch)",
        f"At most {endpoint.max_items} requests, run as soon as their dependsOn succeeded; atomic "
        f"(`X-Batch-Atomic`) by default: {str(endpoint.atomic).lower()}. A refused batch sends nothing.",
        {"type": "object", "additionalProperties": False, "required": ["requests"], "properties": {
            "requests": {"type": "array", "minItems": 1, "maxItems": endpoint.max_items, "items": request}}},
        {"type": "object", "additionalProperties": False, "required": ["responses"], "properties": {
            "responses": {"type": "array", "items": answer}}},
        error,
    )


def composite_operation(endpoint: CompositeEndpoint) -> dict[str, Any]:
    """The OpenAPI operation of `batch.composite.path` (Salesforce Composite)."""
    prefix = api_prefix(endpoint.path)
    request: Schema = {
        "type": "object", "additionalProperties": False, "required": ["method", "url", "referenceId"],
        "properties": {
            "method": _METHOD,
            "url": {"type": "string", "pattern": "^/", "description": (
                "A gateway target" + (f" (`{prefix}` is stripped)" if prefix else "")
                + "; may hold `@{referenceId.field}` references to earlier answers.")},
            "referenceId": {"type": "string", "pattern": f"^{REFERENCE_ID.pattern}$"},
            "body": {"description": "Sent as JSON; strings may hold references."},
            "httpHeaders": _STRING_MAP,
        },
    }
    answer: Schema = {
        "type": "object", "additionalProperties": False,
        "required": ["body", "httpHeaders", "httpStatusCode", "referenceId"],
        "properties": {
            "body": {"description": "The JSON answer (text as a string, other bytes base64, null when "
                                    "empty); `[{errorCode, message}]` (PROCESSING_HALTED) when not sent."},
            "httpHeaders": _STRING_MAP,
            "httpStatusCode": {"type": "integer", "minimum": 100, "maximum": 599},
            "referenceId": _TEXT,
        },
    }
    error: Schema = {"type": "array", "minItems": 1, "items": {
        "type": "object", "additionalProperties": False, "required": ["message", "errorCode"],
        "properties": {"message": _TEXT, "errorCode": {
            **_TEXT, "description": "The problem type's name in upper snake case (MALFORMED_BATCH)."},
            "fields": {"type": "array", "items": _TEXT}},
    }}
    return _operation(
        "CompositeBatch", "Salesforce Composite",
        f"At most {endpoint.max_items} subrequests, run in order; `allOrNone: true` (or `X-Batch-Atomic`, "
        f"by default {str(endpoint.atomic).lower()}) makes them all-or-nothing. A refused request sends "
        "nothing.",
        {"type": "object", "additionalProperties": False, "required": ["compositeRequest"], "properties": {
            "allOrNone": {"type": "boolean"}, "collateSubrequests": {"type": "boolean"},
            "compositeRequest": {"type": "array", "minItems": 1, "maxItems": endpoint.max_items,
                                 "items": request}}},
        {"type": "object", "additionalProperties": False, "required": ["compositeResponse"], "properties": {
            "compositeResponse": {"type": "array", "items": answer}}},
        error,
    )


def _operation(
    operation_id: str, summary: str, description: str, request: Schema, answer: Schema, error: Schema
) -> dict[str, Any]:
    heads = {REQUEST_ID_HEADER: {"$ref": _HEADER_REF + "XRequestId"}}
    refusal_heads = {**heads, BATCH_ID_HEADER: {"$ref": _HEADER_REF + "XBatchIdIfStarted"}}
    statuses = sorted({cls.status for cls in REFUSALS})
    responses: dict[str, Any] = {
        "200": {
            "description": "Processed, whatever the requests answered; one answer per request, in order.",
            "headers": {**heads, BATCH_ID_HEADER: {"$ref": _HEADER_REF + "XBatchId"},
                        OUTCOME_HEADER: {"$ref": _HEADER_REF + "XBatchOutcome"}},
            "content": {JSON: {"schema": answer}},
        },
    }
    for status in statuses:
        names = ", ".join(sorted({cls.type_suffix for cls in REFUSALS if cls.status == status}))
        responses[str(status)] = {"description": f"Refused ({names}); nothing was sent.",
                                  "headers": refusal_heads, "content": {JSON: {"schema": error}}}
    problem = {"$ref": "#/components/schemas/Problem"}
    responses["500"] = {"description": "An unexpected failure (problem+json, as everywhere).",
                        "headers": heads, "content": {PROBLEM_JSON: {"schema": problem}}}
    return {
        "operationId": operation_id, "summary": summary, "description": description,
        "parameters": [{"$ref": _PARAM_REF + "XRequestId"}, {"$ref": _PARAM_REF + "XBatchAtomic"}],
        "requestBody": {"required": True, "content": {JSON: {"schema": request}}},
        "responses": responses,
    }
