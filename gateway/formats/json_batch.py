"""The JSON batch wire format of seed 000 (`POST /batch/v1`): bytes to the model and a report back.

Owns the codec, the request document's shape and fields, and the limits checkable on the document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from gateway.errors import HeadersTooLarge, MalformedBatch, PayloadTooLarge
from gateway.formats._json_results import iter_document
from gateway.formats._strict_json import (
    _ITEM_FORM,
    _MISSING,
    MAX_JSON_DEPTH,
    ROOT,
    _child,
    _parse_document,
    _show,
)
from gateway.model import (
    Batch,
    BatchLimits,
    BatchReport,
    ExecutionMode,
    Headers,
    Item,
    ItemResult,
    SubRequest,
)

__all__ = ["JsonBatchCodec"]

MAX_BODY_JSON_DEPTH = 128
"""How deep a sub-request's JSON `body` may nest, on top of the batch structure around it."""

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_IN_VALUES = re.compile(r"[\r\n\x00]")

_ITEM_KEYS = ("SingleItem", "Batch")
_SINGLE_KEYS = ("method", "operation", "body", "headers")
_BATCH_KEYS = ("batch_execution_type", "items")
_MODES = {mode.value: mode for mode in ExecutionMode}
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
"""The codec builds the body bytes itself, so a client's framing headers could only be wrong."""

# Public for gateway/openapi.py, which documents the accepted shapes from these (one source of truth).
TOKEN_PATTERN = _TOKEN.pattern
"""What `method` and a `headers` name must be: an RFC 9110 token."""
FORBIDDEN_IN_VALUES_PATTERN = _FORBIDDEN_IN_VALUES.pattern
"""Characters never allowed in `operation` or a header value."""
ITEM_KEYS, SINGLE_KEYS, BATCH_KEYS = _ITEM_KEYS, _SINGLE_KEYS, _BATCH_KEYS
FRAMING_HEADERS = _FRAMING_HEADERS


DEFAULT_LIMITS = BatchLimits()


