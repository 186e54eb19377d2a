"""The multipart/mixed batch format (seed 003): request bytes to a Batch, a BatchReport to bytes.

Owns RFC 2046 framing and the part headers; each part's HTTP/1.1 message is handled by `_http1`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from gateway.errors import HeadersTooLarge, MalformedBatch, PayloadTooLarge, UnsupportedMediaType
from gateway.formats._http1 import HeadLimits, header_block, one_line, parse_request, response_pieces
from gateway.model import (
    Batch,
    BatchLimits,
    BatchReport,
    CallFailure,
    ExecutionMode,
    ItemResult,
    Outcome,
    ResultNode,
    SubRequest,
    SubResponse,
)

__all__ = ["MultipartBatchCodec"]

_DEFAULT_LIMITS = BatchLimits()

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*')
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_TOKEN_RE = re.compile(_TOKEN)
_CONTENT_TYPE = "Content-Type"
_BATCH = "body"

# Public for gateway/openapi.py, which documents the accepted request from these.
MEDIA_TYPE = "multipart/mixed"
PART_MEDIA_TYPE = "application/http"
BOUNDARY_PATTERN = _BOUNDARY.pattern
"""RFC 2046 bchars, 1-70 of them, not ending in a space: the required `boundary` parameter."""
NOT_EXECUTED_STATUS = 424
"""The status of the answer part of a request part that was not executed."""


class MultipartBatchCodec:
    """Decode a multipart/mixed batch into the neutral model and encode its results back."""

    def __init__(self, limits: BatchLimits = _DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._head_limits = HeadLimits(limits.max_part_headers, limits.max_part_header_bytes)

    def decode(
        self, body: bytes, content_type: str, mode: ExecutionMode = ExecutionMode.SERIAL
    ) -> Batch:
        """Parse a whole batch strictly; any problem raises a ClientError naming where it is."""
        boundary = _boundary_of(content_type)
        if len(body) > self._limits.max_body_bytes:
            raise PayloadTooLarge(
                f"The batch is {len(body)} bytes. "
                f"Maximum body size is {self._limits.max_body_bytes} bytes.",
                where=_BATCH, limit="limits.max_body_bytes",
            )
        parts = _split_parts(body, boundary, self._limits.max_items)
        items = tuple(self._decode_part(part, n) for n, part in enumerate(parts, 1))
        return Batch(mode=mode, items=items, where="/")

    def encode(
        self,
        report: BatchReport,
        boundary: str | None = None,
        *,
        content_ids: Sequence[str | None] = (),
    ) -> tuple[bytes, str]:
        """-> (body bytes, value for the response Content-Type header incl. boundary).

        `content_ids` are the request parts' Content-IDs, aligned with the result items; a part
        whose request had Content-ID X answers with `Content-ID: <response-X>`.
        """
        chunks, content_type = self.encode_chunks(report, boundary, content_ids=content_ids)
        return b"".join(chunks), content_type

    def encode_chunks(
        self,
        report: BatchReport,
        boundary: str | None = None,
        *,
        content_ids: Sequence[str | None] = (),
    ) -> tuple[Iterator[bytes], str]:
        """Like `encode`, but the body comes part by part: only one part is built at a time.

        The boundary is checked against every item's data before the first part is made.
        """
        items = _flat_items(report.root)
        ids = _aligned(content_ids, len(items))
        chosen = _choose_boundary(items, ids, boundary)
        return _iter_frames(items, ids, chosen), f"multipart/mixed; boundary={_param_value(chosen)}"

    def _decode_part(self, data: bytes, n: int) -> SubRequest:
        where = f"part {n}"
        part_headers, rest = _split_part_headers(data, self._limits, where)
        content_id = _check_part_headers(part_headers, where)
        request = parse_request(rest, self._head_limits, where)
        return SubRequest(
            method=request.method,
            target=request.target,
            headers=request.headers,
            body=request.body or None,
            where=where,
            content_id=content_id,
        )


# -- the outer Content-Type ---------------------------------------------------------------------


def _boundary_of(content_type: str) -> str:
    """The boundary of a `multipart/mixed` Content-Type value (RFC 2046: 1-70 bchars)."""
    media, _, _ = content_type.partition(";")
    if media.strip().lower() != "multipart/mixed":
        raise UnsupportedMediaType(
            f"a batch must be multipart/mixed, not {media.strip()!r}", where=_CONTENT_TYPE
        )
    boundary = _parameters(content_type[len(media) :]).get("boundary")
    if boundary is None:
        raise MalformedBatch("multipart/mixed needs a boundary parameter", where=_CONTENT_TYPE)
    if not _BOUNDARY.fullmatch(boundary):
        raise MalformedBatch(
            f"invalid boundary {boundary!r}: RFC 2046 allows 1-70 characters "
            "from its bchars, not ending in a space",
            where=_CONTENT_TYPE,
        )
    return boundary


def _parameters(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0
    while pos < len(text.rstrip("; \t")):
        match = _PARAM.match(text, pos)
        if match is None:
            raise MalformedBatch("invalid Content-Type parameters", where=_CONTENT_TYPE)
        name, quoted, token = match.groups()
        if name.lower() in params:
            raise MalformedBatch(f"repeated parameter {name!r}", where=_CONTENT_TYPE)
        params[name.lower()] = token if quoted is None else re.sub(r"\\(.)", r"\1", quoted)
        pos = match.end()
    return params


def _param_value(value: str) -> str:
    return value if _TOKEN_RE.fullmatch(value) else f'"{value}"'


# -- RFC 2046 framing ---------------------------------------------------------------------------


class _Delimiter(NamedTuple):
    start: int  # where the delimiter begins, the line break before it included
    end: int  # just past its line break
    close: bool  # `--boundary--`
    at_eof: bool  # the input ends on the delimiter line


def _split_parts(body: bytes, boundary: str, max_parts: int) -> list[bytes]:
    """The encapsulated parts of `body`; preamble and epilogue are dropped."""
    marker = b"--" + boundary.encode("ascii")
    delimiter = _find_delimiter(body, marker, 0)
    if delimiter is None:
        raise MalformedBatch("no line with the boundary delimiter", where=_BATCH)
    parts: list[bytes] = []
    while not delimiter.close:
        following = None if delimiter.at_eof else _find_delimiter(body, marker, delimiter.end)
        if following is None:
            raise MalformedBatch("the close delimiter is missing", where=_BATCH)
        parts.append(body[delimiter.end : following.start])
        if len(parts) > max_parts:
            raise PayloadTooLarge(
                f"Too many parts. Maximum number of parts is {max_parts}.",
                where=f"part {len(parts)}", limit="limits.max_items",
            )
        delimiter = following
    if not parts:
        raise MalformedBatch("the batch has no parts", where=_BATCH)
    return parts


def _find_delimiter(body: bytes, marker: bytes, pos: int) -> _Delimiter | None:
    at = body.find(marker, pos)
    while at != -1:
        if at == 0 or body[at - 1] == 0x0A:
            found = _delimiter_at(body, marker, at, pos)
            if found is not None:
                return found
        at = body.find(marker, at + 1)
    return None


def _delimiter_at(body: bytes, marker: bytes, at: int, pos: int) -> _Delimiter | None:
    """The delimiter line at `at` if it is one: marker, optional `--`, padding, line break."""
    end = at + len(marker)
    close = body.startswith(b"--", end)
    end += 2 if close else 0
    while end < len(body) and body[end] in b" \t":
        end += 1
    line_break = _line_break_at(body, end)
    if line_break is None:
        return None
    start = _break_before(body, at, pos)
    return _Delimiter(start, end + line_break, close, end == len(body))


def _line_break_at(body: bytes, pos: int) -> int | None:
    """Length of the line break at `pos` (0 at the end of input), None when there is none."""
    if pos == len(body):
        return 0
    if body.startswith(b"\r\n", pos):
        return 2
    return 1 if body.startswith(b"\n", pos) else None


def _break_before(body: bytes, at: int, pos: int) -> int:
    """Where the line break before `at` starts: it belongs to the delimiter, not the part."""
    if at - 2 >= pos and body.startswith(b"\r\n", at - 2):
        return at - 2
    if at - 1 >= pos and body.startswith(b"\n", at - 1):
        return at - 1
    return at


# -- part headers -------------------------------------------------------------------------------


def _split_part_headers(
    data: bytes, limits: BatchLimits, where: str
) -> tuple[list[tuple[str, str]], bytes]:
    """The part's MIME headers (unfolded) and what follows their blank line."""
    lines: list[bytes] = []
    pos = 0
    while True:
        eol = data.find(b"\n", pos)
        if eol == -1:
            raise MalformedBatch("the part headers must end with a blank line", where=where)
        line = data[pos:eol].removesuffix(b"\r")
        pos = eol + 1
        _check_part_header_limits(pos, lines, limits, where)
        if not line:
            return _unfold(lines, where), data[pos:]
        lines.append(line)


