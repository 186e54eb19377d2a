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


# --- the dialects' cross-item rules (`x-batch-rules`: no JSON Schema states them) -------------------


@schemathesis.hook
def map_case(ctx: Any, case: Any) -> Any:
    """A schema-valid dialect batch made to obey its operation's `x-batch-rules` (unique ids, earlier
    dependencies only, adjacent groups, no reference to an unknown request), so that the positive
    checks test what the schema can promise. Negative cases are left as generated."""
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return case
    repair = _REPAIRS.get(case.operation.definition.raw.get("operationId"))
    if repair is not None:
        repair(case.body)
    return case


def _unique(name: str, taken: Any, n: int, sep: str) -> str:
    while name in taken:
        name = f"{name}{sep}{n}"
    return name


def _graph_rules(body: dict[str, Any]) -> None:
    seen: dict[str, str] = {}  # casefolded id -> id
    for n, item in enumerate(body.get("requests") or []):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        for key in ("dependsOn", "depends_on"):
            if isinstance(item.get(key), list):
                item[key] = [seen[x.casefold()] for x in item[key]
                             if isinstance(x, str) and x.casefold() in seen]
        name = item["id"]
        while name.casefold() in seen:
            name = f"{name}~{n}"
        item["id"] = name
        seen[name.casefold()] = name


def _without_references(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("@{", "@ {")
    if isinstance(value, list):
        return [_without_references(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_references(v) for k, v in value.items()}
    return value


def _composite_rules(body: dict[str, Any]) -> None:
    seen: set[str] = set()
    for n, item in enumerate(body.get("compositeRequest") or []):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("referenceId"), str):
            item["referenceId"] = _unique(item["referenceId"], seen, n, "_")
            seen.add(item["referenceId"])
        if "body" in item:
            item["body"] = _without_references(item["body"])


def _odata_rules(body: dict[str, Any]) -> None:
    ids: set[str] = set()
    group_of: dict[str, str] = {}
    groups: set[str] = set()
    last: str | None = None
    for n, item in enumerate(body.get("requests") or []):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        item_id = _unique(item["id"], ids | groups, n, "-")
        group = item.get("atomicityGroup") if isinstance(item.get("atomicityGroup"), str) else None
        if group is not None:
            while group in ids or group == item_id or (group != last and group in groups):
                group = f"{group}-{n}"  # a closed group's name would make its members non-adjacent
            item["atomicityGroup"] = group
        last = group
        if isinstance(item.get("dependsOn"), list):
            item["dependsOn"] = [
                x for x in item["dependsOn"]
                if (x in groups and x != group) or (x in ids and group_of.get(x) in (None, group))
            ]
        if isinstance(item.get("headers"), dict):  # names are case-insensitive: once each
            once: dict[str, tuple[str, Any]] = {}
            for name, value in item["headers"].items():
                once.setdefault(name.lower(), (name, value))
            item["headers"] = dict(once.values())
        item["id"] = item_id
        ids.add(item_id)
        if group is not None:
            group_of[item_id] = group
            groups.add(group)


_REPAIRS = {"GraphBatch": _graph_rules, "CompositeBatch": _composite_rules, "ODataBatch": _odata_rules}
