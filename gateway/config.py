"""The gateway's YAML config: its schema, cross-field checks and loading with exact error messages.

An invalid file raises ConfigError naming the file, the key path and the problem; nothing else escapes.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from gateway.atomicity.templates import TemplateError, check_template, path_params, undo_names
from gateway.errors import ConfigError
from gateway.model import BatchLimits
from gateway.tls import check_ca_file, check_cert_file, check_key_pair, check_server_name

_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_path(value: str) -> str:
    if not _PATH_RE.match(value) or "//" in value or "/../" in f"{value}/":
        raise ValueError(f"must be an absolute path such as /api, got {value!r}")
    return value.rstrip("/") or "/"


Path_ = Annotated[str, Field(min_length=1)]


class ListenTls(_Strict):
    """Serve the gateway over HTTPS (relative paths are from the working directory)."""

    cert_file: str
    """PEM certificate of the gateway, followed by its intermediates."""
    key_file: str
    """Its unencrypted PEM private key."""

    @field_validator("cert_file")
    @classmethod
    def _cert_file(cls, value: str) -> str:
        return check_cert_file(value)

    @field_validator("key_file")
    @classmethod
    def _key_file(cls, value: str, info: ValidationInfo) -> str | None:
        return check_key_pair(value, info.data.get("cert_file"))


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int | Literal["auto"] = 1
    """Worker processes sharing the port (SO_REUSEPORT); 1 serves from the main process; `auto`:
    one per CPU this process may run on."""
    loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The event loop: `auto` is uvloop where it is installed (a Linux dependency), else asyncio's."""
    header_timeout: float = Field(10.0, gt=0)
    """A connection has this long to send a request's headers (once open or since its last answer)."""
    keepalive_timeout: float = Field(60.0, gt=0)
    """An idle keep-alive connection is closed after this long."""
    backlog: int = Field(1024, ge=16)
    """Connections the kernel queues before the gateway accepts them (capped by net.core.somaxconn);
    when full, new clients' SYNs are dropped and they retry a second later."""
    max_connections: int = Field(4096, ge=16)
    """Open client connections per process (also capped by the file descriptor limit); when full,
    the connection idle or stuck in its headers longest is closed to make room."""
    tls: ListenTls | None = None
    """Serve HTTPS with this certificate instead of plain HTTP."""

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("must be from 1 to 64, or auto")
        return value

    @property
    def worker_count(self) -> int:
        """`workers`, with `auto` resolved to the CPUs this process may use (at most 64)."""
        if self.workers != "auto":
            return int(self.workers)
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return max(1, min(64, cpus))


class Timeouts(_Strict):
    connect: float = Field(5.0, gt=0)
    total: float = Field(30.0, gt=0)
    pool: float = Field(2.0, gt=0)
    """The longest wait for a free connection of the pool; then 503 upstream-busy."""
    idle: float = Field(30.0, gt=0)
    """How long a kept-alive connection to the upstream may stay unused before the gateway closes
    it. Keep it below the upstream's own idle timeout (Node.js closes after 5 s): a request sent
    just as the upstream closes its end fails (and is never re-sent once a byte went out)."""


class Proxy(_Strict):
    """Request bodies on the plain proxy path."""

    buffer_bytes: int = Field(1024 * 1024, ge=0)
    """A body up to this size is read completely before an upstream connection is taken."""
    body_timeout: float = Field(30.0, gt=0)
    """A buffered body (and a batch body) must arrive within this; else 408."""
    body_idle_timeout: float = Field(10.0, gt=0)
    """A streamed (bigger) body may pause this long between chunks; else the call is abandoned."""


class CallTemplate(_Strict):
    """An HTTP call the gateway makes on its own: method and a path template like /tx/{token}."""

    method: str = "POST"
    path: str
    body: Any = None

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value.upper() not in _METHODS:
            raise ValueError(f"unknown HTTP method {value!r}")
        return value.upper()

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or value.startswith("//"):
            raise ValueError(f"must be an origin-form path template starting with /, got {value!r}")
        return value


class TokenSource(_Strict):
    """Where the transaction token is in the begin response: a JSON field or a header."""

    json_field: str | None = None
    header: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenSource:
        if (self.json_field is None) == (self.header is None):
            raise ValueError("give exactly one of json_field or header")
        return self


