"""The JSON batch wire format of seed 000 (`POST /batch/v1`): bytes to the model and a report back.

Owns strict JSON parsing, the limits checkable on the document, and the json/text/base64 body rules.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterator
from itertools import accumulate

from gateway.errors import HeadersTooLarge, MalformedBatch, PayloadTooLarge
from gateway.model import (
    Batch,
    BatchLimits,
    BatchReport,
    CallFailure,
    ExecutionMode,
    Headers,
    Item,
    ItemResult,
    ResultNode,
    Skipped,
    SubRequest,
    SubResponse,
)

__all__ = ["JsonBatchCodec"]

ROOT = "/"
"""The pointer of the whole document (RFC 6901 spells it "", which reads badly in an error)."""

MAX_BODY_JSON_DEPTH = 128
"""How deep a sub-request's JSON `body` may nest, on top of the batch structure around it."""

MAX_JSON_DEPTH = 512
"""Hard cap on the nesting of any document the codec parses, far below Python's recursion limit."""

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_BRACKET_STEP = [1 if byte in b"[{" else -1 for byte in range(256)]
_FORBIDDEN_IN_VALUES = re.compile(r"[\r\n\x00]")
_MISSING = object()

_ITEM_KEYS = ("SingleItem", "Batch")
_SINGLE_KEYS = ("method", "operation", "body", "headers")
_BATCH_KEYS = ("batch_execution_type", "items")
_MODES = {mode.value: mode for mode in ExecutionMode}
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
"""The codec builds the body bytes itself, so a client's framing headers could only be wrong."""

_TEXT_TYPES = frozenset(
    {
        "application/xml",
        "application/javascript",
        "application/ecmascript",
        "application/x-www-form-urlencoded",
        "application/yaml",
        "application/x-yaml",
        "application/x-ndjson",
        "application/graphql",
        "application/sql",
    }
)
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


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
            raise PayloadTooLarge(detail, where=ROOT)
        document = _parse_document(body, self._max_json_depth)
        return _Reader(self.limits).item(document, ROOT, depth=0)

    def encode(self, report: BatchReport) -> bytes:
        """The answer: the result tree in the request's shape, plus the batch's identity."""
        document = _encode_node(report.root)
        document["batch_id"] = report.batch_id
        if report.atomic_outcome is not None:
            atomic: dict[str, object] = {"outcome": report.atomic_outcome.value}
            if report.outcome_detail:
                atomic["detail"] = report.outcome_detail
            document["atomic"] = atomic
        for key, value in report.extra.items():
            document.setdefault(key, value)
        return _dump(document)


# --- Strict JSON --------------------------------------------------------------------------------


class _NotJson(Exception):
    """Raised by the parse hooks and `_loads`; the caller decides what it means."""


class _DuplicateKeys(dict[str, object]):
    """An object in which a key appeared more than once, remembered so an error can point at it."""

    def __init__(self, pairs: dict[str, object], key: str) -> None:
        super().__init__(pairs)
        self.duplicate = key


def _reject_constant(name: str) -> object:
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotJson(f"the number {text[:40]} is too large to represent")
    return value


