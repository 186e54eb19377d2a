"""Crash recovery: every journaled batch not in a final state is rolled back, then marked final.

Runs on start-up before the gateway reports ready, and from `gateway recover`; running it twice is a no-op.
Each batch is recovered on its own: one that cannot be (bad record, refused value) needs an operator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from gateway.atomicity.compensation import CallContext, call_headers
from gateway.atomicity.journal import Journal, JournaledBatch, JournaledStep, open_journal
from gateway.atomicity.rollback import run_undo
from gateway.atomicity.state import BatchState, BatchStateMachine
from gateway.atomicity.transactions import TransactionFailed, end_transaction
from gateway.config import GatewayConfig
from gateway.errors import JournalUnavailable
from gateway.routing import RouteTable
from gateway.upstream import UpstreamPool

log = structlog.get_logger("gateway.recovery")


@dataclass
class RecoveryReport:
    """What one recovery pass did: the final state of each batch it finished, and what it left."""

    outcomes: dict[str, BatchState] = field(default_factory=dict)
    needs_operator: dict[str, str] = field(default_factory=dict)
    """Batch id -> why: left unfinished (upstream gone, journal unwritable) or rollback_incomplete."""

    @property
    def clean(self) -> bool:
        return not self.needs_operator


class Recovery:
    """Rolls back what a crashed gateway left half-done, using only the journal."""

    def __init__(
        self, config: GatewayConfig, routes: RouteTable, pool: UpstreamPool, journal: Journal
    ) -> None:
        self._config, self._routes, self._pool, self._journal = config, routes, pool, journal

    async def run(self) -> RecoveryReport:
        """Recover every unfinished batch; never raises because of what a batch record holds."""
        report = RecoveryReport()
        try:
            batch_ids = await self._journal.unfinished_ids()
        except JournalUnavailable as exc:
            log.error("recovery_journal_unreadable", detail=exc.detail)
            report.needs_operator["*"] = f"the journal could not be read: {exc.detail}"
            return report
        for batch_id in batch_ids:
            await self.recover(batch_id, report)
        return report

    async def recover(self, batch_id: str, report: RecoveryReport, *, retry: bool = False) -> None:
        """Recover one batch (`retry` also takes a rollback_incomplete one), isolated from the rest."""
        try:
            batch = await self._journal.batch(batch_id)
            if batch is None:
                report.needs_operator[batch_id] = "no such batch in the journal"
                return
            missing = _upstreams_of(batch) - set(self._config.upstreams)
            if missing:
                reason = f"its upstreams {sorted(missing)} are no longer configured; kept unfinished"
                log.error("batch_not_recoverable_with_this_config", batch_id=batch_id,
                          missing_upstreams=sorted(missing),
                          hint="restore those upstreams in the config and restart")
                report.needs_operator[batch_id] = reason
                return
            if batch.state.final and not (retry and batch.state is BatchState.ROLLBACK_INCOMPLETE):
                report.outcomes[batch_id] = batch.state
                return
            final, detail = await self._recover(batch)
        except Exception as exc:  # a record this gateway cannot act on must not stop the others
            log.exception("batch_recovery_failed", batch_id=batch_id)
            detail = f"recovery failed: {exc!r}; see gateway batches show {batch_id}"
            final = await self._mark_incomplete(batch_id, detail)
        report.outcomes[batch_id] = final
        if final is not BatchState.ROLLED_BACK:
            report.needs_operator[batch_id] = detail

    async def _mark_incomplete(self, batch_id: str, detail: str) -> BatchState:
        try:
            await self._journal.batch_state(batch_id, BatchState.ROLLBACK_INCOMPLETE, detail)
        except JournalUnavailable as exc:
            log.error("recovery_journal_unwritable", batch_id=batch_id, detail=exc.detail)
            return BatchState.COMPENSATING
        return BatchState.ROLLBACK_INCOMPLETE

    async def _recover(self, batch: JournaledBatch) -> tuple[BatchState, str]:
        machine = BatchStateMachine(batch.state)
        if batch.state is not BatchState.COMPENSATING:
            machine.to(BatchState.COMPENSATING)
            await self._journal.batch_state(batch.batch_id, BatchState.COMPENSATING, "recovery")
        ctx = CallContext(self._routes, batch.headers, self._config.batch.limits.max_response_bytes)
        problems = await self._rollback_transactions(batch, ctx)
        for step in sorted(batch.steps, key=_undo_order):
            problem = await self._undo(batch.batch_id, step, ctx)
            if problem is not None:
                problems.append(problem)
        final = BatchState.ROLLBACK_INCOMPLETE if problems else BatchState.ROLLED_BACK
        machine.to(final)
        detail = "recovered after restart" + ("; " + "; ".join(problems) if problems else "")
        await self._journal.batch_state(batch.batch_id, final, detail)
        log.warning("batch_recovered", batch_id=batch.batch_id, outcome=final.value, detail=detail)
        return final, detail

    async def _rollback_transactions(self, batch: JournaledBatch, ctx: CallContext) -> list[str]:
        problems: list[str] = []
        for tx in batch.transactions:
            settings = self._config.upstreams[tx.upstream].transactions
            if tx.state in ("rolled_back", "never_begun") or settings is None:
                continue
            if tx.state == "committed":
                problems.append(f"{tx.upstream}: its transaction was already committed")
                continue
            if tx.token is None:
                problems.append(f"{tx.upstream}: a transaction may be open but its token was never recorded")
                continue
            try:
                await end_transaction(
                    self._pool, self._routes, tx.upstream, settings,
                    token=tx.token, headers=call_headers(ctx.base_headers, tx.headers or []),
                    commit=False, retry=self._config.batch.rollback,
                )
            except TransactionFailed as exc:
                problems.append(str(exc))
                continue
            await self._journal.tx_state(batch.batch_id, tx.upstream, "rolled_back")
        return problems

    async def _undo(self, batch_id: str, step: JournaledStep, ctx: CallContext) -> str | None:
        if step.state in ("failed", "not_sent") or step.undo_state == "undone":
            return None
        outcome = step.outcome if step.state == "done" else None
        result = await run_undo(
            self._pool, ctx, step.intent, outcome,
            f"{batch_id}.{step.position}.undo", self._config.batch.rollback,
        )
        await self._journal.step_undo(
            batch_id, step.position, "undone" if result.done else "undo_failed", result.detail
        )
        return None if result.done else f"{step.intent.get('where', step.position)}: {result.detail}"


def _upstreams_of(batch: JournaledBatch) -> set[str]:
    return {tx.upstream for tx in batch.transactions} | {s.intent["upstream"] for s in batch.steps}


def _undo_order(step: JournaledStep) -> tuple[int, int]:
    """Reverse completion order; a call still in flight (no seq) finished last, so goes first."""
    return (0, 0) if step.seq is None else (1, -step.seq)


async def with_recovery(config: GatewayConfig, batch_ids: list[str] | None = None) -> RecoveryReport:
    """`gateway recover` and `gateway batches retry`: open journal and pool, recover, close.

    With `batch_ids`, only those batches (rollback_incomplete ones included) are retried.
    """
    journal = open_journal(config)
    pool = UpstreamPool(config, max_response_bytes=config.batch.limits.max_response_bytes)
    await journal.open()
    await pool.start()
    try:
        recovery = Recovery(config, RouteTable(config), pool, journal)
        if batch_ids is None:
            return await recovery.run()
        report = RecoveryReport()
        for batch_id in batch_ids:
            await recovery.recover(batch_id, report, retry=True)
        return report
    finally:
        await pool.close()
        await journal.close()

