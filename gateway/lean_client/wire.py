"""Request serialization: validation of method, target and header fields, and the body framing
(Host, Content-Length or chunked) the pool adds. Pure functions, nothing is written here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from gateway.lean_client.errors import RequestNotSent

_TOKENS: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?::[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")
"""Header names joined by ':' (a colon is not a token character)."""
_METHOD: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET: Final = re.compile(r"(?:/[\x21-\x7e]*|\*)")
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods sent without `Content-Length: 0` when they have no body (as aiohttp does)."""
_FRAMING: Final = frozenset({"content-length", "transfer-encoding"})

CHUNKED: Final = -1
"""The `length` of a request whose body is sent chunked."""


def build_head(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    host_header: str,
    body: bytes | None,
    streamed: bool,
) -> tuple[bytes, int | None, bool]:
    """(the request head, the body length or CHUNKED or None, Connection: close asked).

    Refuses (RequestNotSent) a method that is not a token or is CONNECT, a target that is not
    origin-form ASCII (or `*`), a header name that is not a token and a value holding CR, LF or NUL.
    The caller's Content-Length and Transfer-Encoding are dropped (the framing is the body's),
    except that a streamed body with one valid Content-Length is sent with that length.
    """
    if not _METHOD.fullmatch(method) or method == "CONNECT":
        raise RequestNotSent(f"refused to send method {method[:40]!r}")
    if not _TARGET.fullmatch(target):
        raise RequestNotSent("refused to send a request target that is not origin-form ASCII")
    names = ":".join(name for name, _ in headers)
    if names and not _TOKENS.fullmatch(names):
        raise RequestNotSent("refused to send a header name that is not a token")
    values = "".join(value for _, value in headers)
    if "\r" in values or "\n" in values or "\x00" in values:
        raise RequestNotSent("refused to send a header value holding CR, LF or NUL")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    has_host = close = False
    declared: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower in _FRAMING:
            if lower == "content-length":
                declared.append(value)
            continue
        if lower == "host":
            has_host = True
        elif lower == "connection" and "close" in (t.strip().lower() for t in value.split(",")):
            close = True
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        lines.append(f"Host: {host_header}\r\n")
    length: int | None
    if streamed:
        length = _declared_length(declared)
        framing = "Transfer-Encoding: chunked" if length == CHUNKED else f"Content-Length: {length}"
        lines.append(framing + "\r\n")
    elif body:
        length = len(body)
        lines.append(f"Content-Length: {length}\r\n")
    elif method in _NO_BODY_METHODS:
        length = None
    else:
        length = 0
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    try:
        return "".join(lines).encode("utf-8", "surrogateescape"), length, close
    except UnicodeEncodeError:
        raise RequestNotSent("refused to send a header value that cannot be encoded") from None


def _declared_length(declared: list[str]) -> int:
    """The caller's Content-Length for a streamed body, else CHUNKED (none given)."""
    if not declared:
        return CHUNKED
    if len(declared) > 1 or not declared[0].strip().isdigit() or not declared[0].strip().isascii():
        raise RequestNotSent("refused to stream a body under an invalid or repeated Content-Length")
    return int(declared[0].strip())


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"
