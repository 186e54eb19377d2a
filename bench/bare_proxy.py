"""A bare proxy for comparison: aiohttp's server plus the lean client, nothing else (no routing,
logging, metrics). `python bench/bare_proxy.py UPSTREAM_URL PORT`, then wrk it next to the gateway.
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web
from yarl import URL

from gateway.lean_client import LeanPool

UPSTREAM = URL(sys.argv[1]) if len(sys.argv) > 2 else URL("http://127.0.0.1:1")
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 0
_HOP = frozenset({"content-length", "connection", "transfer-encoding", "keep-alive"})
_pools: list[LeanPool] = []


async def handler(request: web.Request) -> web.Response:
    if not _pools:
        assert UPSTREAM.host is not None and UPSTREAM.port is not None
        _pools.append(LeanPool(UPSTREAM.host, UPSTREAM.port, ssl=None, server_hostname=None, limit=200))
    response = await _pools[0].request(
        request.method, request.rel_url.raw_path_qs, [], None, total_timeout=30
    )
    async with response:
        body = await response.read_all(1 << 20)
    headers = [(k, v) for k, v in response.headers if k.lower() not in _HOP]
    return web.Response(status=response.status, body=body, headers=headers)


def main() -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
