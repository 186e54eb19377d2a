"""Checks on every value the gateway takes from an upstream response and reuses in a call it makes.

Locations, created ids, transaction tokens and snapshots are untrusted: each is checked here or refused.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from urllib.parse import quote, unquote

from yarl import URL

from gateway.errors import ForbiddenTarget
from gateway.routing import parse_target

MAX_LOCATION_CHARS = 2048
MAX_ID_CHARS = 256
MAX_TOKEN_CHARS = 1024
MAX_CONTENT_TYPE_CHARS = 256

_VISIBLE = re.compile(r"[\x21-\x7e]+")
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UntrustedValue(Exception):
    """A value from an upstream response that the gateway will not put into a call it makes."""


class DecodedTooLarge(UntrustedValue):
    """A compressed body that decodes to more than the cap."""


class UnknownCoding(UntrustedValue):
    """A Content-Encoding the gateway does not decode (only gzip and deflate)."""


DECODABLE = ("gzip", "x-gzip", "deflate")


def in_scope(path: str, scope: str) -> bool:
    """Is `path` under `scope` (both relative to the upstream's base path; "" is the whole upstream)?"""
    return scope in ("", "/") or path == scope or path.startswith(scope.rstrip("/") + "/")


def checked_path(path: str, *, scope: str, what: str) -> str:
    """A path the gateway derived itself: passes the client target checks and stays in `scope`."""
    try:
        target = parse_target(path)
    except ForbiddenTarget as exc:
        raise UntrustedValue(f"{what} {path[:200]!r} refused: {exc.detail}") from None
    if target.query or "#" in path:
        raise UntrustedValue(f"{what} {path[:200]!r} refused: it carries a query or fragment")
    if not in_scope(target.path, scope):
        raise UntrustedValue(
            f"{what} {path[:200]!r} refused: it leaves {scope or '/'!r}, the part of the upstream "
            "the forward call was routed to"
        )
    return target.path


def _shown(location: str) -> str:
    """A Location for messages: its path only (never another host, port or credentials)."""
    start = location.find("/", location.find("//") + 2) if "//" in location else 0
    path = location[start:] if start >= 0 else ""
    return repr(path[:120]) if path.startswith("/") else "(not a path)"


def created_path_from_location(
    location: str, *, forward_url: URL, base_path: str, scope: str, forward_path: str
) -> str:
    """The resource a `Location` names, as a path relative to the upstream's base path.

    It must be on the forward call's origin with no credentials, under the base path and the
    route's scope, free of dot segments, `//`, backslashes and control characters (also encoded),
    and not the collection the forward call went to.
    """
    if len(location) > MAX_LOCATION_CHARS or _CONTROL.search(location) or " " in location:
        raise UntrustedValue(f"Location {_shown(location)} refused: too long or holds control characters")
    if location.startswith("//") or "\\" in location:
        raise UntrustedValue(f"Location {_shown(location)} refused: scheme-relative or backslash")
    try:  # yarl raises ValueError, IndexError, ... on odd input: any of them is a refusal
        given = URL(location)
        resolved = forward_url.join(given)
        has_credentials = given.user is not None or given.password is not None
        same_origin = resolved.is_absolute() and resolved.origin() == forward_url.origin()
        raw_path = given.raw_path if given.raw_path.startswith("/") else resolved.raw_path
    except Exception:
        raise UntrustedValue(f"Location {_shown(location)} refused: not a usable URL") from None
    if has_credentials:
        raise UntrustedValue(f"Location {_shown(location)} refused: it carries credentials")
    if not same_origin or resolved.user is not None:
        raise UntrustedValue(f"Location {_shown(location)} refused: it points outside the upstream")
    if _has_dot_segments(given.raw_path) or "//" in raw_path:
        raise UntrustedValue(f"Location {_shown(location)} refused: dot segments or an empty segment")
    base = base_path.rstrip("/")
    if base and raw_path != base and not raw_path.startswith(base + "/"):
        raise UntrustedValue(f"Location {_shown(location)} refused: it is outside the upstream's base path")
    relative = raw_path[len(base) :] or "/"
    path = checked_path(relative, scope=scope, what="Location")
    if path.rstrip("/") in (forward_path.rstrip("/"), scope.rstrip("/"), ""):
        raise UntrustedValue(f"Location {_shown(location)} refused: it names the collection, not a resource")
    return path


def created_path_from_id(value: object, *, forward_path: str, scope: str) -> str:
    """`<forward path>/<id>` with the id percent-encoded as exactly one path segment."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise UntrustedValue("the response's id is not a string or integer")
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS or _CONTROL.search(text) or text in (".", ".."):
        raise UntrustedValue(f"the response's id {text[:100]!r} refused: empty, too long, '.', '..' "
                             "or control characters")
    path = forward_path.rstrip("/") + "/" + quote(text, safe="")
    return checked_path(path, scope=scope, what="created resource path")


def checked_token(value: object) -> str:
    """A transaction token: 1..1024 visible ASCII characters (it travels in a header and a path)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise UntrustedValue("the begin response carries no token (not a string or integer)")
    text = str(value)
    if len(text) > MAX_TOKEN_CHARS or not _VISIBLE.fullmatch(text):
        raise UntrustedValue(
            f"the begin response's token {text[:60]!r} refused: it must be 1..{MAX_TOKEN_CHARS} "
            "visible ASCII characters"
        )
    return text


def header_safe(value: str) -> bool:
    """Can this value be sent as a header field value (RFC 9110 section 5.5, ASCII only)?"""
    return _FIELD_VALUE.fullmatch(value) is not None


def checked_content_type(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > MAX_CONTENT_TYPE_CHARS or not header_safe(value):
        raise UntrustedValue(f"Content-Type {value[:60]!r} refused: too long or not a valid field value")
    return value


def decoded_body(headers: Sequence[Sequence[str]], body: bytes, cap: int) -> bytes:
    """The body with its Content-Encoding undone (gzip and deflate; anything else is refused).

    Raises UntrustedValue when an encoding is unknown, the bytes are corrupt, or the decoded
    size exceeds `cap` (a small compressed body can expand enormously).
    """
    codings = [
        coding.strip().lower()
        for name, value in headers
        if name.lower() == "content-encoding"
        for coding in value.split(",")
        if coding.strip() and coding.strip().lower() != "identity"
    ]
    unknown = next((coding for coding in codings if coding not in DECODABLE), None)
    if unknown is not None:  # refused before any decoding work
        raise UnknownCoding(f"Content-Encoding {unknown[:40]!r} cannot be decoded (gzip and deflate can)")
    for coding in reversed(codings):
        body = _decode_one(coding, body, cap)
    return body


def _decode_one(coding: str, body: bytes, cap: int) -> bytes:
    gzip = coding != "deflate"
    out = bytearray()
    rest = body
    while True:  # gzip allows several members one after another (`cat a.gz b.gz`)
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else _deflate_wbits(rest))
        try:
            out += decoder.decompress(rest, cap + 1 - len(out))
        except zlib.error as exc:
            raise UntrustedValue(f"the {coding} body is corrupt: {exc}") from None
        if len(out) > cap or decoder.unconsumed_tail:
            raise DecodedTooLarge(f"the {coding} body decodes to more than {cap} bytes")
        if not decoder.eof:
            raise UntrustedValue(f"the {coding} body is truncated")
        rest = decoder.unused_data
        if not rest:
            return bytes(out)
        if not (gzip and rest[:2] == b"\x1f\x8b"):
            raise UntrustedValue(f"the {coding} body has {len(rest)} bytes after its end")


def _deflate_wbits(body: bytes) -> int:
    """`deflate` is meant to be zlib-wrapped (RFC 9110 section 8.4.1.2); some servers send it raw."""
    return zlib.MAX_WBITS if len(body) >= 2 and (body[0] * 256 + body[1]) % 31 == 0 else -zlib.MAX_WBITS


def _has_dot_segments(raw_path: str) -> bool:
    decoded = unquote(raw_path)
    return "\\" in decoded or any(segment in (".", "..") for segment in decoded.split("/"))
