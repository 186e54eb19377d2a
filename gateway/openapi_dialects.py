"""The OpenAPI operations of the batch dialects (`batch.graph`, `batch.composite`, `batch.odata`) for
gateway/openapi.py: request and answer schemas from the codecs' constants and the routing table.

As for the source formats (gateway/openapi_batch.py), a request URL's pattern is what some route
takes, in the dialect's spelling, so every schema-valid item is planned. What no JSON Schema can
state is in each operation's description and `x-batch-rules`: ids unique (Graph: ignoring case),
`dependsOn` and references naming earlier requests, an atomicity group's members adjacent.
"""

from __future__ import annotations

from typing import Any

from gateway.batch_endpoints import BATCH_ID_HEADER, GROUPS_HEADER, OUTCOME_HEADER
from gateway.config import CompositeEndpoint, GatewayConfig, GraphEndpoint, ODataEndpoint, Route
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
from gateway.formats._odata import ServiceRoot
from gateway.formats.composite_batch import REFERENCE_ID, api_prefix
from gateway.formats.graph_batch import MAX_ID_LENGTH, GraphSite
from gateway.formats.json_batch import TOKEN_PATTERN
from gateway.formats.odata_json import METHODS as ODATA_METHODS
from gateway.headers import REQUEST_ID_HEADER
from gateway.openapi_batch import (
    _PCT,
    _QUERY,
    _SEGMENT,
    MULTIPART_BOUNDARY,
    _caseless,
    _ecma_escape,
    _item_headers,
    _refused_methods,
    _route_path,
    multipart_request_schema,
)
from gateway.planning import REFUSED_ITEM_METHODS
from gateway.problem import PROBLEM_JSON

Schema = dict[str, Any]
JSON = "application/json"
MULTIPART = "multipart/mixed"
_HEADER_REF = "#/components/headers/"
_PARAM_REF = "#/components/parameters/"
REFUSALS = (
    ClientError, MalformedBatch, ForbiddenTarget, RequestTimeout, PayloadTooLarge, UnsupportedMediaType,
    Uncompensable, MixedCredentials, HeadersTooLarge, MethodRefused, JournalUnavailable, BatchLost,
    ShuttingDown,
)
"""What these endpoints refuse with, in the dialect's error shape (a 500 stays problem+json)."""
_TEXT: Schema = {"type": "string"}
_STRING_MAP: Schema = {"type": "object", "additionalProperties": _TEXT}
_JSON_MEDIA = (
    r"^[Aa][Pp][Pp][Ll][Ii][Cc][Aa][Tt][Ii][Oo][Nn]/(?:[Jj][Ss][Oo][Nn]|[a-z0-9.-]+\+[Jj][Ss][Oo][Nn])$"
)
"""A Content-Type a JSON body may be sent under (application/json, application/*+json)."""
_NOT_STRING: Schema = {"type": ["object", "array", "number", "boolean", "null"], "additionalProperties": True}
"""Any JSON value but a string (an object with any keys)."""
_NO_LEFT_BRACE = ("\\x5d-\\x7e", "\\x5d-\\x7a\\x7c-\\x7e")
"""Composite URLs: the character ranges without `{`, so no `@{...}` reference is ever offered."""
_REL_FIRST = r"[\x21\x22\x26-\x2d\x30-\x39\x3b-\x3e\x40-\x5b\x5d-\x7e]"
_REL_CHAR = r"[\x21\x22\x24\x26-\x2e\x30-\x39\x3b-\x3e\x40-\x5b\x5d-\x7e]"
_ODATA_RELATIVE = rf"(?:{_REL_FIRST}|{_PCT})(?:{_REL_CHAR}|{_PCT})*(?:/{_SEGMENT}?)*"
"""A URL relative to the OData service root: its first segment starts with neither `$` (a
reference) nor `.`, and holds no `:` (it would read as a scheme)."""
_ODATA_ID = r"^[A-Za-z0-9._~-]+$"


