"""Encoding a BatchReport's result tree into the JSON BatchResponse document and its bytes.

Owns the json/text/base64 body rules (from Content-Type and charset) and the header grouping.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator

from gateway.formats._strict_json import _MISSING, MAX_JSON_DEPTH, _loads, _nesting_depth, _NotJson
from gateway.headers import without_hop_by_hop
from gateway.model import (
    BatchResult,
    CallFailure,
    Headers,
    ItemResult,
    ResultNode,
    Skipped,
    SubResponse,
)

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
BODY_ENCODINGS = ("json", "text", "base64", "empty")
"""The values of a Result's `body_encoding` (see `_encode_body`); documented by gateway/openapi.py."""


def _encode_node(node: ResultNode) -> dict[str, object]:
    if isinstance(node, ItemResult):
        return {"SingleItem": _encode_item(node)}
    return {"Batch": {"items": [_encode_node(child) for child in node.items]}}


def _encode_item(item: ItemResult, body: tuple[object, str] | None = None) -> dict[str, object]:
    """The item's `{"Result": ...}` or `{"Skipped": ...}`; `body` is its response body as already
    encoded (value, body_encoding), when the caller has it."""
    outcome = item.outcome
    key = "Skipped" if isinstance(outcome, Skipped) else "Result"
    if isinstance(outcome, Skipped):
        fields: dict[str, object] = {"reason": outcome.reason}
    elif isinstance(outcome, CallFailure):
        fields = _failure_fields(outcome)
    else:
        fields = _response_fields(outcome, body)
    if item.rollback is not None:
        fields["rollback"] = item.rollback.value
        if item.rollback_detail:
            fields["rollback_detail"] = item.rollback_detail
    return {key: fields}


def _response_fields(response: SubResponse, encoded: tuple[object, str] | None = None) -> dict[str, object]:
    body, encoding = encoded or _encode_body(response.body, response.headers)
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
    """Lowercase name -> value, or -> list of values in order when the header repeats; without
    hop-by-hop headers (the same rule as multipart answers and the proxy)."""
    grouped: dict[str, list[str]] = {}
    for name, value in without_hop_by_hop(headers):
        grouped.setdefault(name.lower(), []).append(value)
    return {name: values[0] if len(values) == 1 else values for name, values in grouped.items()}


def _encode_body(body: bytes, headers: Headers) -> tuple[object, str]:
    """The body as JSON value, text or base64, and which one it is (`body_encoding`).

    JSON: a JSON media type (application/json, */*+json) whose bytes parse as strict JSON.
    Text: valid UTF-8 whose type is absent, text/*, a JSON type that did not parse, */*+xml, or one
    of `_TEXT_TYPES`, and whose charset (if given) is UTF-8 or ASCII. Everything else, including
    application/octet-stream, images and unknown vendor types, is base64: lossless when in doubt.
    """
    return _encode_unless_base64(body, headers) or (base64.b64encode(body).decode("ascii"), "base64")


def _encode_unless_base64(body: bytes, headers: Headers) -> tuple[object, str] | None:
    """`_encode_body`'s answer when it is not base64; None when the body goes out as base64."""
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
    return None


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


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
"""One encoder for every answer (json.dumps with options builds a new one per call)."""


def _dump(document: dict[str, object]) -> bytes:
    text = _ENCODER.encode(document)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (an upstream's "\ud800" escape, a surrogate-escaped header byte) has no
        # UTF-8 form; it becomes U+FFFD rather than failing the whole batch's answer.
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")


_CHUNK = 64 * 1024


def _dumps(value: object) -> str:
    return _ENCODER.encode(value)


def iter_document(root: ResultNode, tail: dict[str, object]) -> Iterator[bytes]:
    """The same bytes as `_dump({**_encode_node(root), **tail})`, item by item, in ~64 KiB chunks.

    Only one item's encoding exists at a time, so an answer is never built twice in memory.
    """
    return chunked(_iter_pieces(root, tail))


def chunked(pieces: Iterable[str]) -> Iterator[bytes]:
    """A document's text pieces as UTF-8 in ~64 KiB chunks (a big piece on its own, uncopied)."""
    pending: list[str] = []
    size = 0
    for piece in pieces:
        if len(piece) >= _CHUNK:  # a big body: no extra copy through the pending buffer
            if pending:
                yield _utf8("".join(pending))
                pending, size = [], 0
            yield _utf8(piece)
            continue
        pending.append(piece)
        size += len(piece)
        if size >= _CHUNK:
            yield _utf8("".join(pending))
            pending, size = [], 0
    if pending:
        yield _utf8("".join(pending))


def _iter_pieces(root: ResultNode, tail: dict[str, object]) -> Iterator[str]:
    """The document's text in pieces: one per item (and per nested batch's brackets), the tail
    keys inside the root object's closing brace."""
    end = "".join("," + _dumps(key) + ":" + _dumps(value) for key, value in tail.items()) + "}"
    if isinstance(root, ItemResult):
        yield from _iter_item(root, "", end)
        return
    yield '{"Batch":{"items":['
    yield from _iter_items(root)
    yield "]}" + end


def _iter_node(node: ResultNode) -> Iterator[str]:
    """A node that is not the root, as it appears in its batch's `items`."""
    if isinstance(node, ItemResult):
        yield from _iter_item(node, "", "}")
        return
    assert isinstance(node, BatchResult)
    yield '{"Batch":{"items":['
    yield from _iter_items(node)
    yield "]}}"


def _iter_items(batch: BatchResult) -> Iterator[str]:
    """A batch's items, comma-separated: one piece per item (a generator per nested batch only)."""
    for index, child in enumerate(batch.items):
        if isinstance(child, ItemResult):
            yield from _iter_item(child, "," if index else "", "}")
            continue
        if index:
            yield ","
        yield from _iter_node(child)


_BASE64_SLICE = 48 * 1024
"""Raw bytes per piece of a streamed base64 body (a multiple of 3, so the pieces join exactly)."""


def _iter_item(item: ItemResult, before: str, after: str) -> Iterator[str]:
    """`before + '{"SingleItem":' + <the item> + after`: one piece, or, for a big base64 body,
    the body in ~64 KiB pieces encoded straight from the upstream's bytes.

    A 10 MB body would otherwise exist four more times while its item is encoded (its base64,
    the item's JSON, the concatenation, its UTF-8); streamed, only the upstream's bytes are held.
    """
    outcome = item.outcome
    if isinstance(outcome, SubResponse) and len(outcome.body) >= _BASE64_SLICE:
        textual = _encode_unless_base64(outcome.body, outcome.headers)
        if textual is not None:
            yield before + '{"SingleItem":' + _dumps(_encode_item(item, textual)) + after
            return
        text = _dumps(_encode_item(item, ("", "base64")))
        opening = '{"Result":{"status":' + str(outcome.status) + ',"body":"'
        assert text.startswith(opening + '"'), text[:80]
        yield before + '{"SingleItem":' + opening
        body = memoryview(outcome.body)
        for start in range(0, len(body), _BASE64_SLICE):
            yield base64.b64encode(body[start:start + _BASE64_SLICE]).decode("ascii")
        yield text[len(opening):] + after
        return
    yield before + '{"SingleItem":' + _dumps(_encode_item(item)) + after


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: U+FFFD, as _dump does
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")
