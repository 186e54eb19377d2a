"""Upstream clients (one keep-alive pool per upstream: the lean client or aiohttp's ClientSession),
the one `send` call and the proxy's `stream`; client exceptions become the gateway's UpstreamErrors.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import structlog
from yarl import URL

from gateway.budget import BudgetExceeded, ByteBudget
from gateway.config import GatewayConfig
from gateway.errors import UpstreamBusy, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.fair_slots import FairSlots
from gateway.headers import safe_reason
from gateway.lean_client import LeanError, LeanPool
from gateway.lean_upstream import LeanStream, lean_error, lean_pool, utf8_headers
from gateway.metrics import GatewayMetrics, status_class
from gateway.model import Headers, SubResponse
from gateway.tls import server_name, upstream_context
from gateway.tracing import PASS_THROUGH, Span, Tracing

log = structlog.get_logger("gateway.upstream")

OutcomeHook = Callable[[str, UpstreamError | None], None]
"""Called with (upstream, None) when a call (batch or proxied) got a valid status, or (upstream, error)
when it ended in one of the gateway's upstream errors: gateway/health.py sorts out the kinds."""

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """A fully resolved call on one configured upstream."""

    upstream: str
    method: str
    url: URL
    headers: Headers
    body: bytes | None = None
    timeout: float | None = None
    purpose: str = "subrequest"
    """What the call is for, in metrics and spans: subrequest, snapshot, undo, begin, commit,
    rollback, replay, health_check (the proxy's calls are `proxy`)."""
    item: str | None = None
    """The batch item it belongs to (JSON pointer or part number), when there is one."""
    path_template: str | None = None
    """The configured template the path was rendered from (transaction calls), for spans."""

    def with_timeout(self, timeout: float) -> UpstreamCall:
        """This call with its own timeout (what `dataclasses.replace` does at half its cost; it runs
        once per sub-request). A new field must be passed on here too (a test checks it)."""
        return UpstreamCall(
            upstream=self.upstream, method=self.method, url=self.url, headers=self.headers,
            body=self.body, timeout=timeout, purpose=self.purpose, item=self.item,
            path_template=self.path_template,
        )


CLIENT_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError)
"""What aiohttp's client raises for a call that failed (see `client_error`)."""


@contextmanager
def translate_errors(upstream: str) -> Iterator[None]:
    """Turn aiohttp client errors into the gateway's own (see `client_error`)."""
    try:
        yield
    except CLIENT_ERRORS as exc:
        raise client_error(upstream, exc) from exc


def client_error(upstream: str, exc: Exception) -> UpstreamError:
    """The gateway's error for one of CLIENT_ERRORS, most specific first.

    The client sees the upstream's configured name and a stable reason; the full error (addresses,
    DNS and TLS details) is logged under the request id. A ValueError (aiohttp.InvalidURL is one)
    is raised while the request is built, before a byte is written: that call was not executed.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        _log_detail(upstream, exc)
        return UpstreamTimeout(f"connecting to upstream {upstream!r} timed out", kind="connect_timeout")
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return UpstreamTimeout(f"upstream {upstream!r} did not answer in time", maybe_executed=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        _log_detail(upstream, exc)
        kind, reason = _classify(exc)
        return UpstreamUnavailable(f"upstream {upstream!r} is unreachable ({reason})", kind=kind)
    _log_detail(upstream, exc)
    if isinstance(exc, ValueError):  # aiohttp refused to build the request (URL, header): nothing was sent
        return UpstreamError(
            f"the gateway refused to send a call to upstream {upstream!r} (an invalid URL or header)",
            kind="not_sent",
        )
    assert isinstance(exc, aiohttp.ClientError)
    kind, reason = _classify(exc)
    return UpstreamUnavailable(
        f"connection to upstream {upstream!r} failed ({reason})", maybe_executed=True, kind=kind,
    )


def _classify(exc: aiohttp.ClientError) -> tuple[str, str]:
    """(the metrics label, gateway_upstream_errors_total{kind}; a stable, address-free reason)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "connect", "name resolution failed"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "tls", "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED
        return "connect", "connection refused" if refused else "cannot connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "reset", "connection lost"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "reset", "the response body broke off"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "invalid_response", "invalid response"
    return "reset", "connection error"


