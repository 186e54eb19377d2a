"""The lean client's one exception hierarchy: what failed, and whether any request byte was sent.

`kind` is the gateway's UpstreamError kind each maps to; `sent` is False only when no byte reached the socket.
"""

from __future__ import annotations


class LeanError(Exception):
    """Base of every error the lean client raises on purpose."""

    kind: str = "reset"

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent
        """Whether any byte of the request may have reached the server."""


class ConnectError(LeanError):
    """Refused, unreachable or name resolution failed; nothing was sent."""

    kind = "connect"


class ConnectTimeout(LeanError):
    """No connection (TCP + TLS handshake, or a free pool slot) within the time allowed."""

    kind = "connect_timeout"


class TLSError(LeanError):
    """The TLS handshake failed (certificate, hostname, protocol); nothing was sent."""

    kind = "tls"


class ReadTimeout(LeanError):
    """The response head, a body chunk or a write did not progress in time."""

    kind = "timeout"


class ConnectionReset(LeanError):
    """The connection closed or broke before the response was complete."""

    kind = "reset"


class BodyMismatch(ConnectionReset):
    """A streamed request body did not match the Content-Length the caller gave."""


class InvalidResponse(LeanError):
    """The response is not valid HTTP/1.x (status line, framing, headers, chunk sizes)."""

    kind = "invalid_response"


class ResponseTooLarge(LeanError):
    """The response body is over the caller's limit."""

    kind = "oversize"


class RequestNotSent(LeanError):
    """The request was refused or abandoned before any byte was written (safe: not executed)."""

    kind = "not_sent"

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message, sent=sent)
