"""Execution of a plan: Serial (in order, stop at the first failure) and Unordered (concurrent).

The runners only walk the plan tree; what one call does is the `CallRunner` they are given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from gateway.budget import ByteBudget
from gateway.errors import UpstreamError
from gateway.model import (
    BatchResult,
    CallFailure,
    ExecutionMode,
    ItemResult,
    ResultNode,
    Skipped,
    SubResponse,
)
from gateway.planning import PlannedBatch, PlannedCall, PlanNode
from gateway.upstream import UpstreamCall, UpstreamPool

log = structlog.get_logger("gateway.batch")

CallRunner = Callable[[PlannedCall], Awaitable[ItemResult]]
"""Runs one planned call and never raises (but for cancellation): failures are results."""


class Deadline:
    """The whole-batch deadline; per-call timeouts shrink to what is left of it."""

    def __init__(self, seconds: float, call_timeout: float) -> None:
        self._ends = time.monotonic() + seconds
        self._call_timeout = call_timeout

    def call_timeout(self) -> float:
        return max(0.0, min(self._call_timeout, self._ends - time.monotonic()))

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._ends


def failure_summary(node: PlanNode, result: ResultNode) -> str:
    """'<where> failed with status 500' for the item that stops a Serial batch."""
    if isinstance(result, BatchResult):
        return f"{node.where} had a failed item"
    outcome = result.outcome
    if isinstance(outcome, SubResponse | CallFailure):
        return f"{node.where} failed with status {outcome.status}"
    return f"{node.where} failed"


def skipped_tree(node: PlanNode, reason: str) -> ResultNode:
    if isinstance(node, PlannedBatch):
        return BatchResult(node.mode, tuple(skipped_tree(child, reason) for child in node.items))
    return ItemResult(Skipped(reason))


async def execute(node: PlanNode, run_call: CallRunner) -> ResultNode:
    """Run a plan node (a call or a nested batch as one unit) and return its result tree."""
    if isinstance(node, PlannedCall):
        return await run_call(node)
    if node.mode is ExecutionMode.SERIAL:
        return await _serial(node, run_call)
    return await _unordered(node, run_call)


async def _serial(batch: PlannedBatch, run_call: CallRunner) -> BatchResult:
    results: list[ResultNode] = []
    stop_reason: str | None = None
    for child in batch.items:
        if stop_reason is not None:
            results.append(skipped_tree(child, stop_reason))
            continue
        result = await execute(child, run_call)
        results.append(result)
        if result.failed:
            stop_reason = f"not executed: {failure_summary(child, result)}"
    return BatchResult(batch.mode, tuple(results))


async def _unordered(batch: PlannedBatch, run_call: CallRunner) -> BatchResult:
    results = await asyncio.gather(*(execute(child, run_call) for child in batch.items))
    return BatchResult(batch.mode, tuple(results))


def plain_runner(
    pool: UpstreamPool, deadline: Deadline, budget: ByteBudget | None = None, batch: str = "",
    log_level: str = "info",
) -> CallRunner:
    """A runner that sends each call as planned, bounded per upstream (slots shared fairly between
    batches, `batch` naming this one), within the deadline."""

    async def run(planned: PlannedCall) -> ItemResult:
        async with pool.bound(planned.upstream, batch):
            started = time.perf_counter()
            outcome = await send_within(pool, planned.call, deadline, budget)
        log_call(planned, outcome, started, log_level)
        return ItemResult(outcome)

    return run


def log_call(
    planned: PlannedCall, outcome: SubResponse | CallFailure, started: float, level: str = "info"
) -> None:
    """One log line per sub-request at `level` (logging.subrequest_level; `off`: none); request id
    and batch id come from the bound context."""
    if level == "off":
        return
    getattr(log, level)(
        "subrequest",
        item=planned.where,
        position=planned.position,
        upstream=planned.upstream,
        method=planned.call.method,
        status=outcome.status,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
    )


async def send_within(
    pool: UpstreamPool, call: UpstreamCall, deadline: Deadline, budget: ByteBudget | None = None
) -> SubResponse | CallFailure:
    """Send a call with the time left; a missed deadline or upstream error becomes a CallFailure.

    The response body is reserved from `budget` (the batch's share of buffered bytes).
    """
    timeout = deadline.call_timeout()
    if timeout <= 0:
        return CallFailure(504, "the batch deadline passed before this call could start")
    try:
        return await pool.send(call.with_timeout(timeout), budget)
    except UpstreamError as exc:
        return CallFailure(exc.status, exc.detail, maybe_executed=exc.maybe_executed)