def _log_detail(upstream: str, exc: Exception) -> None:
    log.warning("upstream_error", upstream=upstream, error=type(exc).__name__, detail=str(exc)[:500])


def check_status(upstream: str, status: int) -> None:
    """A final status outside 200-599 is a failed call (502 naming the upstream): beyond 599 is not
    HTTP, and a 1xx cannot be final for a request that asked for no upgrade (a relayed 101 would
    turn the client's connection into a tunnel)."""
    if not 200 <= status <= 599:
        raise UpstreamError(
            f"upstream {upstream!r} answered status {status} as its final answer", maybe_executed=True,
            kind="invalid_response",
        )


class UpstreamPool:
    """One keep-alive client per upstream (`client: lean|aiohttp`), plus its concurrency bound for
    batch calls."""

    def __init__(
        self, config: GatewayConfig, *, max_response_bytes: int,
        on_outcome: OutcomeHook | None = None, metrics: GatewayMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._config = config
        self._max_response_bytes = max_response_bytes
        self._on_outcome = on_outcome
        self.metrics = metrics or GatewayMetrics()
        self.tracing = tracing or Tracing()
        self._sessions: dict[str, aiohttp.ClientSession | LeanPool] = {}
        self._slots = {name: FairSlots(up.concurrency) for name, up in config.upstreams.items()}
        self._connections = {
            name: asyncio.Semaphore(up.pool_size) for name, up in config.upstreams.items()
        }
        """One permit per pooled connection: a call waits at most `timeouts.pool` for one."""

    def publish_limits(self) -> None:
        """Export the pool sizes (a serving gateway's pool; not recovery's, in a supervisor)."""
        self.metrics.set_pool_limits({name: up.pool_size for name, up in self._config.upstreams.items()})

    async def start(self) -> None:
        opening = {n: up for n, up in self._config.upstreams.items() if n not in self._sessions}
        # an SSLContext per https upstream; loading CA files and the system store blocks: a thread
        contexts = await asyncio.to_thread(
            lambda: {name: upstream_context(up) for name, up in opening.items()}
        )
        for name, upstream in opening.items():  # the others were kept from the pool before a reload
            if upstream.tls is not None and not upstream.tls.verify:
                log.warning("upstream_tls_unverified", upstream=name,
                            detail="tls.verify is false: any certificate is accepted (for testing only)")
            context = contexts[name]
            if upstream.client == "lean":
                self._sessions[name] = lean_pool(upstream, context)
                continue
            connector = aiohttp.TCPConnector(
                limit=upstream.pool_size, limit_per_host=upstream.pool_size,
                keepalive_timeout=upstream.timeouts.idle,
                ssl=True if context is None else context,
            )
            timeout = aiohttp.ClientTimeout(
                total=upstream.timeouts.total, sock_connect=upstream.timeouts.connect
            )
            self._sessions[name] = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                trust_env=False,
            )

    def reconfigured(
        self, config: GatewayConfig, *, on_outcome: OutcomeHook | None = None,
    ) -> UpstreamPool:
        """The pool for a reloaded config: an unchanged upstream keeps its session, slots and
        connection permits (no reconnect storm); changed and new ones get fresh ones on start()."""
        pool = UpstreamPool(
            config, max_response_bytes=config.batch.limits.max_response_bytes,
            on_outcome=on_outcome or self._on_outcome,
            metrics=self.metrics, tracing=self.tracing,
        )
        for name, upstream in config.upstreams.items():
            if name in self._sessions and self._config.upstreams.get(name) == upstream:
                pool._sessions[name] = self._sessions[name]
                pool._slots[name] = self._slots[name]
                pool._connections[name] = self._connections[name]
        return pool

    async def close_unshared(self, successor: UpstreamPool) -> None:
        """Close the sessions `successor` did not take over (after a reload, once idle)."""
        for name, session in list(self._sessions.items()):
            if successor._sessions.get(name) is not session:
                await session.close()
            del self._sessions[name]

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    @property
    def ready(self) -> bool:
        return len(self._sessions) == len(self._config.upstreams) and not any(
            s.closed for s in self._sessions.values()
        )

    def connection(self, upstream: str) -> _Permit:
        """A connection of the upstream's pool for one call, or UpstreamBusy (503) after
        `timeouts.pool`: a full pool answers quickly instead of queueing without end."""
        return _Permit(self, upstream)

    def bound(self, upstream: str, batch: Hashable) -> _TimedSlot:
        """A batch call slot on this upstream (`concurrency` of them), shared fairly by batches."""
        return _TimedSlot(self._slots[upstream], batch, self.metrics.child(self.metrics.slot_wait, upstream))

    async def send(self, call: UpstreamCall, budget: ByteBudget | None = None) -> SubResponse:
        """Make one call and read the whole response; raises UpstreamError subclasses only.

        With a `budget`, the body's bytes are reserved from it as they arrive (the batch holds
        them until its answer is written); a body that does not fit is an UpstreamError.
        """
        with _Metered(self, call) as meter:
            span = meter.span
            client = self._sessions[call.upstream]
            if isinstance(client, LeanPool):
                return await self._send_lean(client, call, span, meter, budget)
            async with self.connection(call.upstream):
                with self._reporting(call.upstream), translate_errors(call.upstream):
                    async with self._request(call, span) as response:
                        self._accept(call.upstream, response.status)
                        body = await self._read_capped(call.upstream, _any(response.content), budget)
                        return _whole_answer(meter, response.status, response.reason,
                                       tuple(response.headers.items()), body)

    async def _send_lean(
        self, client: LeanPool, call: UpstreamCall, span: Span, meter: _Metered, budget: ByteBudget | None
    ) -> SubResponse:
        """As the aiohttp path, with its three error context managers written out as one `try`
        (on the path of every sub-request: it saves about a tenth of a call's CPU)."""
        upstream = call.upstream
        timeouts = self._config.upstreams[upstream].timeouts
        async with self.connection(upstream):
            try:
                try:
                    response = await client.request(
                        call.method, call.url.raw_path_qs, span.outgoing_headers(call.headers), call.body,
                        connect_timeout=timeouts.connect, total_timeout=self._total(call),
                    )
                    try:
                        self._accept(upstream, response.status)
                        body = await self._read_capped(upstream, response.read_chunk, budget)
                    finally:
                        response.release()
                except LeanError as exc:
                    raise lean_error(upstream, exc) from exc
                except CLIENT_ERRORS as exc:  # not the lean client's own: as on the aiohttp path
                    raise client_error(upstream, exc) from exc
            except UpstreamError as exc:
                self._report(upstream, exc)
                raise
        return _whole_answer(meter, response.status, response.reason,
                             tuple(utf8_headers(response.headers)), body)

    def _total(self, call: UpstreamCall) -> float:
        """The call's total timeout: its own (the batch deadline's share), capped by the upstream's."""
        total = self._config.upstreams[call.upstream].timeouts.total
        return total if call.timeout is None else min(call.timeout, total)

    def _accept(self, upstream: str, status: int) -> None:
        """A response head arrived: its status must be final (check_status), and it counts as an
        answer for the upstream's health."""
        check_status(upstream, status)
        self._answered(upstream)

    @contextmanager
    def _reporting(self, upstream: str, client_body: bool = False) -> Iterator[None]:
        """Tell `on_outcome` about a call that ended in an upstream error (see `_report`)."""
        try:
            yield
        except UpstreamError as exc:
            self._report(upstream, exc, client_body)
            raise

    def _report(self, upstream: str, error: UpstreamError, client_body: bool = False) -> None:
        """Tell `on_outcome` about a call that ended in an upstream error (busy pools are not).

        With a streamed `client_body`, a plain TimeoutError is that body stalling
        (proxy.body_idle_timeout; aiohttp passes it on as is, while the upstream's own timeouts
        are ServerTimeoutErrors): the client's fault, not reported.
        """
        if client_body and type(error.__cause__) is TimeoutError:
            return
        if self._on_outcome is not None:
            self._on_outcome(upstream, error)

    def _answered(self, upstream: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(upstream, None)

    def _request(self, call: UpstreamCall, span: Span) -> Any:
        kwargs: dict[str, Any] = {}
        if call.timeout is not None:  # the upstream's own total still caps a per-call timeout
            kwargs["timeout"] = aiohttp.ClientTimeout(
                total=self._total(call), sock_connect=self._config.upstreams[call.upstream].timeouts.connect
            )
        session = self._sessions[call.upstream]
        assert isinstance(session, aiohttp.ClientSession)
        return session.request(
            call.method,
            call.url,
            headers=list(span.outgoing_headers(call.headers)),
            data=call.body,
            allow_redirects=False,
            server_hostname=server_name(self._config.upstreams[call.upstream]),
            **kwargs,
        )

    async def _read_capped(
        self, upstream: str, read: Callable[[int], Awaitable[bytes]], budget: ByteBudget | None
    ) -> bytes:
        """The body in one buffer (linear in its size), within max_response_bytes and the budget;
        `read(n)` gives the next bytes (at most n), b"" at the end."""
        body = bytearray()
        limit = self._max_response_bytes
        try:
            while chunk := await read(_READ_SIZE):
                if len(body) + len(chunk) > limit:
                    raise UpstreamError(
                        f"upstream {upstream!r} answered a body over {limit} bytes, "
                        "the batch limit (limits.max_response_bytes)",
                        maybe_executed=True, kind="oversize", limit="limits.max_response_bytes",
                    )
                if budget is not None:
                    budget.take(len(chunk))
                body.extend(chunk)
        except BaseException as exc:  # what this body had reserved goes back, whatever happened
            if budget is not None:
                budget.give_back(len(body))
            if isinstance(exc, BudgetExceeded):
                raise UpstreamError(
                    f"the answer of upstream {upstream!r} was dropped: {exc}", maybe_executed=True,
                    kind="oversize", limit=exc.limit,
                ) from None
            raise
        return bytes(body)

    @asynccontextmanager
    async def stream(
        self, upstream: str, method: str, url: URL, headers: Headers, data: Any
    ) -> AsyncIterator[aiohttp.ClientResponse | LeanStream]:
        """Open a streaming call for the plain proxy; the caller reads the body in chunks.

        Streams have no total deadline: `timeouts.total` bounds each read instead. The pool
        connection is held until the caller is done with the response.
        """
        streamed = data is not None and not isinstance(data, bytes)
        call = UpstreamCall(upstream, method, url, headers, purpose="proxy")
        with _Metered(self, call) as record:
            span = record.span
            async with self.connection(upstream):
                timeouts = self._config.upstreams[upstream].timeouts
                client = self._sessions[upstream]
                if isinstance(client, LeanPool):  # the error context managers written out: hot path
                    try:
                        try:
                            lean = await client.request(
                                method, url.raw_path_qs, span.outgoing_headers(headers), data,
                                connect_timeout=timeouts.connect, read_timeout=timeouts.total,
                            )
                            try:
                                self._accept(upstream, lean.status)
                                record.head(lean.status)
                                yield LeanStream(lean)
                            finally:
                                lean.release()
                        except LeanError as exc:
                            raise lean_error(upstream, exc) from exc
                        except CLIENT_ERRORS as exc:
                            raise client_error(upstream, exc) from exc
                    except UpstreamError as exc:
                        self._report(upstream, exc, streamed)
                        raise
                    return
                with self._reporting(upstream, streamed), translate_errors(upstream):
                    timeout = aiohttp.ClientTimeout(
                        total=None, sock_connect=timeouts.connect, sock_read=timeouts.total
                    )
                    request = client.request(
                        method, url, headers=list(span.outgoing_headers(headers)), data=data,
                        allow_redirects=False, timeout=timeout,
                        server_hostname=server_name(self._config.upstreams[upstream]),
                    )
                    async with request as response:
                        self._accept(upstream, response.status)
                        record.head(response.status)
                        yield response


class _Metered:
    """One upstream call in the metrics (in flight, then status class and duration; errors by kind,
    and the limit they hit) and in its client span. A class, not a generator: it is on the hot path."""

    __slots__ = ("_call", "_counted", "_in_flight", "_pool", "_span_cm", "_started", "span", "status")

    def __init__(self, pool: UpstreamPool, call: UpstreamCall) -> None:
        self._pool, self._call = pool, call
        self.status = 0
        self._span_cm: AbstractContextManager[Span] | None = None
        self.span: Span = PASS_THROUGH
        self._counted = False

    def __enter__(self) -> _Metered:
        metrics, call = self._pool.metrics, self._call
        self._in_flight = metrics.child(metrics.upstream_in_flight, call.upstream, call.purpose)
        self._in_flight.inc()
        if self._pool.tracing.enabled:
            self._span_cm = self._pool.tracing.client_span(call)
            self.span = self._span_cm.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        metrics, call = self._pool.metrics, self._call
        self._in_flight.dec()
        self.count()
        if isinstance(exc, UpstreamError):
            metrics.upstream_error(call.upstream, exc.kind, exc.limit)
            self.span.record_failure(exc.kind, exc.detail)
        if self._span_cm is not None:
            self._span_cm.__exit__(kind, exc, tb)

    def head(self, status: int) -> None:
        """A proxied call's response head: its status, and its metrics counted now (the body
        streams at the client's pace)."""
        self.status = status
        self.span.set_http_status(status)
        self.count()

    def count(self) -> None:
        """The call's status class and duration, once: at the response head for a proxied call
        (its body streams at the client's pace), else when the call ends."""
        if self._counted:
            return
        self._counted = True
        metrics, call = self._pool.metrics, self._call
        cls = status_class(self.status)
        metrics.child(metrics.upstream_calls, call.upstream, call.purpose, cls).inc()
        metrics.child(metrics.upstream_duration, call.upstream, call.purpose, cls).observe(
            time.perf_counter() - self._started
        )


class _TimedSlot:
    """A fair batch slot (see fair_slots.py), with the time waited for it in the metrics."""

    __slots__ = ("_batch", "_histogram", "_slots")

    def __init__(self, slots: FairSlots, batch: Hashable, histogram: Any) -> None:
        self._slots, self._batch, self._histogram = slots, batch, histogram

    async def __aenter__(self) -> None:
        started = time.perf_counter()
        await self._slots.acquire(self._batch)
        self._histogram.observe(time.perf_counter() - started)

    async def __aexit__(self, *exc_info: object) -> None:
        self._slots.release(self._batch)


def _whole_answer(
    meter: _Metered, status: int, reason: str | None, headers: Headers, body: bytes
) -> SubResponse:
    """A batch-side call's whole answer, its status recorded once the body was read."""
    meter.status = status
    meter.span.set_http_status(status)
    return SubResponse(status=status, reason=safe_reason(status, reason), headers=headers, body=body)


_READ_SIZE = 1 << 20


def _any(content: aiohttp.StreamReader) -> Callable[[int], Awaitable[bytes]]:
    """aiohttp's body as a `read(n)`: whatever has arrived (readany ignores n)."""

    def read(_size: int) -> Awaitable[bytes]:
        return content.readany()

    return read


class _Permit:
    """One pooled-connection permit of an upstream (see UpstreamPool.connection), with the time
    waited for it and the connections in use in the metrics. A class: it is on the hot path."""

    __slots__ = ("_in_use", "_permits", "_pool", "_upstream")

    def __init__(self, pool: UpstreamPool, upstream: str) -> None:
        self._pool, self._upstream = pool, upstream
        self._permits = pool._connections[upstream]

    async def __aenter__(self) -> None:
        pool, upstream, permits = self._pool, self._upstream, self._permits
        wait = pool._config.upstreams[upstream].timeouts.pool
        started = time.perf_counter()
        try:
            if permits.locked():
                await asyncio.wait_for(permits.acquire(), wait)
            else:
                await permits.acquire()  # free: no timer (the common case)
        except TimeoutError:
            raise UpstreamBusy(
                f"every connection to upstream {upstream!r} stayed busy for {wait} s "
                f"(pool_size {pool._config.upstreams[upstream].pool_size}); not sent"
            ) from None
        finally:
            pool.metrics.child(pool.metrics.pool_wait, upstream).observe(time.perf_counter() - started)
        self._in_use = pool.metrics.child(pool.metrics.pool_in_use, upstream)
        self._in_use.inc()

    async def __aexit__(self, *exc_info: object) -> None:
        self._in_use.dec()
        self._permits.release()