def _methods(route: Route, allowed: tuple[str, ...] | None) -> Schema:
    """The method schema of a route: its `methods` (within `allowed`), else any allowed token."""
    names = route.methods if route.methods is not None else allowed
    if names is None:
        return {"type": "string", "pattern": f"^{TOKEN_PATTERN}$", "not": _refused_methods()}
    words = [m for m in names
             if m.upper() not in REFUSED_ITEM_METHODS and (allowed is None or m.upper() in allowed)]
    return {"type": "string", "pattern": "^(?:" + "|".join(_caseless(m) for m in words) + ")$"}


def _calls(
    config: GatewayConfig, url_key: str, url_of: Any, allowed: tuple[str, ...] | None = None
) -> list[Schema]:
    """`{method, <url_key>}` alternatives, one per group of routes taking the same methods: each
    pairs the methods with the URLs (`url_of(routes)`: a pattern) those routes take."""
    groups: dict[tuple[str, ...] | None, list[Route]] = {}
    for route in config.routes:
        groups.setdefault(route.methods, []).append(route)
    return [
        {"properties": {"method": _methods(routes[0], allowed),
                        url_key: {"type": "string", "minLength": 1, "pattern": url_of(routes)}}}
        for routes in groups.values()
    ]


def _with_calls(item: Schema, calls: list[Schema]) -> Schema:
    """The item with its method and URL constrained: in place for one group of routes, else anyOf."""
    if len(calls) > 1:
        return {**item, "anyOf": calls}
    for key, schema in calls[0]["properties"].items():
        item["properties"][key] = {**schema, **item["properties"][key]}
    return item


def _graph_urls(routes: list[Route]) -> str:
    """Graph: a gateway target, its leading slash optional (`orders/1` is `/orders/1`)."""
    return rf"^/?(?:{'|'.join(_route_path(r)[1:] for r in routes)}){_QUERY}$"


def _composite_urls(prefix: str) -> Any:
    def urls(routes: list[Route]) -> str:
        paths = "|".join(_route_path(r) for r in routes)
        optional = f"(?:{_ecma_escape(prefix)})?" if prefix else ""
        pattern = rf"^{optional}(?:{paths}){_QUERY}$"
        return pattern.replace(*_NO_LEFT_BRACE)
    return urls


def _odata_urls(root: str) -> Any:
    """OData: an absolute path some route takes, or a path relative to the service root when a
    route takes the root's own path."""
    def urls(routes: list[Route]) -> str:
        forms = [_route_path(r) for r in routes]
        base = root.rstrip("/")
        if any(r.prefix == "/" or base == r.prefix or base.startswith(r.prefix + "/") for r in routes):
            forms.append(_ODATA_RELATIVE)
        return rf"^(?:{'|'.join(forms)}){_QUERY}$"
    return urls


def _headers(config: GatewayConfig, *, lists: bool) -> Schema:
    """The source formats' item header rules; a Content-Type only of a JSON type (other media
    types need a string body, in each dialect's own encoding)."""
    schema = _item_headers(config)
    value = schema["additionalProperties"]["oneOf"][0]
    if not lists:
        schema["additionalProperties"] = value
    content_type = {"type": "string", "pattern": _JSON_MEDIA}
    schema["patternProperties"] = {f"^{_caseless('content-type')}$": content_type}
    limits = config.batch.limits
    schema["description"] = (
        "This request's own headers; a JSON body's Content-Type is a JSON type. At most "
        f"{limits.max_part_headers} values and {limits.max_part_header_bytes} bytes (431 above)."
    )
    return schema


