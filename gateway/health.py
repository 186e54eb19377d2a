"""Upstream health (passive, and optional active checks) and the readiness report of /readyz.

Passive, always on: the pool tells `UpstreamHealth.record` how each real call ended (batch and
proxied). `health.failures` (default 5) consecutive connect failures or timeouts mark an upstream
`down` for `health.cooldown` seconds (default 10); then it is `probing` and the next call decides:
a connect failure or timeout marks it `down` again, an answer `up`. Any answer, whatever its status,
marks it `up` (the upstream was reached). Other failures (a connection lost after the request was
sent, an invalid or oversized answer, a full pool) say nothing about reachability and are not
counted. Calls are never held back while an upstream is down: this is reporting, not a breaker.

Active, with `health.path`: one task per upstream GETs the path every `health.interval` seconds
through the gateway's pool (its sessions, so TLS settings apply) and feeds the same state: a status
in `health.expect_status` is a success, anything else (another status, any upstream error) a
failure. Checks are not counted as traffic: a context variable keeps them out of the passive
record; in the metrics they are upstream calls with `purpose="health_check"`.

`readiness` is the /readyz policy: ready unless shutdown started, start-up recovery has not
finished, the journal fails a real read, the pools are closed, or an upstream with
`health.required` is `down` (`probing` and `unknown` stay ready, so a load balancer sends the
traffic that lets a passive-only upstream prove itself).

State is per process: with `listen.workers > 1` each worker tracks (and checks) on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import structlog

from gateway.config import GatewayConfig, Health
from gateway.errors import UpstreamBusy, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.metrics import GatewayMetrics
from gateway.routing import RouteTable, Target
from gateway.runtime import Gateway
from gateway.upstream import UpstreamCall, UpstreamPool

log = structlog.get_logger("gateway.health")

JOURNAL_PING_TIMEOUT = 1.0
"""Seconds the journal has to answer /readyz's read (a Kubernetes probe's default timeout)."""
_CHECK_HEADERS = (("User-Agent", "batch-gateway-health-check"), ("Accept", "*/*"))
_IN_CHECK: ContextVar[bool] = ContextVar("gateway_health_check", default=False)
"""Set in the active check tasks: their calls are not real traffic."""


class State(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    PROBING = "probing"


def failure_kind(error: UpstreamError) -> str | None:
    """`connect` (refused, unreachable, name or TLS failure, nothing sent) or `timeout` (connecting
    or answering); None for failures that say nothing about whether the upstream can be reached."""
    if isinstance(error, UpstreamBusy):
        return None  # the gateway's own pool was full
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamUnavailable) and not error.maybe_executed:
        return "connect"
    return None


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Tracked:
    settings: Health
    since: float
    """Wall-clock time of the last state change (of start-up while unknown)."""
    state: State = State.UNKNOWN
    down_until: float = 0.0
    """time.monotonic() when a down upstream becomes probing."""
    consecutive: int = 0
    last_error: dict[str, str] | None = None


class UpstreamHealth:
    """The health state of every configured upstream, fed by real calls and active checks.

    After a reload, give the previous generation's tracker as `previous`: what is known of an
    upstream still reached the same way (same `url` and `tls`) is kept, the rest is forgotten
    (no gauge sample), and calls still in flight on the old generation report here.
    """

    def __init__(
        self, config: GatewayConfig, metrics: GatewayMetrics, previous: UpstreamHealth | None = None
    ) -> None:
        now = time.time()
        self._upstreams = {name: _Tracked(up.health, now) for name, up in config.upstreams.items()}
        self._targets = {name: (up.url, up.tls) for name, up in config.upstreams.items()}
        self._metrics = metrics
        self._checks: list[asyncio.Task[None]] = []
        self._journal_ok = True
        self._successor: UpstreamHealth | None = None
        if previous is not None:
            self._take_over(previous)

    def _take_over(self, previous: UpstreamHealth) -> None:
        for name, old in previous._upstreams.items():
            tracked = self._upstreams.get(name)
            if tracked is not None and previous._targets[name] == self._targets[name]:
                tracked.state, tracked.since, tracked.down_until = old.state, old.since, old.down_until
                tracked.consecutive, tracked.last_error = old.consecutive, old.last_error
            elif old.state is not State.UNKNOWN:
                self._metrics.forget(self._metrics.upstream_up, name)
        self._journal_ok = previous._journal_ok
        previous._successor = self

    # --- passive -------------------------------------------------------------------------------

    def record(self, upstream: str, error: UpstreamError | None) -> None:
        """The pool's `on_outcome` hook: how one real call ended (None: it got an answer)."""
        if self._successor is not None:  # a call of a generation a reload replaced
            self._successor.record(upstream, error)
            return
        if _IN_CHECK.get() or upstream not in self._upstreams:
            return
        if error is None:
            self.succeeded(upstream)
            return
        kind = failure_kind(error)
        if kind is not None:
            self.failed(upstream, kind, error.detail)

    def succeeded(self, upstream: str) -> None:
        tracked = self._upstreams[upstream]
        tracked.consecutive = 0
        if tracked.state is not State.UP:
            if tracked.state is not State.UNKNOWN:
                log.info("upstream_up", upstream=upstream, was=tracked.state.value)
            self._change(upstream, tracked, State.UP)

    def failed(self, upstream: str, kind: str, detail: str) -> None:
        tracked = self._upstreams[upstream]
        now = time.monotonic()
        state = self._current(tracked, now)
        tracked.consecutive += 1
        tracked.last_error = {"kind": kind, "detail": detail, "at": _iso(time.time())}
        if state is State.PROBING or (
            state is not State.DOWN and tracked.consecutive >= tracked.settings.failures
        ):
            tracked.down_until = now + tracked.settings.cooldown
            log.warning("upstream_down", upstream=upstream, failures=tracked.consecutive, kind=kind,
                        detail=detail, cooldown=tracked.settings.cooldown)
            self._change(upstream, tracked, State.DOWN)

    def _change(self, upstream: str, tracked: _Tracked, state: State) -> None:
        tracked.state = state
        tracked.since = time.time()
        self._metrics.upstream_up.labels(upstream).set(1 if state is State.UP else 0)

    @staticmethod
    def _current(tracked: _Tracked, now: float) -> State:
        """The state, a down upstream turned probing once its cool-down is over."""
        if tracked.state is State.DOWN and now >= tracked.down_until:
            tracked.state = State.PROBING
            tracked.since = time.time() - (now - tracked.down_until)
        return tracked.state

    def state(self, upstream: str) -> State:
        return self._current(self._upstreams[upstream], time.monotonic())

    def report(self) -> dict[str, dict[str, Any]]:
        """Each upstream for /readyz: state, since, last_error, consecutive failures, settings."""
        now = time.monotonic()
        return {
            name: {
                "state": self._current(tracked, now).value,
                "since": _iso(tracked.since),
                "last_error": tracked.last_error,
                "consecutive_failures": tracked.consecutive,
                "required": tracked.settings.required,
                "active_check": tracked.settings.path is not None,
            }
            for name, tracked in self._upstreams.items()
        }

    # --- active --------------------------------------------------------------------------------

    def start(self, pool: UpstreamPool, routes: RouteTable) -> None:
        """Start one check task per upstream with a `health.path` (the pool must be started)."""
        for name, tracked in self._upstreams.items():
            path = tracked.settings.path
            if path is not None:
                raw_path, _, query = path.partition("?")
                url = routes.upstream_url(name, Target(path=raw_path, query=query))
                call = UpstreamCall(name, "GET", url, _CHECK_HEADERS, timeout=tracked.settings.timeout,
                                    purpose="health_check")
                self._checks.append(asyncio.create_task(self._check_forever(pool, call)))

    async def stop(self) -> None:
        for task in self._checks:
            task.cancel()
        for task in self._checks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._checks.clear()

    async def _check_forever(self, pool: UpstreamPool, call: UpstreamCall) -> None:
        interval = self._upstreams[call.upstream].settings.interval
        while True:
            try:
                await self.check(pool, call)
            except Exception:  # a bug here must not end the checks silently
                log.exception("health_check_failed", upstream=call.upstream)
            await asyncio.sleep(interval)

    async def check(self, pool: UpstreamPool, call: UpstreamCall) -> None:
        """One active check: GET the path and record a success or a failure."""
        token = _IN_CHECK.set(True)
        try:
            response = await pool.send(call)
        except UpstreamBusy:
            return  # every pooled connection is in use: no verdict on the upstream
        except UpstreamError as exc:
            if self._successor is None:
                self.failed(call.upstream, failure_kind(exc) or "error", f"health check: {exc.detail}")
            return
        finally:
            _IN_CHECK.reset(token)
        if self._successor is not None:
            return  # a reload replaced this tracker while the check ran; its own checks decide
        settings = self._upstreams[call.upstream].settings
        if settings.passes(response.status):
            self.succeeded(call.upstream)
        else:
            self.failed(call.upstream, "status",
                        f"health check: GET {settings.path} answered {response.status}")

    # --- journal -------------------------------------------------------------------------------

    async def journal_usable(self, gateway: Gateway) -> bool:
        """A real read through the journal, within JOURNAL_PING_TIMEOUT; changes are logged."""
        try:
            await asyncio.wait_for(gateway.batches.journal.ping(), JOURNAL_PING_TIMEOUT)
        except Exception as exc:  # JournalUnavailable, a closed connection, a timeout: unusable
            if self._journal_ok:
                log.error("journal_unusable", error=type(exc).__name__, detail=str(exc)[:500])
            self._journal_ok = False
            return False
        if not self._journal_ok:
            log.info("journal_usable")
        self._journal_ok = True
        return True


def health_of(gateway: Gateway) -> UpstreamHealth:
    health = gateway.extras["health"]
    assert isinstance(health, UpstreamHealth)
    return health


async def readiness(gateway: Gateway) -> dict[str, Any]:
    """The /readyz report; `ready` is the policy described in the module docstring."""
    health = health_of(gateway)
    journal_ok = await health.journal_usable(gateway)
    recovered = bool(gateway.extras.get("recovered", True))
    stopping = bool(gateway.extras.get("stopping", False))
    upstreams = health.report()
    reasons = []
    if stopping:
        reasons.append("shutting down")
    if not recovered:
        reasons.append("start-up recovery has not finished")
    if not journal_ok:
        reasons.append("the journal is unusable")
    if not gateway.pool.ready:
        reasons.append("the upstream pools are not open")
    reasons.extend(
        f"required upstream {name!r} is down"
        for name, upstream in upstreams.items()
        if upstream["required"] and upstream["state"] == State.DOWN
    )
    return {
        "ready": not reasons,
        "journal": "ok" if journal_ok else "unusable",
        "recovered": recovered,
        "stopping": stopping,
        "reasons": reasons,
        "upstreams": upstreams,
    }
