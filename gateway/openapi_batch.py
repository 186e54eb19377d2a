"""The batch endpoints' request and answer schemas for the OpenAPI document (gateway/openapi.py).

Built from the seed's packaged schema (kept, extended) and the codecs' and router's own constants.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any

from gateway.config import GatewayConfig, Route
from gateway.formats._json_results import BODY_ENCODINGS
from gateway.formats.json_batch import (
    BATCH_KEYS,
    FRAMING_HEADERS,
    MAX_BODY_JSON_DEPTH,
    SINGLE_KEYS,
    TOKEN_PATTERN,
)
from gateway.formats.multipart_batch import BOUNDARY_PATTERN, PART_MEDIA_TYPE
from gateway.model import BatchOutcome, ExecutionMode, RollbackStatus
from gateway.planning import CONTROL_CHARS_PATTERN, REFUSED_ITEM_HEADERS, REFUSED_ITEM_METHODS

Schema = dict[str, Any]
REF = "#/components/schemas/"

# Origin-form targets exactly as gateway/routing.py `parse_target` accepts them, without the
# percent-encodings it would have to decode to judge (see _PCT): every string matching these is
# accepted. Characters are visible ASCII; `#`, `\`, whitespace and controls never are.
_PATH_CHAR = r"[\x21\x22\x24\x26-\x2e\x30-\x3e\x40-\x5b\x5d-\x7e]"
_PATH_CHAR_NO_DOT = r"[\x21\x22\x24\x26-\x2d\x30-\x3e\x40-\x5b\x5d-\x7e]"
_PATH_CHAR_NO_DOT_SEMI = r"[\x21\x22\x24\x26-\x2d\x30-\x3a\x3c-\x3e\x40-\x5b\x5d-\x7e]"
_PATH_CHAR_NO_SEMI = r"[\x21\x22\x24\x26-\x2e\x30-\x3a\x3c-\x3e\x40-\x5b\x5d-\x7e]"
_PCT = r"%(?:2[0-46-9a-dA-D]|3[0-9ac-fAC-F]|[46][0-9a-fA-F]|5[0-9abd-fABD-F]|7[0-9a-eA-E])"
"""A percent-encoded visible ASCII character other than `%`, `.`, `/`, `;` and `\\`."""
_QUERY_CHAR = r"(?:[\x21\x22\x24\x26-\x5b\x5d-\x7e]|%(?:[2-6][0-9a-fA-F]|7[0-9a-eA-E]|[89a-fA-F][0-9a-fA-F]))"
_SEGMENT = (  # not `.` or `..` (also before `;parameters`): they could escape the route
    rf"(?:(?:{_PATH_CHAR_NO_DOT}|{_PCT})(?:{_PATH_CHAR}|{_PCT})*"
    rf"|\.(?:{_PATH_CHAR_NO_DOT_SEMI}|{_PCT})(?:{_PATH_CHAR}|{_PCT})*"
    rf"|\.\.(?:{_PATH_CHAR_NO_SEMI}|{_PCT})(?:{_PATH_CHAR}|{_PCT})*)"
)
_QUERY = rf"(?:\?{_QUERY_CHAR}*)?"
_PART_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
"""The methods the multipart part pattern spells out (any token but CONNECT and TRACE is taken)."""
_PART_HEADER_NAME = (
    r"(?:[Cc]ontent-[Tt]ype|[Xx]-[AC-Zac-z0-9][A-Za-z0-9-]*|[ABDFGI-SVWYZabdfgi-svwyz][A-Za-z0-9-]*)"
)
"""Part header names the pattern offers: Content-Type, X-* but X-B*, and names not starting with
C, E, H, T, U or X (Content-Length, Expect, Host, Transfer-Encoding, TE, Upgrade, X-Batch-*: framing
and control headers); many other names are accepted too."""


def _ecma_escape(text: str) -> str:
    """`text` as a literal in an ECMA-262 (and Python) regular expression."""
    return "".join("\\" + c if c in "^$\\.*+?()[]{}|" else c for c in text)


def _caseless(word: str) -> str:
    """`word` in any letter case, as a pattern (JSON Schema patterns have no flags)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else _ecma_escape(c) for c in word)


def _route_path(route: Route) -> str:
    """The paths a route takes (routing.py `_matches`): the prefix, or below it after a `/`."""
    if route.prefix == "/":  # everything but a scheme-relative `//...`
        return rf"/(?:{_SEGMENT}(?:/{_SEGMENT}?)*)?"
    return rf"{_ecma_escape(route.prefix)}(?:/{_SEGMENT}?)*"