def _nesting_depth(data: bytes, limit: int) -> int:
    """How deep brackets outside strings nest; 0 when there are too few brackets to pass `limit`.

    Scans bytes: in UTF-8 the quote, backslash and brackets never occur inside a multi-byte char.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return 0
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets), initial=0))


def _loads(text: str) -> tuple[object, bool]:
    """Strict RFC 8259 JSON (no NaN, no overflowing numbers); also says whether a key repeated."""
    repeated: list[str] = []

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        key = _first_repeated(pairs)
        repeated.append(key)
        return _DuplicateKeys(obj, key)

    try:
        value = json.loads(
            text,
            object_pairs_hook=pairs_hook,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        raise _NotJson(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise _NotJson("a number has too many digits") from None
    except RecursionError:  # pre-empted by `_nesting_depth`; kept so it can never escape
        raise _NotJson("it is nested too deep") from None
    return value, bool(repeated)


def _first_repeated(pairs: list[tuple[str, object]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""


def _find_duplicate(value: object, where: str) -> tuple[str, str] | None:
    """The pointer and key of the first object (document order) that repeats a key."""
    if isinstance(value, _DuplicateKeys):
        return where, value.duplicate
    children: Iterator[tuple[str | int, object]]
    if isinstance(value, dict):
        children = iter(value.items())
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return None
    for token, child in children:
        found = _find_duplicate(child, _child(where, token))
        if found is not None:
            return found
    return None


def _parse_document(body: bytes, max_depth: int) -> object:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"Body is not valid UTF-8 (byte {exc.start}). Send the batch as UTF-8 JSON."
        raise MalformedBatch(detail, where=ROOT) from None
    if not text.strip():
        raise MalformedBatch(f"Body is empty. Expected {_ITEM_FORM}.", where=ROOT)
    depth = _nesting_depth(body, max_depth)
    if depth > max_depth:
        detail = f"JSON nested {depth} levels deep. Maximum nesting is {max_depth} levels."
        raise MalformedBatch(detail, where=ROOT)
    try:
        document, repeated = _loads(text)
    except _NotJson as exc:
        raise MalformedBatch(f"Body is not valid JSON: {exc}.", where=ROOT) from None
    duplicate = _find_duplicate(document, ROOT) if repeated else None
    if duplicate is not None:
        where, key = duplicate
        detail = f"Duplicate key {_show(key)}. Each key may appear only once in an object."
        raise MalformedBatch(detail, where=where)
    return document


# --- Decoding the request -----------------------------------------------------------------------

_ITEM_FORM = '{"SingleItem": {...}} or {"Batch": {...}}'
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
            raise PayloadTooLarge(detail, where=where)
        expected = 'SingleItem must be an object with "method" and "operation"'
        obj = _expect_object(value, where, expected)
        _reject_unknown_keys(obj, _SINGLE_KEYS, where, _expected_keys("SingleItem", _SINGLE_KEYS))
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
            raise MalformedBatch(detail, where=where)
        expected = 'Batch must be an object with "batch_execution_type" and "items"'
        obj = _expect_object(value, where, expected)
        _reject_unknown_keys(obj, _BATCH_KEYS, where, _expected_keys("Batch", _BATCH_KEYS))
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
        raise HeadersTooLarge(detail, where=where)
    size = sum(len(name) + len(text.encode("utf-8")) + 4 for name, text in pairs)  # "N: v\r\n"
    if size > limits.max_part_header_bytes:
        detail = f"Headers too large. Maximum size is {limits.max_part_header_bytes} bytes."
        raise HeadersTooLarge(detail, where=where)
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


def _invalid(field: str, value: object, expected: str, where: str) -> MalformedBatch:
    if value is _MISSING:
        return MalformedBatch(f'Missing "{field}": expected {expected}.', where=where)
    return MalformedBatch(f'"{field}" must be {expected}; got {_show(value)}.', where=where)


def _show(value: object) -> str:
    """A short, ASCII-safe rendering of a client's value for an error message."""
    if isinstance(value, dict):
        return "an object" if value else "an empty object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str) and len(value) > 40:
        return json.dumps(value[:40]) + "..."
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _child(pointer: str, token: str | int) -> str:
    """RFC 6901 pointer of a member or element; unencodable characters are shown escaped."""
    text = str(token).encode("utf-8", "backslashreplace").decode("utf-8")
    escaped = text.replace("~", "~0").replace("/", "~1")
    return f"/{escaped}" if pointer == ROOT else f"{pointer}/{escaped}"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- Encoding the report ------------------------------------------------------------------------


def _encode_node(node: ResultNode) -> dict[str, object]:
    if isinstance(node, ItemResult):
        return {"SingleItem": _encode_item(node)}
    return {"Batch": {"items": [_encode_node(child) for child in node.items]}}


