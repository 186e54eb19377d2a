"""The batch service: plan a decoded batch, run it (plainly or atomically) and report the results.

Format-agnostic: the endpoints decode and encode; this module never sees wire bytes.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from gateway.atomicity.coordinator import AtomicRun
from gateway.atomicity.journal import Journal, open_journal
from gateway.atomicity.plan import plan_atomicity
from gateway.budget import ByteBudget
from gateway.config import GatewayConfig
from gateway.errors import ShuttingDown
from gateway.execution import Deadline, execute, plain_runner
from gateway.graph_execution import GraphRun, Services, count_labels
from gateway.graph_model import GraphBatch, GraphResult, worst_outcome
from gateway.metrics import GatewayMetrics, status_class
from gateway.model import (
    BatchReport,
    Item,
    ItemResult,
    ResultNode,
    RollbackStatus,
    Skipped,
    SubResponse,
)
from gateway.planning import BatchPlan, OuterRequest, Planner
from gateway.routing import RouteTable
from gateway.upstream import UpstreamPool

log = structlog.get_logger("gateway.batch")
_ANSWER_MARGIN = 0.5
"""Seconds before the shutdown deadline at which a still-running atomic batch is answered 503."""


def new_batch_id() -> str:
    return "b" + secrets.token_hex(12)


class ShutdownClock:
    """The shutdown deadline (time.monotonic()), None until the shutdown starts."""

    deadline: float | None = None


class BatchService:
    """Runs batches against the upstream pool; atomic ones through the coordinator and journal."""

    def __init__(
        self,
        config: GatewayConfig,
        routes: RouteTable,
        pool: UpstreamPool,
        metrics: GatewayMetrics,
        journal: Journal | None = None,
    ) -> None:
        self._config = config
        self._routes = routes
        self._pool = pool
        self._metrics = metrics
        self.journal: Journal = journal or open_journal(config)
        self.journal.observe_write = self._journal_written
        self.planner = Planner(routes)
        self._in_flight: set[asyncio.Task[BatchReport]] = set()
        self.shutdown = ShutdownClock()
        """When the shutdown ends; shared by every generation after reloads."""
        limits = config.batch.limits
        self.buffered = ByteBudget(limits.max_buffered_bytes, "limits.max_buffered_bytes")
        """Sub-response bytes all batches of this process hold (each batch draws a child budget)."""

    def _journal_written(self, operation: str, size: int, seconds: float) -> None:
        self._metrics.journal_write.labels(operation).observe(seconds)
        self._metrics.journal_bytes.labels(operation).observe(size)

    def adopt(self, predecessor: BatchService) -> None:
        """After a reload: share the process-wide buffer budget and the set of atomic runs in
        flight (so shutdown drains every generation's), and the shutdown deadline."""
        self.buffered = predecessor.buffered
        self._in_flight = predecessor._in_flight
        self.shutdown = predecessor.shutdown

    def new_budget(self) -> ByteBudget:
        """A batch's budget; release it once the batch's answer is written."""
        return self.buffered.child(
            self._config.batch.limits.max_batch_buffer_bytes, "limits.max_batch_buffer_bytes"
        )

    def deadline(self) -> Deadline:
        limits = self._config.batch.limits
        return Deadline(limits.batch_timeout, limits.call_timeout)

    async def run(
        self, item: Item, outer: OuterRequest, *, batch_id: str, budget: ByteBudget | None = None,
        kind: str = "batch",
    ) -> BatchReport:
        """Run a non-atomic batch: every item gets a result (or Skipped after a Serial failure)."""
        plan = self.planner.plan(item, outer)
        self._metrics.batch_size.labels(kind).observe(len(plan.calls))
        with self._in_flight_gauge("false"):
            runner = plain_runner(
                self._pool, self.deadline(), budget, batch_id, self._config.logging.subrequest_level
            )
            root = await execute(plan.root, runner)
        report = BatchReport(root=root, batch_id=batch_id)
        self._count(plan, report, kind)
        return report

    @contextmanager
    def _in_flight_gauge(self, atomic: str) -> Iterator[None]:
        gauge = self._metrics.batches_in_flight.labels(atomic)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    async def run_atomic(
        self, item: Item, outer: OuterRequest, *, batch_id: str, budget: ByteBudget | None = None,
        kind: str = "batch",
    ) -> BatchReport:
        """Plan (422 if any call cannot be made atomic), then run all-or-nothing.

        The run is a task of its own, shielded: a client that disconnects (cancelling the handler)
        does not interrupt forward calls or their rollback.
        """
        plan = self.planner.plan(item, outer)
        steps = plan_atomicity(plan, self._config)
        run = AtomicRun(
            batch_id=batch_id, plan=plan, steps=steps, config=self._config, routes=self._routes,
            pool=self._pool, journal=self.journal, metrics=self._metrics, deadline=self.deadline(),
            budget=budget, owner=self.journal.owner_of(outer.headers.getall("Authorization", [])),
        )
        self._metrics.batch_size.labels(kind).observe(len(plan.calls))
        task = asyncio.ensure_future(self._counted(run.run(), plan, kind))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await self._until_done_or_shutdown(task, batch_id)

    async def run_graph(
        self, batch: GraphBatch, outer: OuterRequest, *, batch_id: str, budget: ByteBudget | None = None,
        kind: str = "graph",
    ) -> GraphResult:
        """Run a dependency-graph batch (gateway/graph_execution.py): validated and planned first
        (4xx, nothing sent; 422 when a group cannot be made atomic), then every item as soon as its
        dependencies succeeded, atomic groups through the coordinator, each a task of its own
        shielded from client disconnects as in run_atomic."""
        deadline, level = self.deadline(), self._config.logging.subrequest_level
        services = Services(
            config=self._config, routes=self._routes, pool=self._pool, journal=self.journal,
            metrics=self._metrics, shielded=self._shielded, deadline=deadline, budget=budget,
            runner=plain_runner(self._pool, deadline, budget, batch_id, level),
            owner=self.journal.owner_of(outer.headers.getall("Authorization", [])),
        )
        run = GraphRun(batch, self.planner.bind(outer), services, batch_id=batch_id,
                       max_items=self._config.batch.limits.max_items)
        self._metrics.batch_size.labels(kind).observe(len(batch.items))
        with self._in_flight_gauge("false"):
            result = await run.run()
        self._count_graph(run, result, kind)
        return result

    async def _shielded(self, run: AtomicRun) -> BatchReport:
        """An atomic group of a graph batch, run as in run_atomic: a task of its own."""
        task = asyncio.ensure_future(self._gauged(run.run()))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await self._until_done_or_shutdown(task, run.batch_id)

    async def _gauged(self, running: Coroutine[Any, Any, BatchReport]) -> BatchReport:
        with self._in_flight_gauge("true"):
            return await running

    def _count_graph(self, run: GraphRun, result: GraphResult, kind: str) -> None:
        worst = worst_outcome(result)
        atomic, outcome = ("false", "processed") if worst is None else ("true", worst.value)
        self._metrics.batches.labels(kind, atomic, outcome).inc()
        counted = collections.Counter(
            (upstream, *(subrequest_labels(found) if isinstance(found, ItemResult) else ("none", "skipped")))
            for upstream, found in count_labels(run)
        )
        for labels, count in counted.items():
            self._metrics.child(self._metrics.subrequests, *labels).inc(count)

    async def _counted(
        self, running: Coroutine[Any, Any, BatchReport], plan: BatchPlan, kind: str
    ) -> BatchReport:
        """An atomic run, in flight until its rollback ends (also after its client left), counted."""
        with self._in_flight_gauge("true"):
            report = await running
        self._count(plan, report, kind)
        return report

    async def _until_done_or_shutdown(self, task: asyncio.Task[BatchReport], batch_id: str) -> BatchReport:
        """The run's report; if the shutdown deadline comes first, a 503 naming the batch (it goes
        on until the process exits, and start-up recovery finishes it), so the client learns the
        batch id instead of getting an empty reply. Waiting never cancels the run."""
        while True:
            deadline = self.shutdown.deadline
            if deadline is None:
                await asyncio.wait({task}, timeout=0.5)
            else:
                await asyncio.wait({task}, timeout=max(0.0, deadline - _ANSWER_MARGIN - time.monotonic()))
                if not task.done():
                    raise ShuttingDown(
                        f"the gateway is shutting down and atomic batch {batch_id} is still running; "
                        "it is finished by the next start-up's recovery (look it up by its id)"
                    )
            if task.done():
                return task.result()

    async def drain(self, timeout: float) -> None:
        """Wait for atomic batches still running (e.g. their client went away) to finish."""
        if self._in_flight:
            log.info("draining_atomic_batches", count=len(self._in_flight))
            await asyncio.wait(self._in_flight, timeout=max(0.0, timeout))

    def _count(self, plan: BatchPlan, report: BatchReport, kind: str) -> None:
        atomic = report.atomic_outcome is not None
        outcome = report.atomic_outcome.value if report.atomic_outcome is not None else "processed"
        self._metrics.batches.labels(kind, "true" if atomic else "false", outcome).inc()
        counted = collections.Counter(  # in bulk: one update per distinct series, not per call
            (call.upstream, *subrequest_labels(result))
            for call, result in zip(plan.calls, iter_results(report.root), strict=True)
        )
        for labels, count in counted.items():
            self._metrics.child(self._metrics.subrequests, *labels).inc(count)


def iter_results(node: ResultNode) -> list[ItemResult]:
    """The item results of a result tree in depth-first order: aligned with plan.calls."""
    if isinstance(node, ItemResult):
        return [node]
    return [leaf for child in node.items for leaf in iter_results(child)]


def subrequest_labels(result: ItemResult) -> tuple[str, str]:
    """(status class, outcome) of one sub-request for gateway_subrequests_total."""
    outcome = result.outcome
    if isinstance(outcome, Skipped):
        return "none", "skipped"
    cls = status_class(outcome.status) if isinstance(outcome, SubResponse) else "error"
    if result.rollback in (RollbackStatus.ROLLED_BACK, RollbackStatus.ROLLBACK_FAILED):
        return cls, result.rollback.value
    return cls, "executed" if isinstance(outcome, SubResponse) else "failed"