def _route_methods(route: Route, spelled: tuple[str, ...] | None = None) -> str | None:
    """A pattern of the methods a route takes, or None for any (`spelled` limits the choice)."""
    methods = route.methods if route.methods is not None else spelled
    if methods is None:
        return None
    return "|".join(_caseless(m) for m in methods if m.upper() not in REFUSED_ITEM_METHODS)


def target_pattern(config: GatewayConfig, route: Route | None = None) -> str:
    """An origin-form target (path and optional query) that some route (or `route`) takes."""
    routes = config.routes if route is None else (route,)
    paths = "|".join(_route_path(r) for r in routes)
    return rf"^(?:{paths}){_QUERY}$"


def json_item_schemas(config: GatewayConfig) -> list[Schema]:
    """One `SingleItem` schema per group of routes taking the same methods (usually one)."""
    groups: dict[tuple[str, ...] | None, list[Route]] = {}
    for route in config.routes:
        groups.setdefault(route.methods, []).append(route)
    return [_json_item(config, methods, routes) for methods, routes in groups.items()]


def _json_item(config: GatewayConfig, methods: tuple[str, ...] | None, routes: list[Route]) -> Schema:
    paths = "|".join(_route_path(r) for r in routes)
    method: Schema = {"type": "string", "pattern": f"^{TOKEN_PATTERN}$", "not": _refused_methods()}
    if methods is not None:
        method = {"type": "string", "pattern": f"^(?:{_route_methods(routes[0])})$"}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["method", "operation"],
        "properties": {
            "method": {**method, "description": "An HTTP method token (any case; sent upper-cased)."},
            "operation": {
                "type": "string", "pattern": rf"^(?:{paths}){_QUERY}$",
                "description": "Origin-form target (path and optional query) that a route takes.",
            },
            "body": {"description": "Sent as compact JSON; null or absent: no body.",
                     "x-max-nesting-depth": MAX_BODY_JSON_DEPTH},
            "headers": _item_headers(config),
        },
    }


def _refused_methods() -> Schema:
    words = "|".join(_caseless(m) for m in sorted(REFUSED_ITEM_METHODS))
    return {"pattern": f"^(?:{words})$"}


def _item_headers(config: GatewayConfig) -> Schema:
    refused = sorted({*FRAMING_HEADERS, *REFUSED_ITEM_HEADERS})
    value = {"type": "string", "pattern": f"^[^{CONTROL_CHARS_PATTERN[1:-1]}]*$"}
    limits = config.batch.limits
    return {
        "type": ["object", "null"],  # null, like absent: no headers of its own
        "description": (
            "Extension: this call's own headers; each replaces all outer values of that name. "
            f"At most {limits.max_part_headers} values and {limits.max_part_header_bytes} bytes "
            "(431 above)."
        ),
        "maxProperties": limits.max_part_headers,
        "propertyNames": {
            "pattern": f"^{TOKEN_PATTERN}$",
            "not": {"pattern": "^(?:" + "|".join(_caseless(n) for n in refused) + ")$"},
        },
        "additionalProperties": {"oneOf": [value, {"type": "array", "items": value}]},
    }


@functools.cache
def _seed() -> str:
    return resources.files("gateway.schemas").joinpath("seed_batch_openapi.json").read_text()


def seed_schemas() -> dict[str, Schema]:
    """The seed's component schemas, in OpenAPI 3.1 spelling (`nullable` becomes a type union)."""
    schemas: dict[str, Schema] = json.loads(_seed())["components"]["schemas"]
    return {name: _without_nullable(schema) for name, schema in schemas.items()}


def _without_nullable(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _without_nullable(v) for k, v in schema.items() if k != "nullable"}
        if schema.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(schema, list):
        return [_without_nullable(v) for v in schema]
    return schema


def batch_schemas(config: GatewayConfig) -> dict[str, Schema]:
    """The seed's shapes, extended and made exact about what the gateway accepts and answers."""
    schemas = seed_schemas()
    for variant in schemas["BatchRequest"]["oneOf"]:
        variant["additionalProperties"] = False  # unknown keys are rejected (typos would pass)
    request_list = schemas["BatchRequestList"]["allOf"][0]
    request_list["additionalProperties"] = False
    assert set(request_list["properties"]) == set(BATCH_KEYS)
    request_list["properties"]["items"]["maxItems"] = config.batch.limits.max_items
    items = json_item_schemas(config)
    seed_item = schemas["BatchRequestItem"]["allOf"][0]
    assert set(seed_item["properties"]) | {"headers"} == set(SINGLE_KEYS)
    schemas["BatchRequestItem"] = {"description": "Seed 000's item, exact about what is accepted.",
                                   **(items[0] if len(items) == 1 else {"anyOf": items})}
    schemas["BatchExecutionType"]["enum"] = [mode.value for mode in ExecutionMode]
    _limit_depth(schemas, config.batch.limits.max_depth)
    _extend_answers(schemas)
    return schemas


