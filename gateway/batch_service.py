"""The batch service: plan a decoded batch, run it (plainly or atomically) and report the results.

Format-agnostic: the endpoints decode and encode; this module never sees wire bytes.
"""

from __future__ import annotations

import secrets

from gateway.config import GatewayConfig
from gateway.execution import Deadline, execute, plain_runner
from gateway.metrics import GatewayMetrics
from gateway.model import BatchReport, Item, ItemResult, ResultNode, Skipped
from gateway.planning import BatchPlan, OuterRequest, Planner
from gateway.routing import RouteTable
from gateway.upstream import UpstreamPool


def new_batch_id() -> str:
    return "b" + secrets.token_hex(12)


class BatchService:
    """Runs batches against the upstream pool; atomic batches go through the atomic coordinator."""

    def __init__(
        self,
        config: GatewayConfig,
        routes: RouteTable,
        pool: UpstreamPool,
        metrics: GatewayMetrics,
    ) -> None:
        self._config = config
        self._pool = pool
        self._metrics = metrics
        self.planner = Planner(routes)

    def plan(self, item: Item, outer: OuterRequest) -> BatchPlan:
        return self.planner.plan(item, outer)

    def deadline(self) -> Deadline:
        limits = self._config.batch.limits
        return Deadline(limits.batch_timeout, limits.call_timeout)

    async def run(self, item: Item, outer: OuterRequest, *, batch_id: str) -> BatchReport:
        """Run a non-atomic batch: every item gets a result (or Skipped after a Serial failure)."""
        plan = self.plan(item, outer)
        root = await execute(plan.root, plain_runner(self._pool, self.deadline()))
        self._count(plan, root)
        return BatchReport(root=root, batch_id=batch_id)

    def _count(self, plan: BatchPlan, root: ResultNode) -> None:
        for call, result in zip(plan.calls, iter_results(root), strict=True):
            self._metrics.subrequests.labels(call.upstream, status_label(result)).inc()


def iter_results(node: ResultNode) -> list[ItemResult]:
    """The item results of a result tree in depth-first order: aligned with plan.calls."""
    if isinstance(node, ItemResult):
        return [node]
    return [leaf for child in node.items for leaf in iter_results(child)]


def status_label(result: ItemResult) -> str:
    outcome = result.outcome
    return "skipped" if isinstance(outcome, Skipped) else str(outcome.status)
