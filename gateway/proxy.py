"""The plain reverse proxy: a non-batch request streamed to its routed upstream and back.

A small request body is read whole before an upstream connection is taken (so a slow client never
holds one); a bigger one, and every response, is streamed chunk by chunk. Hop-by-hop headers and
`Expect` are dropped, forwarding headers added.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import MethodRefused, RequestTimeout, UpstreamError, UpstreamUnavailable
from gateway.headers import add_forwarding, end_to_end, safe_reason
from gateway.lean_client import LeanError
from gateway.lean_upstream import LeanStream
from gateway.planning import REFUSED_ITEM_METHODS
from gateway.routing import parse_target
from gateway.runtime import RELAYED, REQUEST_ID, ROUTE, UPSTREAM, gateway_of

_CHUNK = 64 * 1024
PROXIED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
"""What a route without a `methods` list proxies (CONNECT and TRACE need to be listed)."""
log = structlog.get_logger("gateway.proxy")
_BROKEN_READ = (aiohttp.ClientError, TimeoutError, LeanError)
"""What reading an upstream's body raises when it breaks off, with either client."""


def forward_headers(request: web.Request) -> CIMultiDict[str]:
    """The client's end-to-end headers plus X-Forwarded-* and X-Request-ID; no Host, no Expect
    (the gateway answered `100 Continue` itself; an upstream must never wait for a body)."""
    headers = end_to_end(request.headers, drop=("Host", "Expect"))
    add_forwarding(
        headers,
        client_ip=request.remote,
        proto=request.scheme,
        host=request.host,
        request_id=request[REQUEST_ID],
        trusted=gateway_of(request).trusted_proxies.trusts(request.remote),
    )
    return headers


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    target = parse_target(request.raw_path)
    routed = gateway.routes.route(request.method, target)
    if request.method in REFUSED_ITEM_METHODS and request.method not in (routed.route.methods or ()):
        raise MethodRefused(
            f"{request.method} is proxied only on a route that lists it under methods",
            allow=routed.route.methods or PROXIED_METHODS,
        )
    request[UPSTREAM] = routed.upstream
    request[ROUTE] = routed.route.prefix
    settings = gateway.config.proxy
    stall = _Stall()
    data: bytes | AsyncIterator[bytes] | None = None
    if request.body_exists:
        prefix, complete = await read_buffered(request, settings.buffer_bytes, settings.body_timeout)
        idle = settings.body_idle_timeout
        data = prefix if complete else _rest_of_body(prefix, request, idle, stall)
    headers = tuple(forward_headers(request).items())
    try:
        async with gateway.pool.stream(
            routed.upstream, request.method, routed.url, headers, data
        ) as upstream_response:
            return await _answer(request, upstream_response, routed.upstream)
    except UpstreamError:
        if stall.seconds is not None:
            raise RequestTimeout(
                f"the request body stalled for {stall.seconds} s (proxy.body_idle_timeout); "
                "the upstream call was abandoned", limit="proxy.body_idle_timeout",
            ) from None
        raise


async def _answer(
    request: web.Request, upstream_response: aiohttp.ClientResponse | LeanStream, upstream: str
) -> web.StreamResponse:
    """Relay the upstream's status, end-to-end headers and body to the client."""
    status = upstream_response.status
    reason = safe_reason(status, upstream_response.reason)
    small = _small_body_length(request, upstream_response)
    if small is not None:  # read whole, then head and body in one write (a syscall saved)
        body = await _read_exactly(upstream_response, small, upstream)
        if body is not None:
            headers = end_to_end(upstream_response.headers, drop=("Content-Length",))
            headers["X-Request-ID"] = request[REQUEST_ID]
            request[RELAYED] = True
            return web.Response(status=status, reason=reason, body=body, headers=headers)
        raise UpstreamUnavailable(
            f"connection to upstream {upstream!r} failed (the response body broke off)",
            maybe_executed=True, kind="reset",
        )
    request[RELAYED] = True
    response = web.StreamResponse(status=status, reason=reason)
    response.headers.extend(end_to_end(upstream_response.headers))
    response.headers["X-Request-ID"] = request[REQUEST_ID]
    await response.prepare(request)
    if await _relay(upstream_response, response, upstream):
        await response.write_eof()
    elif request.transport is not None:
        request.transport.close()  # the client must see a truncated body, not a complete one
    return response


_SMALL_ANSWER = 64 * 1024
"""An upstream answer with a Content-Length up to this is read whole before it is relayed."""


def _small_body_length(
    request: web.Request, upstream_response: aiohttp.ClientResponse | LeanStream
) -> int | None:
    """The Content-Length of an answer small enough to read whole (not HEAD, 1xx, 204 or 304,
    not chunked, one plain length), else None: it is streamed."""
    if request.method == "HEAD" or upstream_response.status in (204, 304) or upstream_response.status < 200:
        return None
    headers = upstream_response.headers
    lengths = headers.getall("Content-Length", [])
    if len(lengths) != 1 or "Transfer-Encoding" in headers or not lengths[0].isdigit():
        return None
    length = int(lengths[0])
    return length if length <= _SMALL_ANSWER else None


async def _read_exactly(
    source: aiohttp.ClientResponse | LeanStream, length: int, upstream: str
) -> bytes | None:
    """The whole body of `length` bytes, or None when the upstream broke off (logged)."""
    parts: list[bytes] = []
    got = 0
    try:
        while got < length:
            chunk = await source.content.read(length - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    except _BROKEN_READ as exc:
        log.warning("upstream_stream_broken", upstream=upstream, error=type(exc).__name__)
        return None
    if got != length:
        log.warning("upstream_stream_broken", upstream=upstream, error="ShortBody")
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_buffered(request: web.Request, limit: int, seconds: float) -> tuple[bytes, bool]:
    """Read the body until its end or past `limit` bytes, within `seconds`: (bytes, complete).

    A declared Content-Length over `limit` is not read here at all (it is streamed).
    """
    if request.content_length is not None and request.content_length > limit:
        return b"", False
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            while len(body) <= limit:
                chunk = await request.content.readany()
                if not chunk:
                    return bytes(body), True
                body.extend(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {seconds} s (proxy.body_timeout)",
            limit="proxy.body_timeout",
        ) from None
    return bytes(body), False


class _Stall:
    """Set when a streamed request body paused longer than allowed."""

    seconds: float | None = None


async def _rest_of_body(
    prefix: bytes, request: web.Request, idle: float, stall: _Stall
) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    while True:
        try:
            chunk = await asyncio.wait_for(request.content.readany(), idle)
        except TimeoutError:
            stall.seconds = idle
            raise
        if not chunk:
            return
        yield chunk


async def _relay(
    source: aiohttp.ClientResponse | LeanStream, response: web.StreamResponse, upstream: str
) -> bool:
    """Copy the body chunk by chunk; False when either side broke off (already logged).

    Reads and writes are told apart so that a client that goes away is never blamed on the
    upstream, and an upstream that breaks mid-body is never reported as a client problem.
    """
    while True:
        try:
            chunk = await source.content.read(_CHUNK)
        except _BROKEN_READ as exc:
            log.warning("upstream_stream_broken", upstream=upstream, error=type(exc).__name__)
            return False
        if not chunk:
            return True
        try:
            await response.write(chunk)
        except ConnectionError:
            log.info("client_disconnected", upstream=upstream)
            return False