class Transactions(_Strict):
    begin: CallTemplate
    token: TokenSource
    header: str = "X-Transaction-Token"
    commit: CallTemplate
    rollback: CallTemplate
    timeout: float = Field(10.0, gt=0)
    """How long the gateway waits for a begin, commit or rollback call."""
    lifetime: float | None = Field(None, gt=0)
    """Seconds the upstream should keep an unfinished transaction, rendered as `{timeout}` in the
    begin template (path, query or body) so an orphaned transaction ends on its own; default
    batch.limits.batch_timeout + batch.rollback.deadline."""


class CompensationRule(_Strict):
    """Undo for calls matching method + path template; templates see {path.x}, {response...}."""

    method: str
    path: str
    undo: CallTemplate
    snapshot: CallTemplate | None = None

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        return CallTemplate._method(value)


class UpstreamTls(_Strict):
    """TLS to an https upstream (relative paths are from the working directory)."""

    ca_file: str | None = None
    """PEM bundle of the CAs trusted for this upstream, instead of the system's."""
    cert_file: str | None = None
    """Client certificate (PEM, with its intermediates) for an upstream that requires mTLS."""
    key_file: str | None = Field(None, validate_default=True)
    """Its unencrypted PEM private key: both cert_file and key_file, or neither."""
    server_name: str | None = None
    """The name sent as SNI and verified in the certificate, when the URL's host is an IP address
    or another name."""
    verify: bool = True
    """False accepts any certificate (no CA, no name check): for testing only, warned at start-up."""

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        return None if value is None else check_ca_file(value)

    @field_validator("cert_file")
    @classmethod
    def _cert_file(cls, value: str | None) -> str | None:
        return None if value is None else check_cert_file(value)

    @field_validator("key_file")
    @classmethod
    def _key_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return check_key_pair(value, info.data.get("cert_file"))

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, value: str | None) -> str | None:
        return None if value is None else check_server_name(value)


_STATUS_RANGE_RE = re.compile(r"^\s*([0-9]{3})\s*(?:-\s*([0-9]{3})\s*)?$")
_QUERY_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*$")


class Health(_Strict):
    """How the gateway judges the upstream (gateway/health.py; reported by /readyz and a gauge).

    Passive, always on: `failures` consecutive connect failures or timeouts of real calls mark it
    `down` for `cooldown` seconds; then it is `probing` and the next call decides. Any answer marks
    it `up`. Calls are never held back: this is reporting. With `path`, the gateway also GETs that
    path every `interval` seconds through the upstream's pool (its TLS settings apply) and feeds the
    same state: a status outside `expect_status` counts as a failure too.
    """

    failures: int = Field(5, ge=1, le=1000)
    """Consecutive connect failures or timeouts (or failed active checks) that mark it down."""
    cooldown: float = Field(10.0, gt=0)
    """Seconds it stays down before it is probing (the next call or check decides)."""
    required: bool = False
    """While this upstream is down, /readyz answers 503; by default it is only reported."""
    path: str | None = None
    """The active check's origin-form path (a query allowed); none: passive only."""
    interval: float = Field(10.0, gt=0)
    """Seconds from the end of one active check to the start of the next."""
    timeout: float = Field(2.0, gt=0)
    """Longest an active check may take (timeouts.total still caps it)."""
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    """Statuses that pass an active check: numbers and ranges such as "200-399"."""

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None:
            path, _, query = value.partition("?")
            _check_path(path)
            if not _QUERY_RE.match(query):
                raise ValueError(f"must be an origin-form path such as /healthz, got {value!r}")
        return value

    @field_validator("expect_status", mode="before")
    @classmethod
    def _statuses(cls, value: Any) -> tuple[tuple[int, int], ...]:
        items = value if isinstance(value, list | tuple) else [value]
        if not items:
            raise ValueError("give at least one status or range")
        ranges = []
        for item in items:
            match = _STATUS_RANGE_RE.match(item) if isinstance(item, str) else None
            if isinstance(item, int) and not isinstance(item, bool):
                low = high = item
            elif match is not None:
                low, high = int(match[1]), int(match[2] or match[1])
            elif isinstance(item, list | tuple) and len(item) == 2 and all(type(n) is int for n in item):
                low, high = item
            else:
                raise ValueError(f"{item!r} is not a status such as 204 or a range such as \"200-399\"")
            if not 100 <= low <= high <= 599:
                raise ValueError(f"{item!r} is not a status or range within 100-599")
            ranges.append((low, high))
        return tuple(ranges)

    def passes(self, status: int) -> bool:
        """Whether an active check that answered `status` passed."""
        return any(low <= status <= high for low, high in self.expect_status)