def _encode_item(item: ItemResult) -> dict[str, object]:
    outcome = item.outcome
    key = "Skipped" if isinstance(outcome, Skipped) else "Result"
    if isinstance(outcome, Skipped):
        fields: dict[str, object] = {"reason": outcome.reason}
    elif isinstance(outcome, CallFailure):
        fields = _failure_fields(outcome)
    else:
        fields = _response_fields(outcome)
    if item.rollback is not None:
        fields["rollback"] = item.rollback.value
        if item.rollback_detail:
            fields["rollback_detail"] = item.rollback_detail
    return {key: fields}


def _response_fields(response: SubResponse) -> dict[str, object]:
    body, encoding = _encode_body(response.body, response.headers)
    return {
        "status": response.status,
        "body": body,
        "body_encoding": encoding,
        "headers": _encode_headers(response.headers),
    }


def _failure_fields(failure: CallFailure) -> dict[str, object]:
    fields: dict[str, object] = {
        "status": failure.status,
        "body": {"error": failure.reason},
        "body_encoding": "json",
        "gateway_error": True,
    }
    if failure.maybe_executed:
        fields["maybe_executed"] = True
    return fields


def _encode_headers(headers: Headers) -> dict[str, str | list[str]]:
    """Lowercase name -> value, or -> list of values in order when the header repeats."""
    grouped: dict[str, list[str]] = {}
    for name, value in headers:
        grouped.setdefault(name.lower(), []).append(value)
    return {name: values[0] if len(values) == 1 else values for name, values in grouped.items()}


def _encode_body(body: bytes, headers: Headers) -> tuple[object, str]:
    """The body as JSON value, text or base64, and which one it is (`body_encoding`).

    JSON: a JSON media type (application/json, */*+json) whose bytes parse as strict JSON.
    Text: valid UTF-8 whose type is absent, text/*, a JSON type that did not parse, */*+xml, or one
    of `_TEXT_TYPES`, and whose charset (if given) is UTF-8 or ASCII. Everything else, including
    application/octet-stream, images and unknown vendor types, is base64: lossless when in doubt.
    """
    if not body:
        return None, "empty"
    media_type, charset = _content_type(headers)
    if _is_json_type(media_type):
        value = _json_body(body)
        if value is not _MISSING:
            return value, "json"
    if _is_text_type(media_type) and (charset is None or charset in _UTF8_CHARSETS):
        try:
            return body.decode("utf-8"), "text"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode("ascii"), "base64"


def _content_type(headers: Headers) -> tuple[str | None, str | None]:
    """The first Content-Type's media type and charset, lowercased; None when absent or empty."""
    value = next((value for name, value in headers if name.lower() == "content-type"), "")
    media_type, *params = (part.strip().lower() for part in value.split(";"))
    charsets = [param[8:].strip('"') for param in params if param.startswith("charset=")]
    return media_type or None, charsets[0] if charsets else None


def _is_json_type(media_type: str | None) -> bool:
    return media_type is not None and (
        media_type == "application/json" or media_type.endswith("+json")
    )


def _is_text_type(media_type: str | None) -> bool:
    if media_type is None or media_type.startswith("text/") or _is_json_type(media_type):
        return True
    return media_type in _TEXT_TYPES or media_type.endswith("+xml")


def _json_body(body: bytes) -> object:
    """The parsed upstream body, or `_MISSING` when it is not strict, unambiguous, shallow JSON."""
    try:
        text = body.decode("utf-8")
        if _nesting_depth(body, MAX_JSON_DEPTH // 2) > MAX_JSON_DEPTH // 2:
            return _MISSING
        value, repeated = _loads(text)
    except (UnicodeDecodeError, _NotJson):
        return _MISSING
    return _MISSING if repeated else value


def _dump(document: dict[str, object]) -> bytes:
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (an upstream's "\ud800" escape, a surrogate-escaped header byte) has no
        # UTF-8 form; it becomes U+FFFD rather than failing the whole batch's answer.
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")
