"""The plain reverse proxy: a non-batch request streamed to its routed upstream and back.

Bodies are streamed chunk by chunk both ways; hop-by-hop headers are dropped, forwarding headers added.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import UpstreamError
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
        try:
            async for chunk in upstream_response.content.iter_chunked(_CHUNK):
                await response.write(chunk)
        except UpstreamError as exc:
            log.warning("upstream_stream_broken", upstream=routed.upstream, error=exc.detail)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
    return response
