"""RFC 9457 problem+json: the one place a GatewayError becomes an HTTP error response body.

Pure: returns bytes and a status; the app wraps them in an aiohttp response.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import GatewayError

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://batch-gateway.dev/problems/"


def problem_type(type_suffix: str) -> str:
    """The `type` URI of a problem: a stable identifier, each documented in the README's
    "Problem types" section and in the OpenAPI document's `x-problem-types`."""
    return _TYPE_BASE + type_suffix


def problem_document(error: GatewayError, *, request_id: str, instance: str) -> dict[str, Any]:
    """The problem object: type, title, status, detail, where (pointer/part) and the request id."""
    doc: dict[str, Any] = {
        "type": problem_type(error.type_suffix),
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "instance": instance,
        "request_id": request_id,
    }
    if error.where is not None:
        doc["where"] = error.where
        if error.where.startswith("/"):
            doc["pointer"] = error.where
    return doc


def problem_body(error: GatewayError, *, request_id: str, instance: str) -> bytes:
    doc = problem_document(error, request_id=request_id, instance=instance)
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")
