"""Crash recovery: a batch past its journaled commit point is rolled forward, any other unfinished one back.

Runs on start-up before the gateway reports ready, and from `gateway recover`; running it twice is a no-op.
Each batch is recovered on its own: one that cannot be (bad record, refused value) needs an operator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import structlog

from gateway.atomicity.compensation import CallContext, UndoImpossible, call_headers, undo_call
from gateway.atomicity.journal import (
    Journal,
    JournaledBatch,
    JournaledStep,
    JournaledTransaction,
    open_journal,
)
from gateway.atomicity.replay import replay_begin, replay_forward
from gateway.atomicity.rollback import run_undo
from gateway.atomicity.secrets import SecretUnavailable
from gateway.atomicity.state import BatchState, BatchStateMachine
from gateway.atomicity.tx_calls import TransactionFailed, end_transaction, lifetime
from gateway.config import GatewayConfig, Transactions
from gateway.errors import BatchLost, JournalUnavailable
from gateway.routing import RouteTable
from gateway.upstream import UpstreamPool

log = structlog.get_logger("gateway.recovery")


@dataclass
class RecoveryReport:
    """What one recovery pass did: the final state of each batch it finished, and what it left."""

    outcomes: dict[str, BatchState] = field(default_factory=dict)
    needs_operator: dict[str, str] = field(default_factory=dict)
    """Batch id -> why: left unfinished (upstream gone, journal unwritable) or rollback_incomplete."""
    lost: list[str] = field(default_factory=list)
    """Batches another instance took over while this one recovered them (a shared journal)."""

    @property
    def clean(self) -> bool:
        return not self.needs_operator


class Recovery:
    """Rolls back what a crashed gateway left half-done, using only the journal."""

    def __init__(
        self, config: GatewayConfig, routes: RouteTable, pool: UpstreamPool, journal: Journal
    ) -> None:
        self._config, self._routes, self._pool, self._journal = config, routes, pool, journal

    async def run(self, instance: str | None = None, *, parked: bool = True) -> RecoveryReport:
        """Recover every unfinished batch this process may take (`Journal.claim_unfinished`: with
        SQLite all, or those of one dead worker `instance`; with a shared journal those whose
        owner's lease expired, and parked ones with `parked`); never raises because of what a
        batch record holds."""
        report = RecoveryReport()
        try:
            batch_ids = await self._journal.claim_unfinished(instance, parked=parked)
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
                await self._journal.release(batch_id)
                return
            if batch.state.final and not (retry and batch.state is BatchState.ROLLBACK_INCOMPLETE):
                report.outcomes[batch_id] = batch.state
                return
            final, detail = await self._recover(batch)
        except SecretUnavailable as exc:  # acting without the credentials would fail and lose them
            log.error("batch_secrets_unreadable", batch_id=batch_id, detail=str(exc))
            report.needs_operator[batch_id] = f"kept unfinished: {exc}"
            await self._journal.release(batch_id)
            return
        except BatchLost as exc:  # a shared journal: another instance owns it now and finishes it
            log.error("batch_lost", batch_id=batch_id, detail=exc.detail, during="recovery")
            report.lost.append(batch_id)
            return
        except Exception as exc:  # a record this gateway cannot act on must not stop the others
            log.exception("batch_recovery_failed", batch_id=batch_id)
            detail = f"recovery failed: {exc!r}; see gateway batches show {batch_id}"
            final = await self._mark_incomplete(batch_id, detail)
        report.outcomes[batch_id] = final
        if final not in (BatchState.ROLLED_BACK, BatchState.COMMITTED):
            report.needs_operator[batch_id] = detail

    async def _mark_incomplete(self, batch_id: str, detail: str) -> BatchState:
        try:
            await self._journal.batch_state(batch_id, BatchState.ROLLBACK_INCOMPLETE, detail)
        except JournalUnavailable as exc:
            log.error("recovery_journal_unwritable", batch_id=batch_id, detail=exc.detail)
            return BatchState.COMPENSATING
        return BatchState.ROLLBACK_INCOMPLETE

    async def _recover(self, batch: JournaledBatch) -> tuple[BatchState, str]:
        """Decide from the recorded phase first: past the commit point roll forward, else back."""
        ctx = CallContext(self._routes, batch.headers, self._config.batch.limits.max_response_bytes)
        if batch.state is BatchState.COMMITTING:
            return await self._roll_forward(batch, ctx)
        return await self._roll_back(batch, ctx, BatchStateMachine(batch.state))

    async def _roll_forward(self, batch: JournaledBatch, ctx: CallContext) -> tuple[BatchState, str]:
        """The batch had decided to commit: re-send the commits that are not journaled as done.

        Every forward call succeeded before the decision, so once every transaction is committed
        the batch is committed. A commit that an idempotent upstream refuses did not land: the rest
        is rolled back. A refusal from an upstream without idempotency keys is ambiguous (the first
        commit may have landed): nothing is undone and an operator decides.
        """
        committed: list[str] = []
        for tx in batch.transactions:
            settings = self._config.upstreams[tx.upstream].transactions
            if tx.state in ("committed", "never_begun") or settings is None:
                committed += [tx.upstream] if tx.state == "committed" else []
                continue
            error, status = await self._commit(batch, tx, settings, ctx)
            if error is None:
                committed.append(tx.upstream)
                continue
            if not self._config.upstreams[tx.upstream].idempotency_keys:
                detail = (f"recovered after restart: the commit on {tx.upstream!r} may or may not have "
                          f"landed ({error}; the upstream does not declare idempotency_keys); nothing "
                          "was undone")
                await self._journal.batch_state(batch.batch_id, BatchState.ROLLBACK_INCOMPLETE, detail)
                log.error("batch_recovered", batch_id=batch.batch_id, outcome="rollback_incomplete",
                          detail=detail)
                return BatchState.ROLLBACK_INCOMPLETE, detail
            if status in (404, 410):  # an idempotent upstream knows no such transaction: it ended
                await self._journal.tx_state(batch.batch_id, tx.upstream, "gone")
                batch = dataclasses.replace(batch, transactions=tuple(
                    dataclasses.replace(t, state="gone") if t.upstream == tx.upstream else t
                    for t in batch.transactions
                ))
            machine = BatchStateMachine(BatchState.COMMITTING)
            return await self._roll_back(batch, ctx, machine, committed=committed, reason=error)
        detail = "recovered after restart: rolled forward (the commit decision was journaled)"
        await self._journal.batch_state(batch.batch_id, BatchState.COMMITTED, detail)
        log.warning("batch_recovered", batch_id=batch.batch_id, outcome="committed", detail=detail)
        return BatchState.COMMITTED, detail

    async def _commit(
        self, batch: JournaledBatch, tx: JournaledTransaction, settings: Transactions, ctx: CallContext
    ) -> tuple[str | None, int | None]:
        """Re-send one commit: (None, None) when it is committed, else the error and the status."""
        if tx.token is None:
            return f"{tx.upstream}: no token was journaled, so its transaction cannot be committed", None
        try:
            await end_transaction(
                self._pool, self._routes, tx.upstream, settings, token=tx.token,
                headers=call_headers(ctx.base_headers, tx.headers or []), commit=True,
                batch_id=batch.batch_id,
            )
        except TransactionFailed as exc:
            return str(exc), exc.status
        await self._journal.tx_state(batch.batch_id, tx.upstream, "committed")
        return None, None

    async def _roll_back(
        self, batch: JournaledBatch, ctx: CallContext, machine: BatchStateMachine, *,
        committed: list[str] | None = None, reason: str = "recovery",
    ) -> tuple[BatchState, str]:
        if machine.state is not BatchState.COMPENSATING:
            machine.to(BatchState.COMPENSATING)
            await self._journal.batch_state(batch.batch_id, BatchState.COMPENSATING, reason)
        problems = [f"{u}: its transaction was already committed" for u in committed or []]
        problems += await self._rollback_transactions(
            batch, ctx, set(committed or []), before_commit_point=batch.state is not BatchState.COMMITTING
        )
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

    async def _rollback_transactions(
        self, batch: JournaledBatch, ctx: CallContext, skip: set[str], *,
        before_commit_point: bool = False,
    ) -> list[str]:
        """Roll back each open transaction. A transaction journaled `open` in a batch that never
        reached its commit point never had a commit sent, so a rollback answered 404/410 finds one
        that already ended (rolled back before the crash, or expired): nothing of it remains."""
        problems: list[str] = []
        for tx in batch.transactions:
            settings = self._config.upstreams[tx.upstream].transactions
            if tx.state in ("rolled_back", "never_begun", "gone") or settings is None or tx.upstream in skip:
                continue
            if tx.state == "committed":
                problems.append(f"{tx.upstream}: its transaction was already committed")
                continue
            token = tx.token or await self._replayed_token(batch, tx, settings, ctx)
            if token is None:
                problems.append(f"{tx.upstream}: a transaction may be open but its token was never recorded"
                                + self._expiry_note(tx.upstream))
                continue
            try:
                await end_transaction(
                    self._pool, self._routes, tx.upstream, settings,
                    token=token, headers=call_headers(ctx.base_headers, tx.headers or []),
                    commit=False, retry=self._config.batch.rollback, batch_id=batch.batch_id,
                )
            except TransactionFailed as exc:
                never_committed = before_commit_point and tx.state == "open"
                if not (never_committed and exc.status in (404, 410)):
                    problems.append(str(exc))
                    continue
                log.info("transaction_already_ended", batch_id=batch.batch_id, upstream=tx.upstream,
                         status=exc.status)
            await self._journal.tx_state(batch.batch_id, tx.upstream, "rolled_back")
        return problems

    async def _replayed_token(
        self, batch: JournaledBatch, tx: JournaledTransaction, settings: Transactions, ctx: CallContext
    ) -> str | None:
        """A begin whose answer was never journaled, re-sent with its key (idempotent upstreams)."""
        if not self._config.upstreams[tx.upstream].idempotency_keys:
            return None
        token = await replay_begin(
            self._pool, ctx, tx.upstream, settings, own_headers=tx.headers or [],
            batch_id=batch.batch_id, seconds=lifetime(self._config, tx.upstream),
        )
        if token is not None:
            await self._journal.tx_state(batch.batch_id, tx.upstream, "open", token=token)
        return token

    def _expiry_note(self, upstream: str) -> str:
        settings = self._config.upstreams[upstream].transactions
        if settings is not None and "{timeout}" in f"{settings.begin.path}{settings.begin.body}":
            return f" (it was begun with a lifetime of {lifetime(self._config, upstream)} s)"
        return ""

    async def _undo(self, batch_id: str, step: JournaledStep, ctx: CallContext) -> str | None:
        if step.state in ("failed", "not_sent") or step.undo_state == "undone":
            return None
        state, outcome = step.state, step.outcome if step.state == "done" else None
        if outcome is None and self._needs_replay(step, ctx):
            replayed = await replay_forward(self._pool, ctx, step.intent, f"{batch_id}.{step.position}")
            if replayed is not None:
                state = "failed" if replayed["status"] >= 400 else "done"
                outcome = replayed
                await self._journal.step_outcome(batch_id, step.position, state, replayed, step.seq or 0)
                if state == "failed":
                    return None
        result = await run_undo(
            self._pool, ctx, step.intent, outcome,
            f"{batch_id}.{step.position}.undo", self._config.batch.rollback,
        )
        await self._journal.step_undo(
            batch_id, step.position, "undone" if result.done else "undo_failed", result.detail
        )
        if result.done:
            return None
        intent = step.intent
        call = f"{intent.get('method')} {intent.get('path')} on {intent.get('upstream')!r}"
        return f"{intent.get('where', step.position)} ({call}): {result.detail}"

    def _needs_replay(self, step: JournaledStep, ctx: CallContext) -> bool:
        """Replay only when the undo cannot be built without the outcome (e.g. a create's id)."""
        upstream = self._config.upstreams.get(step.intent.get("upstream", ""))
        if upstream is None or not upstream.idempotency_keys:
            return False
        try:
            undo_call(step.intent, None, ctx, "probe")
        except UndoImpossible:
            return True
        return False


def _upstreams_of(batch: JournaledBatch) -> set[str]:
    return {tx.upstream for tx in batch.transactions} | {s.intent["upstream"] for s in batch.steps}


def _undo_order(step: JournaledStep) -> tuple[int, int]:
    """Reverse completion order; a call still in flight (no seq) finished last, so goes first."""
    return (0, 0) if step.seq is None else (1, -step.seq)


async def with_recovery(
    config: GatewayConfig, batch_ids: list[str] | None = None, *, instance: str | None = None
) -> RecoveryReport:
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
            return await recovery.run(instance)
        report = RecoveryReport()
        for batch_id in batch_ids:
            refusal = await journal.claim(batch_id)
            if refusal is None:
                await recovery.recover(batch_id, report, retry=True)
            else:
                report.needs_operator[batch_id] = refusal
        return report
    finally:
        await pool.close()
        await journal.close()

