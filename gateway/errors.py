"""The gateway's one error hierarchy, split by who is at fault, each with its HTTP status.

Client errors (4xx) and upstream errors (502/504) become RFC 9457 problem+json in `problem.py` only.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose; `status` is the HTTP status it maps to."""

    status: int = 500
    title: str = "Internal gateway error"
    type_suffix: str = "internal"
    limit: str | None = None
    """The configured limit this error enforces (e.g. `limits.max_items`), counted in metrics."""

    def __init__(self, detail: str, *, where: str | None = None, limit: str | None = None) -> None:
        super().__init__(detail if where is None else f"{where}: {detail}")
        self.detail = detail
        self.where = where
        if limit is not None:
            self.limit = limit


class ClientError(GatewayError):
    """The client sent something the gateway will not execute; nothing was called upstream."""

    status = 400
    title = "Bad request"
    type_suffix = "bad-request"


class BadHttp(ClientError):
    """The request is not valid HTTP/1.x (framing, version, syntax); the connection is closed."""

    title = "Bad HTTP request"
    type_suffix = "bad-http"


class UnsupportedVersion(BadHttp):
    """HTTP/0.9, or a request line claiming a version other than 1.0 and 1.1."""

    status = 505
    title = "HTTP version not supported"


class MalformedBatch(ClientError):
    title = "Malformed batch"
    type_suffix = "malformed-batch"


class ForbiddenTarget(ClientError):
    """A sub-request target that is absolute, escapes its route or matches no route."""

    title = "Target not allowed"
    type_suffix = "bad-target"


class PayloadTooLarge(ClientError):
    status = 413
    title = "Payload too large"
    type_suffix = "too-large"


class HeadersTooLarge(ClientError):
    status = 431
    title = "Request header fields too large"
    type_suffix = "headers-too-large"


class UnsupportedMediaType(ClientError):
    status = 415
    title = "Unsupported media type"
    type_suffix = "unsupported-media-type"


class Uncompensable(ClientError):
    """An atomic batch holds a call that has neither an upstream transaction nor an undo."""

    status = 422
    title = "Batch cannot be made atomic"
    type_suffix = "uncompensable"


class MixedCredentials(Uncompensable):
    """An atomic batch whose calls to one transactional upstream carry different credentials."""

    title = "Mixed credentials in one upstream transaction"
    type_suffix = "mixed-credentials"


class MethodRefused(ClientError):
    """A method the resource does not take (CONNECT or TRACE on a route that does not list it, or
    anything but the declared methods on the gateway's own endpoints); `allow` becomes `Allow`."""

    status = 405
    title = "Method not allowed"
    type_suffix = "method-not-allowed"

    def __init__(self, detail: str, *, allow: tuple[str, ...], where: str | None = None) -> None:
        super().__init__(detail, where=where)
        self.allow = allow


class RouteNotFound(ClientError):
    status = 404
    title = "No route"
    type_suffix = "no-route"


class UpstreamError(GatewayError):
    """The upstream could not be reached or did not answer in time."""

    status = 502
    title = "Bad gateway"
    type_suffix = "upstream-unavailable"
    kind: str = "connection"
    """For metrics: connect, connect_timeout, timeout, tls, reset, invalid_response, oversize,
    not_sent, busy (see upstream.translate_errors)."""

    def __init__(
        self, detail: str, *, where: str | None = None, maybe_executed: bool = False,
        kind: str | None = None, limit: str | None = None,
    ):
        super().__init__(detail, where=where, limit=limit)
        self.maybe_executed = maybe_executed
        if kind is not None:
            self.kind = kind


class UpstreamUnavailable(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    status = 504
    title = "Gateway timeout"
    type_suffix = "upstream-timeout"


class JournalUnavailable(GatewayError):
    """The journal could not be written (disk full, read-only): no atomic batch can start."""

    status = 503
    title = "Journal unavailable"
    type_suffix = "journal-unavailable"


class BatchLost(JournalUnavailable):
    """A shared journal refused a write: this instance's lease lapsed (it was paused past it, or cut
    off) or another instance took the batch over. The batch is stopped here: no further call."""

    title = "Batch taken over"
    type_suffix = "batch-lost"


class RequestTimeout(ClientError):
    """The client did not send its request body in time; nothing was sent upstream."""

    status = 408
    title = "Request timeout"
    type_suffix = "request-timeout"


class UpstreamBusy(UpstreamError):
    """Every pooled connection to the upstream stayed busy for `timeouts.pool`; nothing was sent."""

    kind = "busy"
    limit = "timeouts.pool"
    status = 503
    title = "Upstream busy"
    type_suffix = "upstream-busy"


class ShuttingDown(GatewayError):
    status = 503
    title = "Shutting down"
    type_suffix = "shutting-down"


class ConfigError(Exception):
    """An invalid config file: names the file, the key path and what is wrong."""

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        super().__init__(f"{file}: {key_path}: {problem}")
        self.file = file
        self.key_path = key_path
        self.problem = problem