def _check_part_header_limits(
    size: int, lines: list[bytes], limits: BatchLimits, where: str
) -> None:
    if size > limits.max_part_header_bytes:
        raise HeadersTooLarge(
            f"The part headers exceed {limits.max_part_header_bytes} bytes.", where=where,
            limit="limits.max_part_header_bytes",
        )
    if len(lines) > limits.max_part_headers:
        raise HeadersTooLarge(
            f"Too many part headers. Maximum number of headers is {limits.max_part_headers}.",
            where=where, limit="limits.max_part_headers",
        )


def _unfold(lines: list[bytes], where: str) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    for line in lines:
        if b"\r" in line or b"\0" in line:
            raise MalformedBatch("a part header holds a control character", where=where)
        text = line.decode("latin-1")
        if text[:1] in (" ", "\t") and fields:
            name, value = fields.pop()
            fields.append((name, f"{value} {text.strip()}"))
        else:
            fields.append(_header_field(text, where))
    return fields


def _header_field(text: str, where: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not _TOKEN_RE.fullmatch(name):
        raise MalformedBatch(f"invalid part header line {text[:60]!r}", where=where)
    return name, value.strip(" \t")


def _check_part_headers(fields: list[tuple[str, str]], where: str) -> str | None:
    """Check the part's Content-Type; return its Content-ID without the angle brackets."""
    content_type = _single(fields, "content-type", where)
    if content_type is None:
        raise MalformedBatch("the part has no Content-Type (application/http)", where=where)
    media = content_type.partition(";")[0].strip()
    if media.lower() != "application/http":
        raise UnsupportedMediaType(f"a part must be application/http, not {media!r}", where=where)
    content_id = _single(fields, "content-id", where)
    if content_id is None:
        return None
    bare = content_id[1:-1] if content_id[:1] == "<" and content_id[-1:] == ">" else content_id
    if not bare.strip():
        raise MalformedBatch("the part's Content-ID is empty", where=where)
    return bare


def _single(fields: list[tuple[str, str]], name: str, where: str) -> str | None:
    values = [value for field, value in fields if field.lower() == name]
    if len(values) > 1:
        raise MalformedBatch(f"the part has more than one {name} header", where=where)
    return values[0] if values else None


# -- encoding -----------------------------------------------------------------------------------


def _flat_items(node: ResultNode) -> list[ItemResult]:
    """The item results in call order (nested results are flattened depth-first)."""
    if isinstance(node, ItemResult):
        return [node]
    return [leaf for child in node.items for leaf in _flat_items(child)]


def _aligned(content_ids: Sequence[str | None], count: int) -> Sequence[str | None]:
    if not content_ids:
        return [None] * count
    if len(content_ids) != count:
        raise ValueError(f"{len(content_ids)} content ids for {count} results")
    return content_ids


def _response_part(item: ItemResult, content_id: str | None) -> tuple[bytes, bytes]:
    """The part as (its headers and the response head, the body): the body is not copied."""
    lines = ["Content-Type: application/http"]
    if content_id is not None:
        lines.append(f"Content-ID: <response-{one_line(content_id)}>")
    if item.rollback is not None:
        lines.append(f"X-Batch-Item-Status: {item.rollback.value}")
        if item.rollback_detail:
            lines.append(f"X-Batch-Item-Detail: {one_line(item.rollback_detail)}")
    head, body = _http_response(item.outcome)
    return header_block(lines) + head, body


def _http_response(outcome: Outcome) -> tuple[bytes, bytes]:
    if isinstance(outcome, SubResponse):
        return response_pieces(outcome.status, outcome.reason, outcome.headers, outcome.body)
    if isinstance(outcome, CallFailure):
        return _json_response(outcome.status, {"error": outcome.reason})
    return _json_response(424, {"reason": outcome.reason})


def _json_response(status: int, document: dict[str, str]) -> tuple[bytes, bytes]:
    body = json.dumps(document).encode("ascii")
    return response_pieces(status, "", (("Content-Type", "application/json"),), body)


def _choose_boundary(items: list[ItemResult], ids: Sequence[str | None], given: str | None) -> str:
    if given is not None:
        if not _BOUNDARY.fullmatch(given) or _collides(items, ids, given):
            raise ValueError(f"boundary {given!r} is invalid or occurs in a part")
        return given
    while True:
        boundary = "batch_" + secrets.token_hex(16)
        if not _collides(items, ids, boundary):
            return boundary


def _collides(items: list[ItemResult], ids: Sequence[str | None], boundary: str) -> bool:
    """Could the delimiter occur inside a part? Checked on what the parts are made of."""
    marker = "--" + boundary
    raw = marker.encode("ascii")
    if any(marker in (content_id or "") for content_id in ids):
        return True
    for item in items:
        outcome = item.outcome
        texts = [item.rollback_detail or ""]
        if isinstance(outcome, SubResponse):
            if raw in outcome.body:
                return True
            texts += [outcome.reason, *(f"{k}: {v}" for k, v in outcome.headers)]
        else:
            texts.append(outcome.reason)
        if any(marker in text for text in texts):
            return True
    return False


def _iter_frames(items: list[ItemResult], ids: Sequence[str | None], boundary: str) -> Iterator[bytes]:
    """One chunk per part, as before, except that a body of 64 KiB or more goes out on its own:
    the very bytes the upstream sent, not a copy."""
    dash = b"--" + boundary.encode("ascii")
    for item, content_id in zip(items, ids, strict=True):
        head, body = _response_part(item, content_id)
        if len(body) < _BIG_BODY:
            yield dash + b"\r\n" + head + body + b"\r\n"
            continue
        yield dash + b"\r\n" + head
        yield body
        yield b"\r\n"
    yield dash + b"--\r\n"


_BIG_BODY = 64 * 1024
