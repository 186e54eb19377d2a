"""Crash recovery: every journaled batch not in a final state is rolled back, then marked final.

Runs on start-up before the gateway reports ready, and from `gateway recover`; running it twice is a no-op.
"""

from __future__ import annotations

import structlog

from gateway.atomicity.journal import Journal, JournaledBatch, JournaledStep, SqliteJournal
from gateway.atomicity.rollback import run_undo
from gateway.atomicity.state import BatchState, BatchStateMachine
from gateway.atomicity.transactions import TransactionFailed, end_transaction
from gateway.config import GatewayConfig
from gateway.routing import RouteTable
from gateway.upstream import UpstreamPool

log = structlog.get_logger("gateway.recovery")


class Recovery:
    """Rolls back what a crashed gateway left half-done, using only the journal."""

    def __init__(
        self, config: GatewayConfig, routes: RouteTable, pool: UpstreamPool, journal: Journal
    ) -> None:
        self._config, self._routes, self._pool, self._journal = config, routes, pool, journal

    async def run(self) -> dict[str, BatchState]:
        outcomes: dict[str, BatchState] = {}
        for batch in await self._journal.unfinished():
            missing = _upstreams_of(batch) - set(self._config.upstreams)
            if missing:
                log.error(
                    "batch_not_recoverable_with_this_config",
                    batch_id=batch.batch_id,
                    missing_upstreams=sorted(missing),
                    hint="kept unfinished; restore those upstreams in the config and restart",
                )
                continue
            outcomes[batch.batch_id] = await self._recover(batch)
        return outcomes

    async def _recover(self, batch: JournaledBatch) -> BatchState:
        machine = BatchStateMachine(batch.state)
        if batch.state is not BatchState.COMPENSATING:
            machine.to(BatchState.COMPENSATING)
            await self._journal.batch_state(batch.batch_id, BatchState.COMPENSATING, "recovery")
        problems = await self._rollback_transactions(batch)
        for step in sorted(batch.steps, key=_undo_order):
            problem = await self._undo(batch.batch_id, step)
            if problem is not None:
                problems.append(problem)
        final = BatchState.ROLLBACK_INCOMPLETE if problems else BatchState.ROLLED_BACK
        machine.to(final)
        detail = "recovered after restart" + ("; " + "; ".join(problems) if problems else "")
        await self._journal.batch_state(batch.batch_id, final, detail)
        log.warning("batch_recovered", batch_id=batch.batch_id, outcome=final.value, detail=detail)
        return final

    async def _rollback_transactions(self, batch: JournaledBatch) -> list[str]:
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
                    token=tx.token, headers=tx.headers or [], commit=False,
                    retry=self._config.batch.rollback,
                )
            except TransactionFailed as exc:
                problems.append(str(exc))
                continue
            await self._journal.tx_state(batch.batch_id, tx.upstream, "rolled_back")
        return problems

    async def _undo(self, batch_id: str, step: JournaledStep) -> str | None:
        if step.state in ("failed", "not_sent") or step.undo_state == "undone":
            return None
        outcome = step.outcome if step.state == "done" else None
        result = await run_undo(
            self._pool, self._routes, step.intent, outcome,
            f"{batch_id}.{step.position}.undo", self._config.batch.rollback,
        )
        await self._journal.step_undo(
            batch_id, step.position, "undone" if result.done else "undo_failed", result.detail
        )
        return None if result.done else f"{step.intent['where']}: {result.detail}"


def _upstreams_of(batch: JournaledBatch) -> set[str]:
    return {tx.upstream for tx in batch.transactions} | {s.intent["upstream"] for s in batch.steps}


def _undo_order(step: JournaledStep) -> tuple[int, int]:
    """Reverse completion order; a call still in flight (no seq) finished last, so goes first."""
    return (0, 0) if step.seq is None else (1, -step.seq)


async def recover_once(config: GatewayConfig) -> dict[str, BatchState]:
    """`gateway recover`: open the journal and the upstream pool, recover, close everything."""
    journal = SqliteJournal(config.journal.path)
    pool = UpstreamPool(config, max_response_bytes=config.batch.limits.max_response_bytes)
    await journal.open()
    await pool.start()
    try:
        return await Recovery(config, RouteTable(config), pool, journal).run()
    finally:
        await pool.close()
        await journal.close()
