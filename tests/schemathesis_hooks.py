"""Schemathesis hooks for the gateway's document: how a multipart/mixed batch goes on the wire.

Load with `SCHEMATHESIS_HOOKS=tests.schemathesis_hooks` (CLI) or by importing it (tests).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import schemathesis
from schemathesis.transport import SerializationContext, register_serializer

PART_MEDIA_TYPE = "application/http"


def _part_bytes(part: object) -> bytes:
    text = part if isinstance(part, str) else json.dumps(part)
    return text.encode("utf-8", "surrogatepass")


def _boundary(parts: list[bytes]) -> str:
    """A boundary found in no part (RFC 2046 requires it), derived from the parts: reproducible."""
    seed = hashlib.sha256(b"".join(parts)).hexdigest()
    for length in range(24, 65, 8):
        boundary = f"batch{seed[:length]}"
        if not any(boundary.encode() in part for part in parts):
            return boundary
    raise AssertionError("no boundary")  # a SHA-256 prefix inside a generated part: never seen


def serialize_multipart_mixed(ctx: SerializationContext, value: Any) -> dict[str, Any]:
    """OpenAPI 3.2's positional multipart: the document's array items are the parts, in order,
    each `Content-Type: application/http`. Anything but an array is one part (negative tests)."""
    parts = [_part_bytes(p) for p in (value if isinstance(value, list) else [value])]
    boundary = _boundary(parts)
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {PART_MEDIA_TYPE}\r\nContent-ID: <{n}>\r\n\r\n".encode()
        + part + b"\r\n"
        for n, part in enumerate(parts, 1)
    ) + f"--{boundary}--\r\n".encode()
    return {"data": body, "headers": {"Content-Type": f"multipart/mixed; boundary={boundary}"}}


register_serializer(serialize_multipart_mixed, "multipart/mixed")


def multipart_parts(body: bytes, content_type: str) -> list[str]:
    """The parts' bodies of a multipart/mixed answer, in order (the document's array items)."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"')
    sections = body.split(b"--" + boundary.encode())[1:-1]  # before the first: the preamble
    parts = []
    for section in sections:
        _, _, content = section.partition(b"\r\n\r\n")  # after the part headers
        parts.append(content.removesuffix(b"\r\n").decode("utf-8", "replace"))
    return parts


@schemathesis.deserializer("multipart/mixed")
def deserialize_multipart_mixed(ctx: Any, response: Any) -> list[str]:
    content_type = response.headers.get("content-type") or response.headers.get("Content-Type")
    if isinstance(content_type, list):
        content_type = content_type[0]
    return multipart_parts(response.content, content_type)