def _limit_depth(schemas: dict[str, Schema], max_depth: int) -> None:
    """`limits.max_depth` as schemas: the seed's recursion unrolled, one pair per nesting depth.

    The root `Batch` (BatchRequestList) is at depth 1; its items are `BatchRequestAtDepth1`, which
    may hold a `Batch` at depth 2, and so on: at `max_depth` an item can only be a `SingleItem`."""
    item, batch_list = schemas["BatchRequest"], schemas["BatchRequestList"]
    _point(batch_list, "BatchRequestAtDepth1")
    for depth in range(1, max_depth + 1):
        level = copy.deepcopy(item)
        if depth == max_depth:
            level["oneOf"] = [v for v in level["oneOf"] if "SingleItem" in v["properties"]]
        else:
            batch = next(v for v in level["oneOf"] if "Batch" in v["properties"])
            batch["properties"]["Batch"]["$ref"] = REF + f"BatchRequestListAtDepth{depth + 1}"
            nested = copy.deepcopy(batch_list)
            schemas[f"BatchRequestListAtDepth{depth + 1}"] = _point(nested, f"BatchRequestAtDepth{depth + 1}")
        level["description"] = f"An item inside a Batch nested {depth} deep (limits.max_depth {max_depth})."
        schemas[f"BatchRequestAtDepth{depth}"] = level


def _point(batch_list: Schema, items: str) -> Schema:
    batch_list["allOf"][0]["properties"]["items"]["items"]["$ref"] = REF + items
    return batch_list


def _extend_answers(schemas: dict[str, Schema]) -> None:
    extensions = {
        "batch_id": {"type": "string", "description": "Extension: the batch id (also `X-Batch-Id`)."},
        "atomic": {
            "type": "object", "required": ["outcome"],
            "description": "Extension, atomic batches only: the outcome (also `X-Batch-Outcome`).",
            "properties": {"outcome": {"$ref": REF + "BatchOutcome"}, "detail": {"type": "string"}},
        },
    }
    answer = copy.deepcopy(schemas["BatchResponse"])  # the whole answer; nested ones stay seed shapes
    for variant in answer["oneOf"]:
        variant["properties"].update(copy.deepcopy(extensions))
        variant["required"].append("batch_id")
    schemas["BatchAnswer"] = answer
    schemas["BatchOutcome"] = {"type": "string", "enum": [o.value for o in BatchOutcome]}
    schemas["RollbackStatus"] = {"type": "string", "enum": [r.value for r in RollbackStatus]}
    rollback = {"rollback": {"$ref": REF + "RollbackStatus"}, "rollback_detail": {"type": "string"}}
    result = schemas["BatchResponseObjectResult"]["allOf"][0]["properties"]
    result.update(
        body={"description": "JSON value, text or base64 text, per body_encoding; null when empty."},
        body_encoding={"type": "string", "enum": list(BODY_ENCODINGS)},
        headers={"type": "object", "description": "Upstream answer headers, lower-case names; "
                 "repeated ones as a list.", "additionalProperties": {
                     "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
        gateway_error={"type": "boolean", "description": "The gateway made this 502/504 itself."},
        maybe_executed={"type": "boolean", "description": "The call may have reached the upstream."},
        **rollback,
    )
    schemas["BatchResponseObjectSkipped"]["allOf"][0]["properties"].update(rollback)


def multipart_request_schema(config: GatewayConfig) -> Schema:
    """The ordered parts, each a whole HTTP/1.1 request (OpenAPI 3.2's positional multipart)."""
    alternatives = "|".join(
        f"(?:{_route_methods(r, _PART_METHODS)}) (?:{_route_path(r)}){_QUERY}" for r in config.routes
    )
    head = rf"(?:{alternatives}) HTTP/1\.[01]\r\n(?:{_PART_HEADER_NAME}: ?[\x20-\x7e]*\r\n){{0,8}}\r\n"
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": config.batch.limits.max_items,
        "description": (
            f"The body parts in order, each `Content-Type: {PART_MEDIA_TYPE}` (an optional "
            "`Content-ID: <X>` is answered as `<response-X>`). The pattern offers routed targets "
            "and common methods; any method token but CONNECT and TRACE, and any header but "
            "Content-Length/Transfer-Encoding conflicts and the control headers, is accepted."
        ),
        "items": {
            "type": "string",
            "contentMediaType": PART_MEDIA_TYPE,
            "pattern": rf"^{head}[\x20-\x7e\t\r\n]*$",
        },
    }


MULTIPART_BOUNDARY = {
    "required": True,
    "pattern": f"^{BOUNDARY_PATTERN}$",
    "description": "The Content-Type's boundary parameter (RFC 2046: 1-70 characters).",
}
