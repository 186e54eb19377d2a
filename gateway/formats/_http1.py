"""One embedded HTTP/1.1 message of a multipart batch: parse a request (h11), write a response.

Knows nothing of MIME framing; every problem with the request becomes a gateway ClientError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

import h11

from gateway.errors import ClientError, ForbiddenTarget, HeadersTooLarge, MalformedBatch
from gateway.headers import safe_reason, without_hop_by_hop
from gateway.model import Headers

_HEAD_END = re.compile(rb"\n\r?\n")  # the same blank-line rule h11 applies
_PLACEHOLDER_HOST = b"Host: placeholder.invalid\r\n"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_LINE_BREAKS = str.maketrans({"\r": " ", "\n": " ", "\0": " "})


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """The parts of one embedded request the batch model keeps."""

    method: str
    target: str
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Header count and size allowed for one embedded request head (request line included)."""

    max_headers: int
    max_bytes: int


def parse_request(data: bytes, limits: HeadLimits, where: str) -> ParsedRequest:
    """Parse a whole HTTP/1.1 request: head by h11, body by Content-Length, chunked or the rest."""
    data, head = _complete_head(data, where)
    _check_head_limits(head, limits, where)
    injected = not _has_host(head)
    fed = _with_placeholder_host(data) if injected else data
    try:
        return _run_h11(fed, injected, limits, where)
    except h11.ProtocolError as exc:
        raise _translate(exc, where) from exc


def _complete_head(data: bytes, where: str) -> tuple[bytes, bytes]:
    """`data` with its head ended by a blank line (a part may end right after the headers), head."""
    if not data.strip(b"\r\n"):
        raise MalformedBatch("the part holds no HTTP request", where=where)
    if data.startswith((b"\n", b"\r\n")):
        raise MalformedBatch("the HTTP request must start with its request line", where=where)
    match = _HEAD_END.search(data)
    if match is None:
        data += b"\r\n" if data.endswith(b"\n") else b"\r\n\r\n"
    head_end = len(data) if match is None else match.end()
    return data, data[:head_end]


def _check_head_limits(head: bytes, limits: HeadLimits, where: str) -> None:
    if len(head) > limits.max_bytes:
        raise HeadersTooLarge(
            f"The HTTP request head is {len(head)} bytes. Maximum is {limits.max_bytes} bytes.",
            where=where, limit="limits.max_part_header_bytes",
        )
    count = head.count(b"\n") - 2  # minus the request line's and the blank line's ends
    if count > limits.max_headers:
        raise HeadersTooLarge(
            f"Too many request headers. Maximum number of headers is {limits.max_headers}.",
            where=where, limit="limits.max_part_headers",
        )


def _has_host(head: bytes) -> bool:
    return any(line[:5].lower() == b"host:" for line in head.split(b"\n")[1:])


def _with_placeholder_host(data: bytes) -> bytes:
    """h11 demands Host on HTTP/1.1 requests; batch parts rarely carry one. Lend it one, first."""
    after_request_line = data.index(b"\n") + 1
    return data[:after_request_line] + _PLACEHOLDER_HOST + data[after_request_line:]


def _run_h11(data: bytes, injected: bool, limits: HeadLimits, where: str) -> ParsedRequest:
    conn = h11.Connection(
        h11.SERVER, max_incomplete_event_size=limits.max_bytes + len(_PLACEHOLDER_HOST)
    )
    conn.receive_data(data)  # all there is: NEED_DATA later means the part ended too soon
    request = conn.next_event()
    if not isinstance(request, h11.Request):
        raise MalformedBatch("the part holds no complete HTTP request", where=where)
    framed = _check_request(request, where)
    body = _read_body(conn, where)
    rest = conn.trailing_data[0]
    if not framed:
        body = rest
    elif rest.strip(b"\r\n"):
        raise MalformedBatch("unexpected bytes after the request body", where=where)
    return ParsedRequest(
        method=request.method.decode("ascii"),
        target=request.target.decode("ascii"),
        headers=_model_headers(request, injected),
        body=body,
    )


def _check_request(request: h11.Request, where: str) -> bool:
    """Reject what h11 accepts but a batch part must not be; True when the body is framed."""
    if request.http_version not in (b"1.0", b"1.1"):
        version = request.http_version.decode("ascii")
        raise MalformedBatch(f"unsupported HTTP version {version}", where=where)
    _check_target(request.target.decode("ascii"), where)
    names = {name for name, _ in request.headers}
    if {b"content-length", b"transfer-encoding"} <= names:
        raise MalformedBatch(
            "the HTTP request has both Transfer-Encoding and Content-Length", where=where
        )
    return bool(names & {b"content-length", b"transfer-encoding"})


def _check_target(target: str, where: str) -> None:
    if not target.startswith("/"):
        raise ForbiddenTarget(
            f"the request target must be a path starting with '/', not {target!r}", where=where
        )
    if target.startswith("//"):
        raise ForbiddenTarget(
            f"the request target must not be scheme-relative: {target!r}", where=where
        )


def _read_body(conn: h11.Connection, where: str) -> bytes:
    chunks: list[bytes] = []
    while True:
        event = conn.next_event()
        if isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        if not isinstance(event, h11.Data):
            raise MalformedBatch("the HTTP request body is incomplete", where=where)
        chunks.append(bytes(event.data))


def _model_headers(request: h11.Request, injected: bool) -> Headers:
    raw = request.headers.raw_items()
    if injected:
        raw = raw[1:]  # the placeholder Host sits right after the request line
    return tuple((name.decode("ascii"), value.decode("latin-1")) for name, value in raw)


def _translate(exc: h11.ProtocolError, where: str) -> ClientError:
    if exc.error_status_hint == 431:
        return HeadersTooLarge(f"the HTTP request head is too large: {exc}", where=where)
    return MalformedBatch(f"invalid HTTP request: {exc}", where=where)


# -- writing --------------------------------------------------------------------------------


def response_bytes(status: int, reason: str, headers: Headers, body: bytes) -> bytes:
    """A whole HTTP/1.1 response: status line, forwardable headers, Content-Length, body."""
    return b"".join(response_pieces(status, reason, headers, body))


def response_pieces(status: int, reason: str, headers: Headers, body: bytes) -> tuple[bytes, bytes]:
    """`response_bytes` as (head, body), the body not copied."""
    lines = [f"HTTP/1.1 {status} {one_line(safe_reason(status, reason) or _phrase(status))}"]
    lines += [f"{name}: {one_line(value)}" for name, value in forwardable(headers)]
    lines.append(f"Content-Length: {len(body)}")
    return header_block(lines), body


def header_block(lines: list[str]) -> bytes:
    """Header lines, each ended by CRLF, then the blank line."""
    return b"".join(header_text(line) + b"\r\n" for line in lines) + b"\r\n"


def header_text(text: str) -> bytes:
    """Latin-1 when it fits (bytes as received), else UTF-8 (aiohttp's surrogateescape kept)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def one_line(text: str) -> str:
    """`text` with CR, LF and NUL turned into spaces: safe inside one header line."""
    return text.translate(_LINE_BREAKS)


def forwardable(headers: Headers) -> Headers:
    """`headers` minus hop-by-hop ones (and those Connection lists), Content-Length, bad names."""
    return tuple(
        (name, value)
        for name, value in without_hop_by_hop(headers)
        if _TOKEN.match(name) and name.lower() != "content-length"
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
