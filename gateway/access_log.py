"""The access log: one JSON line per request served, with what the gateway decided about it.

Written by the app's middleware once the answer is known; a rejected request's error is on this
same line (no second line), so one request is always one line. Besides the request's identity and
outcome it carries the client address and user agent, the raw query string with the values of
secret parameters (`logging.redact_query_params`) replaced by `REDACTED`, the body bytes read from
the client and written to it, the route, and whether the status came from an upstream.

`bytes_in` is the request body as it arrived (after de-chunking, before any decoding: a gzip body
counts compressed), as far as the gateway received it when the answer was ready. `bytes_out` is
the response body without the status line, headers or chunk framing: counted as it is written for
an answer the handler streamed (`install` registers the counter), or the body the gateway is about
to send for a plain `web.Response` (none for HEAD, 1xx, 204 and 304).
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any
from urllib.parse import unquote_plus

import structlog
from aiohttp import web

from gateway.errors import GatewayError
from gateway.runtime import BATCH_ID, REQUEST_ID, Served, gateway_of

log = structlog.get_logger("gateway.access")
REJECTION = web.RequestKey("rejection", GatewayError)
"""The error the gateway answered with (problem+json), when it did."""
FAILURE = web.RequestKey("failure", Exception)
"""An unexpected exception behind a 500: the access line carries its traceback (`exception`)."""
REDACTED = "REDACTED"


class BodyCounter:
    """Response body bytes handed to the connection so far."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


BYTES_OUT = web.RequestKey("bytes_out", BodyCounter)


async def count_bytes_out(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` handler: count the body bytes this response writes from now on.

    aiohttp's `body_length` is no use for the access line: it counts the status line, headers and
    chunk framing too, and is 0 until aiohttp sends a plain Response (after the middleware)."""
    counter = request[BYTES_OUT] = BodyCounter()
    writer = request.writer
    before = writer.on_body_write

    def written(size: int, total: int) -> None:
        counter.bytes += size
        if before is not None:
            before(size, total)

    writer.on_body_write = written


def install(app: web.Application) -> None:
    """Count response body bytes for the access line (idempotent; before the app starts)."""
    if count_bytes_out not in app.on_response_prepare:
        app.on_response_prepare.append(count_bytes_out)


def log_access(
    request: web.Request, response: web.StreamResponse, started: float, done: Served
) -> None:
    rejection = request.get(REJECTION)
    fields: dict[str, Any] = {
        "request_id": request[REQUEST_ID],
        "method": request.method,
        "path": request.path,
        "query": redact_query(_raw_query(request), _secret_names(request)),
        "route": done.route,
        "kind": done.kind,
        "upstream": done.upstream,
        "batch_id": request.get(BATCH_ID),
        "status": response.status,
        "status_origin": done.origin,
        "client": request.remote,
        "user_agent": request.headers.get("User-Agent"),
        "bytes_in": request.content.total_bytes,
        "bytes_out": _bytes_out(request, response),
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    failure = request.get(FAILURE)
    if rejection is not None:
        fields["error"] = type(rejection).__name__
        fields["detail"] = rejection.detail
    if failure is not None:
        fields.setdefault("error", type(failure).__name__)
        log.error("request", exc_info=failure, **fields)
    elif rejection is not None:
        log.warning("request", **fields)
    else:
        log.info("request", **fields)


def _bytes_out(request: web.Request, response: web.StreamResponse) -> int | None:
    """Body bytes written, or about to be; None when unknown (a streamed answer without the
    counter `install` registers)."""
    counter = request.get(BYTES_OUT)
    if response.prepared:
        return counter.bytes if counter is not None else None
    if _empty_body(request.method, response.status):
        return 0
    if isinstance(response, web.Response):
        return response.content_length  # None: a payload of unknown size
    return 0  # a StreamResponse never prepared: aiohttp sends its headers and nothing else


def _empty_body(method: str, status: int) -> bool:
    return method == "HEAD" or status in (204, 304) or 100 <= status < 200


def _raw_query(request: web.Request) -> str:
    """The query exactly as the client sent it (no decoding, no normalising)."""
    return request.raw_path.partition("?")[2]


def _secret_names(request: web.Request) -> frozenset[str]:
    return _lowered(gateway_of(request).config.logging.redact_query_params)


@functools.lru_cache(maxsize=8)
def _lowered(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(name.lower() for name in names)


_SEPARATOR = re.compile(r"([&;])")
"""`;` too: some upstreams split on it, and a secret behind it must not leak."""


def redact_query(raw: str, secret: frozenset[str]) -> str:
    """`raw` with each value of a parameter named in `secret` (lower case; a name is compared
    percent-decoded and case-insensitively) replaced by REDACTED; everything else byte for byte.
    Never fails: a malformed query is shown as it came, but for the values it redacts."""
    if not raw or not secret:
        return raw
    parts = _SEPARATOR.split(raw)
    for index in range(0, len(parts), 2):  # odd indexes are the separators
        name, equals, value = parts[index].partition("=")
        if equals and value and unquote_plus(name, errors="replace").strip().lower() in secret:
            parts[index] = f"{name}={REDACTED}"
    return "".join(parts)
