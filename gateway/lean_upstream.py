"""The lean client (gateway/lean_client/) as an upstream's transport: pools, error translation and
the streamed answer the proxy relays; what `upstreams.<n>.client: lean` selects.
"""

from __future__ import annotations

import errno
import socket
import ssl

import structlog
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Upstream
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.lean_client import (
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    InvalidResponse,
    LeanError,
    LeanPool,
    LeanResponse,
    ReadTimeout,
    RequestNotSent,
    TLSError,
)
from gateway.tls import server_name

log = structlog.get_logger("gateway.upstream")

_CHUNK = 64 * 1024


def lean_pool(upstream: Upstream, context: ssl.SSLContext | None) -> LeanPool:
    """The keep-alive pool of one upstream (its `pool_size`, TLS context and SNI name)."""
    url = URL(upstream.url)
    https = url.scheme == "https"
    if https and context is None:
        context = ssl.create_default_context()  # what aiohttp's ssl=True means: system CAs, verified
    assert url.host is not None and url.port is not None
    return LeanPool(
        url.host, url.port, ssl=context if https else None,
        server_hostname=(server_name(upstream) or url.host) if https else None,
        limit=upstream.pool_size, keepalive_timeout=upstream.timeouts.idle, host_header=url.raw_authority,
    )


def utf8_headers(raw: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Header text as aiohttp gives it (UTF-8, undecodable bytes kept as surrogates), from the lean
    client's latin-1: relayed headers keep their exact bytes either way."""
    return [
        (name, value.encode("latin-1").decode("utf-8", "surrogateescape")) if not value.isascii()
        else (name, value)
        for name, value in raw
    ]


def lean_error(upstream: str, exc: LeanError) -> UpstreamError:
    """The gateway's error for a lean client error, with the same texts as aiohttp's (upstream.py);
    the full text (addresses, TLS details) is logged for operators, not shown to clients."""
    if not isinstance(exc, ReadTimeout):
        log.warning("upstream_error", upstream=upstream, error=type(exc).__name__,
                    detail=f"{exc} ({exc.__cause__})"[:500] if exc.__cause__ else str(exc)[:500])
    return _translated(upstream, exc)


def _translated(upstream: str, exc: LeanError) -> UpstreamError:
    if isinstance(exc, ConnectTimeout):
        return UpstreamTimeout(f"connecting to upstream {upstream!r} timed out", kind="connect_timeout")
    if isinstance(exc, ReadTimeout):
        return UpstreamTimeout(f"upstream {upstream!r} did not answer in time", maybe_executed=exc.sent)
    if isinstance(exc, TLSError):
        return UpstreamUnavailable(f"upstream {upstream!r} is unreachable (TLS handshake failed)", kind="tls")
    if isinstance(exc, ConnectError):
        return UpstreamUnavailable(
            f"upstream {upstream!r} is unreachable ({_connect_reason(exc)})", kind="connect"
        )
    if isinstance(exc, RequestNotSent):
        return UpstreamError(
            f"the gateway refused to send a call to upstream {upstream!r} (an invalid URL or header)",
            kind="not_sent",
        )
    reason = {InvalidResponse: "invalid response", ConnectionReset: "connection lost"}
    text = next((t for kind, t in reason.items() if isinstance(exc, kind)), "connection error")
    return UpstreamUnavailable(
        f"connection to upstream {upstream!r} failed ({text})",
        maybe_executed=True if isinstance(exc, InvalidResponse) else exc.sent, kind=exc.kind,
    )


def _connect_reason(exc: ConnectError) -> str:
    cause = exc.__cause__
    if isinstance(cause, socket.gaierror):
        return "name resolution failed"
    if getattr(cause, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    return "cannot connect"


class LeanStream:
    """A streamed upstream answer for the proxy: status, reason, headers and `content.read(n)`
    (the shape proxy.py reads from aiohttp's response)."""

    def __init__(self, response: LeanResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason
        self.headers: CIMultiDict[str] = CIMultiDict(utf8_headers(response.headers))
        self.content = self

    async def read(self, size: int = _CHUNK) -> bytes:
        return await self._response.read_chunk(size)