class JsonBatchCodec:
    """Decodes a JSON batch request into the neutral model and encodes a report as its answer."""

    media_type = "application/json"

    def __init__(self, limits: BatchLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._max_json_depth = min(MAX_BODY_JSON_DEPTH + 3 * limits.max_depth + 2, MAX_JSON_DEPTH)

    def decode(self, body: bytes) -> Item:
        """Parse and validate a whole request body; a ClientError says where it is wrong."""
        if len(body) > self.limits.max_body_bytes:
            detail = f"Body too large. Maximum body size is {self.limits.max_body_bytes} bytes."
            raise PayloadTooLarge(detail, where=ROOT, limit="limits.max_body_bytes")
        document = _parse_document(body, self._max_json_depth)
        return _Reader(self.limits).item(document, ROOT, depth=0)

    def encode(self, report: BatchReport) -> bytes:
        """The answer: the result tree in the request's shape, plus the batch's identity."""
        return b"".join(self.encode_chunks(report))

    def encode_chunks(self, report: BatchReport) -> Iterator[bytes]:
        """The answer's bytes in chunks, encoded item by item (see `encode`)."""
        root_key = "SingleItem" if isinstance(report.root, ItemResult) else "Batch"
        tail: dict[str, object] = {root_key: None, "batch_id": report.batch_id}
        if report.atomic_outcome is not None:
            atomic: dict[str, object] = {"outcome": report.atomic_outcome.value}
            if report.outcome_detail:
                atomic["detail"] = report.outcome_detail
            tail["atomic"] = atomic
        for key, value in report.extra.items():
            tail.setdefault(key, value)
        del tail[root_key]  # the result tree's own key is never replaced
        return iter_document(report.root, tail)


# --- Decoding the request -----------------------------------------------------------------------

_METHOD_FORM = 'a non-empty HTTP method token such as "GET" or "POST"'
_OPERATION_FORM = 'a non-empty string: the target path with optional query, such as "/v1/keys?x=1"'
_MODE_FORM = '"Serial" or "Unordered"'
_ITEMS_FORM = "an array of batch request items (it may be empty)"
_HEADERS_FORM = 'an object of header name to string or list of strings, such as {"X-A": "1"}'


class _Reader:
    """Walks one parsed document into model items, counting calls against the limits."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self.calls = 0

    def item(self, value: object, where: str, depth: int) -> Item:
        """A BatchRequest: an object with exactly one key, `SingleItem` or `Batch`."""
        obj = _expect_object(value, where, f"A batch request item must be {_ITEM_FORM}")
        _reject_unknown_keys(obj, _ITEM_KEYS, where, f"expected exactly one key of {_ITEM_FORM}")
        if len(obj) != 1:
            got = "both keys" if obj else "an empty object"
            detail = f"Expected exactly one key of {_ITEM_FORM}; got {got}."
            raise MalformedBatch(detail, where=where)
        if "SingleItem" in obj:
            return self.single(obj["SingleItem"], _child(where, "SingleItem"))
        return self.batch(obj["Batch"], _child(where, "Batch"), depth + 1)

    def single(self, value: object, where: str) -> SubRequest:
        self.calls += 1
        if self.calls > self.limits.max_items:
            detail = f"Too many items. Maximum number of items is {self.limits.max_items}."
            raise PayloadTooLarge(detail, where=where, limit="limits.max_items")
        expected = 'SingleItem must be an object with "method" and "operation"'
        obj = _expect_object(value, where, expected)
        _reject_unknown_keys(obj, _SINGLE_KEYS, where, _SINGLE_EXPECTED)
        method = _method(obj.get("method", _MISSING), _child(where, "method"))
        target = _operation(obj.get("operation", _MISSING), _child(where, "operation"))
        headers = _headers(obj.get("headers"), _child(where, "headers"), self.limits)
        body = _body(obj.get("body"), _child(where, "body"))
        if body is not None and not any(name.lower() == "content-type" for name, _ in headers):
            headers += (("Content-Type", "application/json"),)
        return SubRequest(method=method, target=target, headers=headers, body=body, where=where)

    def batch(self, value: object, where: str, depth: int) -> Batch:
        if depth > self.limits.max_depth:
            detail = f"Batches nested too deep. Maximum nesting depth is {self.limits.max_depth}."
            raise MalformedBatch(detail, where=where, limit="limits.max_depth")
        expected = 'Batch must be an object with "batch_execution_type" and "items"'
        obj = _expect_object(value, where, expected)
        _reject_unknown_keys(obj, _BATCH_KEYS, where, _BATCH_EXPECTED)
        mode_where = _child(where, "batch_execution_type")
        mode = _mode(obj.get("batch_execution_type", _MISSING), mode_where)
        items_where = _child(where, "items")
        items = obj.get("items", _MISSING)
        if not isinstance(items, list):
            raise _invalid("items", items, _ITEMS_FORM, items_where)
        children = tuple(
            self.item(child, _child(items_where, index), depth) for index, child in enumerate(items)
        )
        return Batch(mode=mode, items=children, where=where)


def _method(value: object, where: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise _invalid("method", value, _METHOD_FORM, where)
    return value.upper()


def _operation(value: object, where: str) -> str:
    """Only the type is checked here; whether the target is allowed is the planner's question."""
    if not isinstance(value, str) or not value:
        raise _invalid("operation", value, _OPERATION_FORM, where)
    if _FORBIDDEN_IN_VALUES.search(value) or not _is_utf8(value):
        shown = _show(value)
        detail = f'"operation" must not contain CR, LF, NUL or unpaired surrogates; got {shown}.'
        raise MalformedBatch(detail, where=where)
    return value


def _mode(value: object, where: str) -> ExecutionMode:
    if not isinstance(value, str) or value not in _MODES:
        raise _invalid("batch_execution_type", value, _MODE_FORM, where)
    return _MODES[value]


def _body(value: object, where: str) -> bytes | None:
    """`null` or absent: no body; any other JSON value is sent as compact UTF-8 JSON."""
    if value is None:
        return None
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        detail = "body holds an unpaired UTF-16 surrogate escape, which has no UTF-8 form."
        raise MalformedBatch(detail, where=where) from None


def _headers(value: object, where: str, limits: BatchLimits) -> Headers:
    """The `headers` extension: name -> string or list of strings; a list repeats the header."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _invalid("headers", value, _HEADERS_FORM, where)
    pairs = tuple(
        pair for name, values in value.items() for pair in _header_pairs(name, values, where)
    )
    if len(pairs) > limits.max_part_headers:
        detail = f"Too many headers. Maximum number of headers is {limits.max_part_headers}."
        raise HeadersTooLarge(detail, where=where, limit="limits.max_part_headers")
    size = sum(len(name) + len(text.encode("utf-8")) + 4 for name, text in pairs)  # "N: v\r\n"
    if size > limits.max_part_header_bytes:
        detail = f"Headers too large. Maximum size is {limits.max_part_header_bytes} bytes."
        raise HeadersTooLarge(detail, where=where, limit="limits.max_part_header_bytes")
    return pairs


def _header_pairs(name: str, value: object, headers_where: str) -> list[tuple[str, str]]:
    where = _child(headers_where, name)
    if not _TOKEN.fullmatch(name):
        shown = _show(name)
        detail = f"Header name {shown} is not an HTTP token (letters, digits, !#$%&'*+-.^_`|~)."
        raise MalformedBatch(detail, where=where)
    if name.lower() in _FRAMING_HEADERS:
        detail = f"Header {name} is not allowed: the gateway frames the body itself."
        raise MalformedBatch(detail, where=where)
    if isinstance(value, list):
        return [(name, _header_value(name, item, _child(where, i))) for i, item in enumerate(value)]
    return [(name, _header_value(name, value, where))]


def _header_value(name: str, value: object, where: str) -> str:
    if not isinstance(value, str):
        detail = f"Header {name} must be a string or a list of strings; got {_show(value)}."
        raise MalformedBatch(detail, where=where)
    if _FORBIDDEN_IN_VALUES.search(value) or not _is_utf8(value):
        detail = f"Header {name} value must not contain CR, LF, NUL or unpaired surrogates."
        raise MalformedBatch(detail, where=where)
    return value


def _expect_object(value: object, where: str, expected: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise MalformedBatch(f"{expected}; got {_show(value)}.", where=where)
    return value


def _reject_unknown_keys(
    obj: dict[str, object], known: tuple[str, ...], where: str, expected: str
) -> None:
    unknown = next((key for key in obj if key not in known), None)
    if unknown is not None:
        detail = f"Unknown key {_show(unknown)}: {expected}."
        raise MalformedBatch(detail, where=_child(where, unknown))


def _expected_keys(owner: str, keys: tuple[str, ...]) -> str:
    return f"{owner} takes only " + ", ".join(f'"{key}"' for key in keys)


_SINGLE_EXPECTED = _expected_keys("SingleItem", _SINGLE_KEYS)
_BATCH_EXPECTED = _expected_keys("Batch", _BATCH_KEYS)


def _invalid(field: str, value: object, expected: str, where: str) -> MalformedBatch:
    if value is _MISSING:
        return MalformedBatch(f'Missing "{field}": expected {expected}.', where=where)
    return MalformedBatch(f'"{field}" must be {expected}; got {_show(value)}.', where=where)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