def graph_operation(config: GatewayConfig, endpoint: GraphEndpoint) -> dict[str, Any]:
    """The OpenAPI operation of `batch.graph.path` (Microsoft Graph JSON batching)."""
    root = GraphSite.of(endpoint.path).root or "/"
    ids: Schema = {"type": ["array", "null"], "items": _TEXT, "description": "Ids of earlier requests."}
    request: Schema = {
        "type": "object", "additionalProperties": False, "required": ["id", "method", "url"],
        "not": {"required": ["dependsOn", "depends_on"]},
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH,
                   "pattern": r"^[^\x00-\x1f\x7f]*$",
                   "description": "Unique within the batch, compared case-insensitively."},
            "method": {"description": "An HTTP method token (any case; sent upper-cased)."},
            "url": {"description": (
                "A gateway target that a route takes, the leading slash optional. Also accepted (not "
                f"offered here): an absolute URL on the gateway's own origin under `{root}` (stripped), "
                "spaces (sent as %20).")},
            "headers": _headers(config, lists=True),
            "body": {**_NOT_STRING, "description": (
                "A JSON value, sent as JSON. Also accepted: a string, base64 of the bytes to send under "
                "the request's own Content-Type header.")},
            "dependsOn": ids,
            "depends_on": {**ids, "description": "Alias of dependsOn (msgraph-core sends it)."},
        },
    }
    request = _with_calls(request, _calls(config, "url", _graph_urls))
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
    rules = ["`id` unique within the batch, ignoring case (else 400)",
             "`dependsOn` names earlier requests only, so no cycles (else 400)"]
    return _operation(
        "GraphBatch", "Microsoft Graph JSON batch ($batch)",
        f"At most {endpoint.max_items} requests, run as soon as their dependsOn succeeded; atomic "
        f"(`X-Batch-Atomic`) by default: {str(endpoint.atomic).lower()}. A refused batch sends nothing.",
        {JSON: {"schema": {"type": "object", "additionalProperties": False, "required": ["requests"],
                           "properties": {"requests": {"type": "array", "minItems": 1,
                                                       "maxItems": _max_items(config, endpoint.max_items),
                                                       "items": request}}}}},
        {"200": {JSON: {"schema": {"type": "object", "additionalProperties": False, "required": ["responses"],
                                   "properties": {"responses": {"type": "array", "items": answer}}}}}},
        {JSON: {"schema": error}}, rules,
    )


def composite_operation(config: GatewayConfig, endpoint: CompositeEndpoint) -> dict[str, Any]:
    """The OpenAPI operation of `batch.composite.path` (Salesforce Composite)."""
    prefix = api_prefix(endpoint.path)
    request: Schema = {
        "type": "object", "additionalProperties": False, "required": ["method", "url", "referenceId"],
        "properties": {
            "method": {"description": "An HTTP method token (any case; sent upper-cased)."},
            "url": {"description": (
                "A gateway target that a route takes"
                + (f", `{prefix}` optional (stripped)" if prefix else "")
                + ". It may hold `@{referenceId.field}` references to earlier answers (not offered here).")},
            "referenceId": {"type": "string", "pattern": f"^{REFERENCE_ID.pattern}$"},
            "body": {"description": "Sent as JSON; its strings may hold references (`@{...}`)."},
            "httpHeaders": _headers(config, lists=False),
        },
    }
    request = _with_calls(request, _calls(config, "url", _composite_urls(prefix)))
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
    rules = ["`referenceId` unique within the request (else 400)",
             "a reference `@{ref.path}` names an earlier referenceId (else 400 before anything is sent); "
             "one whose path finds nothing halts that subrequest (PROCESSING_HALTED)"]
    return _operation(
        "CompositeBatch", "Salesforce Composite",
        f"At most {endpoint.max_items} subrequests, run in order; `allOrNone: true` (or `X-Batch-Atomic`, "
        f"by default {str(endpoint.atomic).lower()}) makes them all-or-nothing. A refused request sends "
        "nothing.",
        {JSON: {"schema": {"type": "object", "additionalProperties": False, "required": ["compositeRequest"],
                           "properties": {
                               "allOrNone": {"type": "boolean"}, "collateSubrequests": {"type": "boolean"},
                               "compositeRequest": {"type": "array", "minItems": 1, "items": request,
                                                    "maxItems": _max_items(config, endpoint.max_items)}}}}},
        {"200": {JSON: {"schema": {"type": "object", "additionalProperties": False,
                                   "required": ["compositeResponse"], "properties": {
                                       "compositeResponse": {"type": "array", "items": answer}}}}}},
        {JSON: {"schema": error}}, rules,
    )


