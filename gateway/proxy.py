"""The plain reverse proxy: a non-batch request streamed to its routed upstream and back.

Bodies are streamed chunk by chunk both ways; hop-by-hop headers are dropped, forwarding headers added.
"""

from __future__ import annotations

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway.headers import add_forwarding, end_to_end
from gateway.routing import parse_target
from gateway.runtime import GATEWAY, REQUEST_ID, UPSTREAM

_CHUNK = 64 * 1024
log = structlog.get_logger("gateway.proxy")


def forward_headers(request: web.Request) -> CIMultiDict[str]:
    """The client's end-to-end headers plus X-Forwarded-* and X-Request-ID; no Host."""
    headers = end_to_end(request.headers, drop=("Host",))
    add_forwarding(
        headers,
        client_ip=request.remote,
        proto=request.scheme,
        host=request.host,
        request_id=request[REQUEST_ID],
    )
    return headers


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    target = parse_target(request.raw_path)
    routed = gateway.routes.route(request.method, target)
    request[UPSTREAM] = routed.upstream
    data = request.content if request.body_exists else None
    headers = tuple(forward_headers(request).items())
    async with gateway.pool.stream(
        routed.upstream, request.method, routed.url, headers, data
    ) as upstream_response:
        response = web.StreamResponse(
            status=upstream_response.status, reason=upstream_response.reason
        )
        response.headers.extend(end_to_end(upstream_response.headers))
        response.headers["X-Request-ID"] = request[REQUEST_ID]
        await response.prepare(request)
        if await _relay(upstream_response, response, routed.upstream):
            await response.write_eof()
        elif request.transport is not None:
            request.transport.close()  # the client must see a truncated body, not a complete one
    return response


async def _relay(
    source: aiohttp.ClientResponse, response: web.StreamResponse, upstream: str
) -> bool:
    """Copy the body chunk by chunk; False when either side broke off (already logged).

    Reads and writes are told apart so that a client that goes away is never blamed on the
    upstream, and an upstream that breaks mid-body is never reported as a client problem.
    """
    while True:
        try:
            chunk = await source.content.read(_CHUNK)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream_stream_broken", upstream=upstream, error=type(exc).__name__)
            return False
        if not chunk:
            return True
        try:
            await response.write(chunk)
        except ConnectionError:
            log.info("client_disconnected", upstream=upstream)
            return False