class Upstream(_Strict):
    url: str
    timeouts: Timeouts = Timeouts()
    pool_size: int = Field(100, ge=1, le=10_000)
    concurrency: int = Field(50, ge=1, le=10_000)
    """Batch sub-requests in flight to this upstream (all batches together): half the default pool,
    so proxied requests always find connections."""
    transactions: Transactions | None = None
    compensations: tuple[CompensationRule, ...] = ()
    infer_compensations: bool = True
    recreate_deleted_with: Literal["PUT", "POST"] = "PUT"
    idempotency_keys: bool = False
    """The upstream honours Idempotency-Key (a repeated key replays the first answer): recovery
    may then re-send a call whose outcome is unknown to learn what it did."""
    tls: UpstreamTls | None = None
    """TLS settings of an https upstream: private CA, client certificate, SNI name, verification."""
    health: Health = Health()
    """Passive health tracking, an optional active check, and whether /readyz requires it."""
    client: Literal["lean", "aiohttp"] = "lean"
    """The HTTP client for this upstream: the gateway's own lean one (gateway/lean_client/, about a
    third of aiohttp's CPU per call) or aiohttp's ClientSession."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"must be an absolute http(s) URL such as http://127.0.0.1:9000, got {value!r}")
        if url.query_string or url.fragment or url.user:
            raise ValueError(f"must not carry a query, fragment or credentials, got {value!r}")
        return value.rstrip("/")

    @field_validator("tls")
    @classmethod
    def _tls_needs_https(cls, value: UpstreamTls | None, info: ValidationInfo) -> UpstreamTls | None:
        url = info.data.get("url")
        if value is not None and url is not None and URL(url).scheme != "https":
            raise ValueError(f"only allowed on an https:// upstream, and url is {url!r}")
        return value


class Route(_Strict):
    prefix: str
    upstream: str
    methods: tuple[str, ...] | None = None
    strip_prefix: bool = False
    add_prefix: str = ""

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return _check_path(value)

    @field_validator("add_prefix")
    @classmethod
    def _add_prefix(cls, value: str) -> str:
        return "" if value in ("", "/") else _check_path(value)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """A route may also list TRACE or CONNECT: only then does the proxy pass them on."""
        if value is not None:
            for method in value:
                if method.upper() not in ("TRACE", "CONNECT"):
                    CallTemplate._method(method)
            return tuple(m.upper() for m in value)
        return value


class Limits(_Strict):
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_items: int = Field(1000, ge=1)
    max_depth: int = Field(8, ge=1)
    max_part_headers: int = Field(100, ge=1)
    max_part_header_bytes: int = Field(60 * 1024, ge=64)
    max_response_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_batch_buffer_bytes: int = Field(64 * 1024 * 1024, ge=1)
    """Sub-response bytes one batch may hold until its answer is written."""
    max_buffered_bytes: int = Field(256 * 1024 * 1024, ge=1)
    """Sub-response bytes all batches of this process may hold together."""
    call_timeout: float = Field(30.0, gt=0)
    batch_timeout: float = Field(120.0, gt=0)

    def batch_limits(self) -> BatchLimits:
        return BatchLimits(
            max_body_bytes=self.max_body_bytes,
            max_items=self.max_items,
            max_depth=self.max_depth,
            max_part_headers=self.max_part_headers,
            max_part_header_bytes=self.max_part_header_bytes,
        )


class BatchEndpoint(_Strict):
    path: str
    atomic: bool = False
    execution: Literal["Serial", "Unordered"] = "Serial"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_path(value)


class Rollback(_Strict):
    attempts: int = Field(5, ge=1, le=100)
    initial_backoff: float = Field(0.05, ge=0)
    max_backoff: float = Field(2.0, ge=0)
    deadline: float = Field(30.0, gt=0)


def _check_origins(value: tuple[str, ...]) -> tuple[str, ...]:
    """`public_origins`: each `scheme://host[:port]` (http or https, no path, query or userinfo),
    without a trailing slash."""
    for origin in value:
        url = URL(origin)
        if not url.absolute or url.scheme not in ("http", "https") or url.raw_path not in ("", "/") \
                or url.query_string or url.fragment or url.user is not None:
            raise ValueError(f"{origin!r} must be an origin such as https://api.example.com")
    return tuple(origin.rstrip("/") for origin in value)


class ODataEndpoint(_Strict):
    """`batch.odata`: OData `$batch` (4.01 JSON and multipart with change sets, V4 and V2) at `path`;
    relative request URLs resolve against the path without its last segment (the service root)."""

    path: str
    atomic: bool = True
    """Change sets / atomicity groups run all-or-nothing; false refuses batches that hold one."""
    max_items: int = Field(100, ge=1)
    """Requests per batch (change set members included); `batch.limits` applies as well."""
    public_origins: tuple[str, ...] = ()
    """`scheme://host[:port]` names clients use for the gateway, besides the request's own origin:
    an absolute request URL is accepted on these (the origin stripped), no other."""

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_path(value)

    @field_validator("public_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_origins(value)


class GraphEndpoint(_Strict):
    """`batch.graph`: Microsoft Graph JSON batching at `path` (e.g. `/v1.0/$batch`); request URLs
    are gateway targets, relative to the service root (the path without its last segment)."""

    path: str
    atomic: bool = False
    """Default of `X-Batch-Atomic`: true makes every batch one all-or-nothing group."""
    max_items: int = Field(20, ge=1)
    """Requests per batch (Graph's own limit is 20); `batch.limits` applies as well."""
    public_origins: tuple[str, ...] = ()
    """`scheme://host[:port]` names clients use for the gateway, besides the request's Host: an
    absolute request URL is accepted on these (origin and service root stripped), no other."""

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_path(value)

    @field_validator("public_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_origins(value)


class CompositeEndpoint(_Strict):
    """`batch.composite`: Salesforce Composite at `path`; under `/services/data/vXX.X/...` that
    prefix is stripped from subrequest URLs (simple-salesforce's `restful("composite")`)."""

    path: str
    atomic: bool = False
    """Default of `X-Batch-Atomic` (`allOrNone: true` in the request is atomic regardless)."""
    max_items: int = Field(25, ge=1)
    """Subrequests per request (Salesforce's own limit is 25); `batch.limits` applies as well."""

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_path(value)


class BatchConfig(_Strict):
    json_endpoint: BatchEndpoint = Field(
        BatchEndpoint(path="/batch/v1", atomic=False), alias="json"
    )
    multipart_endpoint: BatchEndpoint = Field(
        BatchEndpoint(path="/v1/api/batch", atomic=True), alias="multipart"
    )
    limits: Limits = Limits()
    rollback: Rollback = Rollback()
    odata: ODataEndpoint | None = None
    graph: GraphEndpoint | None = None
    composite: CompositeEndpoint | None = None

    @model_validator(mode="after")
    def _distinct_paths(self) -> BatchConfig:
        """Two batch endpoints on one path: aiohttp would refuse the second route at start-up."""
        seen: dict[str, str] = {}
        for name in ("json", "multipart", "odata", "graph", "composite"):
            endpoint = getattr(self, _BATCH_FIELDS.get(name, name))
            if endpoint is None:
                continue
            if endpoint.path in seen:
                other = seen[endpoint.path]
                raise ValueError(f"batch.{name}.path {endpoint.path!r} is batch.{other}.path too")
            seen[endpoint.path] = name
        return self


_BATCH_FIELDS = {"json": "json_endpoint", "multipart": "multipart_endpoint"}


DEFAULT_SENSITIVE_HEADERS = ("Authorization", "Cookie", "Proxy-Authorization")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Journal(_Strict):
    path: str = "gateway-journal.sqlite3"
    retention_hours: float = Field(168.0, gt=0)
    sensitive_headers: tuple[str, ...] = ()
    """Besides DEFAULT_SENSITIVE_HEADERS: kept apart, erased once a batch is final, encrypted at rest
    when a key is set; also what counts as a call's credentials on a transactional upstream."""
    key_env: str | None = None
    """Name of an environment variable holding the Fernet key that encrypts sensitive headers."""
    key_file: str | None = None
    """Or a file holding that key (one line)."""
    max_batch_bytes: int = Field(32 * 1024 * 1024, ge=4096)
    """What one atomic batch may write to the journal (intents, snapshots, outcomes)."""
    url: str | None = None
    """A shared PostgreSQL journal (`postgresql://user:pass@host:5432/db`, `?host=/socket/dir` for a
    unix socket) instead of the SQLite file: several replicas share it (leases, takeover, fencing)."""
    db_schema: str = "gateway"
    """The PostgreSQL schema holding the journal's tables (created at start-up)."""
    lease_seconds: float = Field(15.0, gt=0, le=3600)
    """How long an instance owns its batches without renewing (renewed every third of it)."""
    pool_size: int = Field(10, ge=1, le=1000)
    """PostgreSQL connections per process."""
    timeout: float = Field(5.0, gt=0, le=300)
    """Seconds for connecting to PostgreSQL and for each journal statement."""

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = URL(value)
        if parsed.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// or postgres:// URL")
        if not parsed.path.strip("/") and not parsed.query.get("dbname"):
            raise ValueError("must name a database (postgresql://host/DBNAME)")
        return value

    @field_validator("db_schema")
    @classmethod
    def _schema_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
            raise ValueError(f"{value!r} is not a schema name: lower-case letters, digits and _, "
                             "not starting with a digit, at most 63")
        return value

    @model_validator(mode="after")
    def _one_store(self) -> Journal:
        if self.url is not None and "path" in self.model_fields_set:
            raise ValueError("give either path (SQLite) or url (PostgreSQL), not both")
        return self

    @field_validator("sensitive_headers")
    @classmethod
    def _header_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _TOKEN_RE.match(name):
                raise ValueError(f"{name!r} is not a header name")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> Journal:
        if self.key_env is not None and self.key_file is not None:
            raise ValueError("give at most one of key_env and key_file")
        return self

    @property
    def sensitive(self) -> frozenset[str]:
        """Lower-case names of the headers treated as secrets."""
        return frozenset(name.lower() for name in (*DEFAULT_SENSITIVE_HEADERS, *self.sensitive_headers))


_LOG_LEVELS = Literal["debug", "info", "warning", "off"]
DEFAULT_REDACTED_QUERY = (
    "access_token", "api_key", "apikey", "code", "key", "password", "secret", "sig", "signature",
    "token",
)


class LogSettings(_Strict):
    subrequest_level: _LOG_LEVELS = "debug"
    """Level of the one line per sub-request: `debug` by default, so not written at the usual INFO
    (it costs about 12 us per call, a tenth of a sub-request); `info` writes it, `off` never."""
    redact_query_params: tuple[str, ...] = DEFAULT_REDACTED_QUERY
    """Query parameters whose values the access line shows as `REDACTED` (case-insensitive)."""


class TracingSettings(_Strict):
    enabled: bool = False
    """OpenTelemetry spans, exported as the standard OTEL_* variables say (needs the `otel` extra)."""
    service_name: str = Field("batch-gateway", min_length=1)
    """`service.name` of the spans, unless OTEL_SERVICE_NAME is set."""


class GatewayEndpoints(_Strict):
    prefix: str = "/_gateway"

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if _check_path(value) == "/":
            raise ValueError("must not be / (it would shadow every route)")
        return _check_path(value)


class GatewayConfig(_Strict):
    listen: Listen = Listen()
    upstreams: dict[str, Upstream]
    routes: tuple[Route, ...]
    batch: BatchConfig = BatchConfig()
    journal: Journal = Journal()
    gateway: GatewayEndpoints = GatewayEndpoints()
    proxy: Proxy = Proxy()
    logging: LogSettings = LogSettings()
    tracing: TracingSettings = TracingSettings()
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs of proxies in front of the gateway whose X-Forwarded-* / Forwarded are kept."""
    shutdown_grace: float = Field(30.0, ge=0)
    """From the end of the drain delay, the whole shutdown (in-flight requests and batches) ends
    within this; what is still running then is cut off (atomic batches are recovered at start-up)."""
    watch_config: bool = False
    """Reload when the config file changes (checked every 2 s), as well as on SIGHUP."""
    drain_delay: float = Field(0.0, ge=0)
    """On SIGTERM, /readyz fails at once but the listener stays open this long, so load balancers
    stop sending before connections are refused."""

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP address or CIDR such as 10.0.0.0/8") from None
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> GatewayConfig:
        _check_routes(self)
        _check_templates(self)
        return self


def _reserved_paths(config: GatewayConfig) -> dict[str, str]:
    return {
        config.gateway.prefix: "gateway.prefix",
        config.batch.json_endpoint.path: "batch.json.path",
        config.batch.multipart_endpoint.path: "batch.multipart.path",
        **({config.batch.odata.path: "batch.odata.path"} if config.batch.odata else {}),
        **({config.batch.graph.path: "batch.graph.path"} if config.batch.graph else {}),
        **({config.batch.composite.path: "batch.composite.path"} if config.batch.composite else {}),
    }


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def _check_routes(config: GatewayConfig) -> None:
    if not config.upstreams:
        raise _KeyedError("upstreams", "at least one upstream is required")
    seen: dict[tuple[str, str], int] = {}
    for index, route in enumerate(config.routes):
        if route.upstream not in config.upstreams:
            known = ", ".join(sorted(config.upstreams))
            raise _KeyedError(
                f"routes.{index}.upstream", f"unknown upstream {route.upstream!r} (known: {known})"
            )
        for reserved, key in _reserved_paths(config).items():
            if _under(route.prefix, reserved):
                raise _KeyedError(
                    f"routes.{index}.prefix",
                    f"route {route.prefix!r} would be shadowed by the gateway's own endpoint "
                    f"{reserved!r} ({key}); move one of them",
                )
        for method in route.methods or ("*",):
            other = seen.get((route.prefix, method), seen.get((route.prefix, "*")))
            if other is None and method == "*":
                other = next((i for (p, _), i in seen.items() if p == route.prefix), None)
            if other is not None:
                raise _KeyedError(
                    f"routes.{index}.prefix",
                    f"overlaps routes.{other} (same prefix {route.prefix!r} and method); "
                    "one of them could never be reached",
                )
            seen[(route.prefix, method)] = index


def _check_templates(config: GatewayConfig) -> None:
    """Compile match paths and check every placeholder at load, not when a batch needs the rule."""
    for name, upstream in config.upstreams.items():
        for index, rule in enumerate(upstream.compensations):
            _check_rule(rule, f"upstreams.{name}.compensations.{index}")
        if upstream.transactions is not None:
            _check_transaction_calls(upstream.transactions, f"upstreams.{name}.transactions")


def _check_rule(rule: CompensationRule, key: str) -> None:
    try:
        params = path_params(rule.path)
    except TemplateError as exc:
        raise _KeyedError(f"{key}.path", str(exc)) from None
    allowed = undo_names(params, snapshot=rule.snapshot is not None)
    _check_call(rule.undo, f"{key}.undo", allowed)
    if rule.snapshot is not None:
        _check_call(rule.snapshot, f"{key}.snapshot", [f"path.{param}" for param in params])


def _check_transaction_calls(settings: Transactions, key: str) -> None:
    _check_call(settings.begin, f"{key}.begin", ["timeout"])
    _check_call(settings.commit, f"{key}.commit", ["token"])
    _check_call(settings.rollback, f"{key}.rollback", ["token"])


def _check_call(call: CallTemplate, key: str, allowed: Sequence[str]) -> None:
    for field, template in (("path", call.path), ("body", call.body)):
        try:
            check_template(template, allowed)
        except TemplateError as exc:
            raise _KeyedError(f"{key}.{field}", str(exc)) from None


class _KeyedError(ValueError):
    def __init__(self, key_path: str, problem: str) -> None:
        super().__init__(problem)
        self.key_path = key_path
        self.problem = problem


class ConfigProblems(ConfigError):
    """Every problem found in one file. As a ConfigError it reads as the first one (one line);
    `problems` holds them all, in the order found (`check-config` prints each)."""

    def __init__(self, problems: Sequence[ConfigError]) -> None:
        first = problems[0]
        super().__init__(first.file, first.key_path, first.problem)
        self.problems = tuple(problems)


def problems_of(error: ConfigError) -> tuple[ConfigError, ...]:
    """The single problems a ConfigError stands for (itself, or each one of a ConfigProblems)."""
    return error.problems if isinstance(error, ConfigProblems) else (error,)


def _raise_all(problems: Sequence[ConfigError]) -> None:
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigProblems(problems)


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a config file; raises ConfigError (ConfigProblems when there are several),
    never a library exception. `${VAR}` in string values are expanded from `environ` (os.environ)."""
    data, problems = _read_expanded(path, os.environ if environ is None else environ)
    try:
        config = parse_config(data, str(path))
    except ConfigError as exc:
        unexpanded = {problem.key_path for problem in problems}  # not reported twice
        problems += [problem for problem in problems_of(exc) if problem.key_path not in unexpanded]
    _raise_all(problems)
    return config


def read_config_data(path: str | Path, *, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The file as a mapping: read, parsed (duplicate keys refused) and with `${VAR}` expanded."""
    data, problems = _read_expanded(path, os.environ if environ is None else environ)
    _raise_all(problems)
    return data


def journal_settings(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Journal | None:
    """The journal section of a file that may be invalid elsewhere, when it is valid on its own
    (for `check-config`, which checks the key and the location of the journal too); else None."""
    try:
        data, problems = _read_expanded(path, os.environ if environ is None else environ)
        if any(problem.key_path.split(".")[0] == "journal" for problem in problems):
            return None
        return Journal.model_validate(data.get("journal") or {})
    except (ConfigError, ValidationError):
        return None


def _read_expanded(path: str | Path, environ: Mapping[str, str]) -> tuple[dict[str, Any], list[ConfigError]]:
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, "(file)", f"cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(name, "(file)", f"not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(name, "(root)", "must be a mapping with upstreams and routes")
    problems: list[ConfigError] = []
    expanded = expand_env(data, name, environ, problems)
    assert isinstance(expanded, dict)
    return expanded, problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the SafeLoader refuses it below
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r}", key_node.start_mark,
                    f"first at line {first.start_mark.line + 1}",
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where (1-based line, column)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        note = f" ({exc.note})" if exc.note else ""
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}{note}"
    return " ".join(str(exc).split())


_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)(\}?)")
_ENV_INNER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def expand_env(
    value: Any, name: str, environ: Mapping[str, str], problems: list[ConfigError], key_path: str = ""
) -> Any:
    """`${VAR}` and `${VAR:-default}` in every string value (not in keys), recursively; `$${` is a
    literal `${`. The default applies when VAR is unset or empty. An unset VAR without a default,
    or a malformed reference, is appended to `problems` naming the variable and the key path."""
    if isinstance(value, dict):
        return {
            key: expand_env(item, name, environ, problems, _join(key_path, key))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            expand_env(item, name, environ, problems, _join(key_path, index))
            for index, item in enumerate(value)
        ]
    if not isinstance(value, str) or "${" not in value:
        return value
    where = key_path or "(root)"

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        reference = f"${{{match.group(1)}{match.group(2)}"
        inner = _ENV_INNER.fullmatch(match.group(1))
        if not match.group(2) or inner is None or "${" in (inner.group(2) or ""):
            problems.append(ConfigError(
                name, where,
                f"malformed {reference!r}: use ${{NAME}} or ${{NAME:-default}} (no nesting), "
                "or $${ for a literal ${",
            ))
            return reference
        variable, default = inner.group(1), inner.group(2)
        found = environ.get(variable)
        if default is not None:
            return found or default
        if found is None:
            problems.append(ConfigError(
                name, where,
                f"environment variable {variable} is not set (and ${{{variable}}} has no "
                f"default; write ${{{variable}:-default}} for one)",
            ))
            return reference
        return found

    return _ENV_REF.sub(substitute, value)


def _join(key_path: str, key: Any) -> str:
    return f"{key_path}.{key}" if key_path else str(key)


def parse_config(data: dict[str, Any], name: str = "<config>") -> GatewayConfig:
    """Validate an already-parsed mapping (used by load_config and the demo)."""
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise _to_config_error(exc, name) from None


def _to_config_error(exc: ValidationError, name: str) -> ConfigError:
    """Every validation error (a cross-field check stops at its first), as one ConfigError."""
    problems: list[ConfigError] = []
    seen: set[tuple[str, str]] = set()
    for error in exc.errors():
        problem = _one_problem(error, name)
        if (problem.key_path, problem.problem) not in seen:
            seen.add((problem.key_path, problem.problem))
            problems.append(problem)
    return problems[0] if len(problems) == 1 else ConfigProblems(problems)


def _one_problem(error: Any, name: str) -> ConfigError:
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _KeyedError):
        return ConfigError(name, cause.key_path, cause.problem)
    key_path = ".".join(str(part) for part in error["loc"]) or "(root)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    return ConfigError(name, key_path, message)