def odata_operation(config: GatewayConfig, endpoint: ODataEndpoint) -> dict[str, Any]:
    """The OpenAPI operation of `batch.odata.path`: 4.01 JSON, or multipart (V4 and V2)."""
    root = ServiceRoot.of(endpoint.path).path
    max_items = _max_items(config, endpoint.max_items)
    bodiless = "|".join(_caseless(m) for m in ("GET", "DELETE"))
    headers = _headers(config, lists=False)
    for name in ("if-match", "if-none-match"):  # `$<id>`: that request's ETag (not offered here)
        headers["patternProperties"][f"^{_caseless(name)}$"] = {
            "type": "string", "pattern": r"^(?:[^$\r\n\x00][^\r\n\x00]*)?$"}
    request: Schema = {
        "type": "object", "additionalProperties": False, "required": ["id", "method", "url"],
        "properties": {
            "id": {"type": "string", "pattern": _ODATA_ID, "description": "Unique within the batch."},
            "method": {"description": "delete, get, patch, post or put, in any case."},
            "url": {"description": (
                f"An absolute path some route takes, or a path relative to the service root `{root}`. "
                "Also accepted (not offered here): `$<id>[/...]`, the Location of an earlier answer; "
                "this gateway's own absolute URL.")},
            "atomicityGroup": {"type": ["string", "null"], "pattern": _ODATA_ID},
            "dependsOn": {"type": ["array", "null"], "items": {"type": "string", "pattern": _ODATA_ID}},
            "headers": headers,
            "body": {"description": "JSON under a JSON Content-Type (the default); GET and DELETE "
                                    "take none."},
        },
        "if": {"required": ["method"], "properties": {"method": {"pattern": f"^(?:{bodiless})$"}}},
        "then": {"properties": {"body": {"type": "null"}}},
    }
    request = _with_calls(request, _calls(config, "url", _odata_urls(root), ODATA_METHODS))
    json_request: Schema = {
        "type": "object", "required": ["requests"], "additionalProperties": False,
        "patternProperties": {"^@": {"description": "An annotation (ignored)."}},
        "properties": {"requests": {"type": "array", "minItems": 1, "maxItems": max_items, "items": request}},
    }
    parts = multipart_request_schema(config)
    parts["maxItems"] = max_items
    parts["description"] = (
        "The top-level parts in order, each one request (`Content-Type: application/http`) or a change set "
        "(a nested multipart/mixed, not offered here; its requests need a Content-ID in V4). URLs as in "
        "the JSON form; `$<Content-ID>` refers to an earlier request of the same change set (V4: of "
        "the batch)."
    )
    json_answer: Schema = {
        "type": "object", "additionalProperties": False, "required": ["responses"],
        "properties": {"responses": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["id", "status"],
            "properties": {
                "id": _TEXT, "status": {"type": "integer", "minimum": 100, "maximum": 599},
                "headers": {**_STRING_MAP, "description": "The upstream's headers, lower-case names."},
                "body": {"description": "JSON for a JSON answer, text for text/*, else base64url."},
                "atomicityGroup": _TEXT,
            },
        }}},
    }
    answer_parts: Schema = {"type": "array",
                            "items": {"type": "string", "contentMediaType": "application/http"},
                            "description": "One part per top-level request part (a change set as one "
                                           "nested multipart part, or one error part when it failed)."}
    error: Schema = {
        "type": "object", "additionalProperties": False, "required": ["error"],
        "properties": {"error": {
            "type": "object", "additionalProperties": False, "required": ["code", "message"],
            "properties": {
                "code": {**_TEXT, "description": "The problem type's name (README \"Problem types\")."},
                "message": {"description": "What is wrong: a string (V2: {lang, value})."},
                "target": {**_TEXT, "description": "Where: a JSON pointer, `part N`, a header."},
            },
        }},
    }
    rules = ["`id` unique within the batch and distinct from every atomicityGroup name (else 400)",
             "an atomicityGroup's members are adjacent (else 400)",
             "`dependsOn` names earlier ids or groups, never the request's own group (else 400)",
             "a `$<id>` in `url`, If-Match or If-None-Match names a request in dependsOn (else 400)"]
    multipart = {"schema": parts, "x-media-type-parameters": {"boundary": MULTIPART_BOUNDARY}}
    multipart_answer = {"schema": answer_parts, "x-media-type-parameters": {"boundary": MULTIPART_BOUNDARY}}
    return _operation(
        "ODataBatch", "OData $batch: 4.01 JSON batch, or multipart/mixed with change sets (V4 and V2)",
        f"At most {max_items} requests. Relative request URLs resolve against `{root}`. Change sets and "
        f"atomicity groups run all-or-nothing (atomic: {str(endpoint.atomic).lower()}). Multipart is V4 "
        "with `OData-Version: 4.0`, else V2 (answered 202). A refused batch sends nothing and answers an "
        "OData error.",
        {JSON: {"schema": json_request}, MULTIPART: multipart},
        {"200": {JSON: {"schema": json_answer}, MULTIPART: multipart_answer},
         "202": {MULTIPART: multipart_answer}},
        {JSON: {"schema": error}}, rules, atomic_header=False,
    )


