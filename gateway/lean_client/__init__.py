"""A lean HTTP/1.1 client for the gateway's upstream calls: httptools (llhttp) over an asyncio
Protocol, one keep-alive pool per upstream. No redirects, no decompression, no cookies.

    pool = LeanPool("127.0.0.1", 8080, ssl=None, server_hostname=None, limit=10)
    async with await pool.request("GET", "/x", [("Accept", "*/*")], None, read_timeout=5) as r:
        body = await r.read_all(1 << 20)
"""

from gateway.lean_client.errors import (
    BodyMismatch,
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    InvalidResponse,
    LeanError,
    ReadTimeout,
    RequestNotSent,
    ResponseTooLarge,
    TLSError,
)
from gateway.lean_client.pool import LeanPool, LeanResponse

__all__ = [
    "BodyMismatch",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionReset",
    "InvalidResponse",
    "LeanError",
    "LeanPool",
    "LeanResponse",
    "ReadTimeout",
    "RequestNotSent",
    "ResponseTooLarge",
    "TLSError",
]