def _max_items(config: GatewayConfig, endpoint_max: int) -> int:
    return min(config.batch.limits.max_items, endpoint_max)


def _operation(
    operation_id: str, summary: str, description: str, request: Schema, answers: dict[str, Schema],
    error: Schema, rules: list[str], *, atomic_header: bool = True,
) -> dict[str, Any]:
    heads = {REQUEST_ID_HEADER: {"$ref": _HEADER_REF + "XRequestId"}}
    refusal_heads = {**heads, BATCH_ID_HEADER: {"$ref": _HEADER_REF + "XBatchIdIfStarted"}}
    statuses = sorted({cls.status for cls in REFUSALS})
    answered = {**heads, BATCH_ID_HEADER: {"$ref": _HEADER_REF + "XBatchId"},
                OUTCOME_HEADER: {"$ref": _HEADER_REF + "XBatchOutcome"},
                GROUPS_HEADER: {"$ref": _HEADER_REF + "XBatchGroups"}}
    responses: dict[str, Any] = {
        status: {"description": "Processed, whatever the requests answered; one answer per request, in order"
                                + (" (OData V2)." if status == "202" else "."),
                 "headers": answered, "content": content}
        for status, content in answers.items()
    }
    for status in statuses:
        names = ", ".join(sorted({cls.type_suffix for cls in REFUSALS if cls.status == status}))
        responses[str(status)] = {"description": f"Refused ({names}); nothing was sent.",
                                  "headers": refusal_heads, "content": error}
    problem = {"$ref": "#/components/schemas/Problem"}
    responses["500"] = {"description": "An unexpected failure (problem+json, as everywhere).",
                        "headers": heads, "content": {PROBLEM_JSON: {"schema": problem}}}
    return {
        "operationId": operation_id, "summary": summary,
        "description": description + " Rules no schema states: " + "; ".join(rules) + ".",
        "x-batch-rules": rules,
        "parameters": [{"$ref": _PARAM_REF + "XRequestId"}]
        + ([{"$ref": _PARAM_REF + "XBatchAtomic"}] if atomic_header else []),
        "requestBody": {"required": True, "content": request},
        "responses": responses,
    }
