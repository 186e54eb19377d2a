"""The atomic coordinator: runs a planned batch all-or-nothing and reports honestly what happened.

Journal before every change, commit transactions last, compensate in reverse completion order.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from gateway.atomicity.compensation import (
    CallContext,
    UndoImpossible,
    encode_response,
    encode_snapshot,
    relative_path,
    snapshot_call,
)
from gateway.atomicity.journal import Journal
from gateway.atomicity.plan import AtomicStep, Strategy, UndoKind
from gateway.atomicity.rollback import UndoResult, run_undo
from gateway.atomicity.state import BatchState, BatchStateMachine
from gateway.atomicity.transactions import TransactionFailed, TransactionSet
from gateway.atomicity.tx_calls import lifetime
from gateway.atomicity.untrusted import UntrustedValue
from gateway.budget import ByteBudget
from gateway.config import GatewayConfig
from gateway.errors import BatchLost, JournalUnavailable, PayloadTooLarge
from gateway.execution import Deadline, execute, failure_summary, log_call, send_within
from gateway.metrics import GatewayMetrics
from gateway.model import (
    BatchOutcome,
    BatchReport,
    BatchResult,
    CallFailure,
    ItemResult,
    ResultNode,
    RollbackStatus,
    Skipped,
    SubResponse,
)
from gateway.planning import BatchPlan, PlannedCall
from gateway.routing import RouteTable
from gateway.upstream import UpstreamPool

log = structlog.get_logger("gateway.atomic")


@dataclass
class CallRecord:
    """What became of one executed call: journaled intent, outcome and (later) its undo."""

    step: AtomicStep
    intent: dict[str, Any]
    state: str  # done | failed | unknown | not_sent
    outcome: dict[str, Any] | None
    seq: int
    undo: UndoResult | None = None


Prepare = Callable[
    [PlannedCall, Mapping[int, SubResponse | CallFailure]], tuple[PlannedCall, AtomicStep] | CallFailure
]
"""Called right before each call of the batch is sent, with what the earlier calls got (by
position): the call as it must be sent and its step (a graph batch resolves references here), or a
CallFailure: the call is not sent and fails, so the batch rolls back."""


def classify(outcome: SubResponse | CallFailure) -> str:
    if isinstance(outcome, SubResponse):
        return "failed" if outcome.failed else "done"
    return "unknown" if outcome.maybe_executed else "not_sent"


class AtomicRun:
    """One atomic batch in flight; `run` returns the annotated report.

    No exception escapes a batch once a call was made: a journal that cannot be written, an
    upstream value that is refused, or a bug in one call ends in a rollback and an honest report.
    """

    def __init__(
        self, *, batch_id: str, plan: BatchPlan, steps: dict[int, AtomicStep],
        config: GatewayConfig, routes: RouteTable, pool: UpstreamPool, journal: Journal,
        metrics: GatewayMetrics, deadline: Deadline, budget: ByteBudget | None = None,
        owner: str | None = None, prepare: Prepare | None = None,
    ) -> None:
        self.batch_id, self.plan, self.steps = batch_id, plan, steps
        self._prepare = prepare
        self.outcomes: dict[int, SubResponse | CallFailure] = {}
        """What each call that was made (or failed to be prepared) got, by position."""
        self.owner = owner
        """Journal.owner_of(the outer Authorization): who may look the batch up (None: nobody)."""
        self._buffer = budget
        """The batch's share of buffered sub-response bytes (limits.max_batch_buffer_bytes)."""
        self._config, self._routes, self._pool = config, routes, pool
        self._journal, self._metrics, self._deadline = journal, metrics, deadline
        self._cap = config.batch.limits.max_response_bytes
        self.ctx = CallContext(routes, plan.base_headers, self._cap)
        settings = {n: u.transactions for n, u in config.upstreams.items() if u.transactions}
        self.txs = TransactionSet(
            batch_id, pool, routes, journal, settings, config.batch.rollback, plan.base_headers,
            {name: lifetime(config, name) for name in settings},
        )
        self.machine = BatchStateMachine()
        self.records: dict[int, CallRecord] = {}
        self.abort_reason: str | None = None
        self.journal_error: str | None = None
        self.lost: BatchLost | None = None
        """Set when a shared journal fenced this batch off: another instance finishes it."""
        self._tx_errors: dict[str, str | None] = {}
        self._seq = itertools.count(1)
        self._journal_cap = config.journal.max_batch_bytes
        self._intents = {
            planned.position: _intent(
                planned, steps[planned.position], config.upstreams[planned.upstream].idempotency_keys
            )
            for planned in plan.calls
            if self.steps[planned.position].strategy is Strategy.COMPENSATION
        }
        """The journaled intent of each compensable call, built once (sized here, written later)."""
        self._journal_used = self._planned_journal_bytes()

    def _planned_journal_bytes(self) -> int:
        """What the journal will hold before any snapshot or outcome; 413 when it is over the cap."""
        used = len(json.dumps([list(pair) for pair in self.plan.base_headers]))
        used += sum(len(json.dumps(intent)) for intent in self._intents.values())
        if used > self._journal_cap:
            raise PayloadTooLarge(
                f"the batch's journal record would be {used} bytes, over journal.max_batch_bytes "
                f"({self._journal_cap}); send fewer or smaller calls, or fewer outer headers",
                limit="journal.max_batch_bytes",
            )
        return used

    async def run(self) -> BatchReport:
        """Raises JournalUnavailable (503) before any call was made, or BatchLost (503) when a
        shared journal fenced the batch off: then no further call of it was made here."""
        try:
            return await self._run()
        finally:
            self._journal.ended(self.batch_id)

    async def _run(self) -> BatchReport:
        await self._journal.batch_state(
            self.batch_id, BatchState.PLANNED, f"{len(self.plan.calls)} calls",
            headers=[list(pair) for pair in self.plan.base_headers], owner=self.owner,
            request_id=next((v for k, v in self.plan.base_headers if k.lower() == "x-request-id"), None),
        )
        self.machine.to(BatchState.RUNNING)
        await self._journal.batch_state(self.batch_id, BatchState.RUNNING)
        root = await execute(self.plan.root, self.run_call)
        if self._lost() is None and self.abort_reason is None and not root.failed:
            outcome, detail = await self._commit()
        elif self._lost() is None:
            outcome, detail = await self._compensate()
        lost = self._lost()
        if lost is not None:
            log.error("batch_lost", batch_id=self.batch_id, detail=lost.detail)
            raise BatchLost(
                f"atomic batch {self.batch_id} was taken over by another gateway instance (this one "
                "lost its journal lease or the batch): no further call of it is made here, and that "
                "instance rolls it back (or forward past its commit point); look it up by its id"
            )
        return BatchReport(
            root=self._annotate(root, outcome),
            batch_id=self.batch_id,
            atomic_outcome=outcome,
            outcome_detail=detail,
        )

    async def _transition(self, state: BatchState, detail: str | None = None) -> bool:
        """Move to `state` and journal it; False when the journal could not record it."""
        self.machine.to(state)
        return await self._jot(self._journal.batch_state(self.batch_id, state, detail))

    async def _jot(self, write: Awaitable[None]) -> bool:
        """A journal write whose failure is remembered and reported, not raised."""
        try:
            await write
        except BatchLost as exc:
            self._lose(exc)
            return False
        except JournalUnavailable as exc:
            self.journal_error = exc.detail
            log.error("journal_write_failed", batch_id=self.batch_id, detail=exc.detail)
            return False
        return True

    def _lose(self, exc: BatchLost) -> None:
        if self.lost is None:
            self.lost = exc
            self.abort_reason = self.abort_reason or "the batch was taken over by another gateway instance"

    def _lost(self) -> BatchLost | None:
        return self.lost or self.txs.batch_lost

    async def _owned(self, *, strict: bool) -> bool:
        """Whether this instance still owns the batch, right before an upstream call. A journal that
        cannot answer stops a forward call (`strict`) but not an undo or rollback."""
        if self._lost() is not None:
            return False
        try:
            await self._journal.fence(self.batch_id)
        except BatchLost as exc:
            self._lose(exc)
            return False
        except JournalUnavailable as exc:
            self.journal_error = exc.detail
            return not strict
        return True

    def _intent(self, planned: PlannedCall, step: AtomicStep) -> dict[str, Any]:
        """The intent built in __init__ for a compensable call; built now for the others."""
        cached = self._intents.get(planned.position)
        if cached is not None:
            return cached
        return _intent(planned, step, self._config.upstreams[planned.upstream].idempotency_keys)

    # -- forward calls -------------------------------------------------------------------------

    async def run_call(self, planned: PlannedCall) -> ItemResult:
        if self._prepare is not None:
            if self.abort_reason is not None:
                return ItemResult(Skipped(f"not executed: the batch is rolling back ({self.abort_reason})"))
            prepared = self._prepared(planned, self._prepare)
            if isinstance(prepared, CallFailure):
                self.outcomes[planned.position] = prepared
                if self.abort_reason is None:
                    self.abort_reason = failure_summary(planned, ItemResult(prepared))
                return ItemResult(prepared)
            planned = prepared
        async with self._pool.bound(planned.upstream, self.batch_id):
            if self.abort_reason is not None:
                return ItemResult(Skipped(f"not executed: the batch is rolling back ({self.abort_reason})"))
            try:
                outcome = await self._forward(planned, self.steps[planned.position])
            except Exception as exc:  # a bug must not leave the batch half-done: roll it back
                log.exception("atomic_call_failed", batch_id=self.batch_id, position=planned.position)
                outcome = CallFailure(502, f"the gateway failed on this call: {exc!r}", maybe_executed=True)
                self._records_unknown(planned)
        if outcome.failed and self.abort_reason is None:
            self.abort_reason = failure_summary(planned, ItemResult(outcome))
        self.outcomes[planned.position] = outcome
        return ItemResult(outcome)

    def _prepared(self, planned: PlannedCall, prepare: Prepare) -> PlannedCall | CallFailure:
        """The call as `prepare` makes it, its step and journal intent in place; never raises."""
        try:
            prepared = prepare(planned, self.outcomes)
        except Exception as exc:  # a bug in a hook fails the call (not sent), not the batch
            log.exception("atomic_prepare_failed", batch_id=self.batch_id, position=planned.position)
            return CallFailure(502, f"not sent: the gateway failed preparing this call: {exc!r}")
        if isinstance(prepared, CallFailure):
            return prepared
        call, step = prepared
        self.steps[call.position] = step
        if step.strategy is Strategy.COMPENSATION and call.position not in self._intents:
            intent = _intent(call, step, self._config.upstreams[call.upstream].idempotency_keys)
            size = len(json.dumps(intent))
            if self._journal_used + size > self._journal_cap:
                return CallFailure(
                    413, f"not sent: its journal record ({size} bytes) would take the batch's over "
                    f"journal.max_batch_bytes ({self._journal_cap})",
                )
            self._journal_used += size
            self._intents[call.position] = intent
        return call

    def _records_unknown(self, planned: PlannedCall) -> None:
        step = self.steps[planned.position]
        if planned.position not in self.records:
            record = CallRecord(step, self._intent(planned, step), "unknown", None, next(self._seq))
            self.records[planned.position] = record

    async def _forward(self, planned: PlannedCall, step: AtomicStep) -> SubResponse | CallFailure:
        key = f"{self.batch_id}.{planned.position}"
        headers = _with_header(planned.call.headers, "Idempotency-Key", key)
        if step.strategy is Strategy.TRANSACTION:
            try:
                token = await self.txs.token(planned.upstream, planned.own_headers)
            except TransactionFailed as exc:
                return CallFailure(502, f"could not begin the upstream transaction: {exc}")
            headers = _with_header(headers, self.txs.header(planned.upstream), token)
        call = replace(planned.call, headers=headers)
        intent = self._intent(planned, step)
        if step.strategy is Strategy.COMPENSATION:
            failure = await self._snapshot(intent)
            if failure is not None:
                return failure
            try:
                await self._journal.step_intent(self.batch_id, planned.position, intent)
            except BatchLost as exc:
                self._lose(exc)
                return CallFailure(503, "not sent: the batch was taken over by another gateway instance")
            except JournalUnavailable as exc:
                self.journal_error = exc.detail
                return CallFailure(503, f"not sent: the journal could not record it ({exc.detail})")
        if not await self._owned(strict=True):
            return CallFailure(503, "not sent: this instance could not confirm it still owns the batch")
        started = time.perf_counter()
        outcome = await send_within(self._pool, call, self._deadline, self._buffer)
        log_call(planned, outcome, started, self._config.logging.subrequest_level)
        await self._record(planned.position, step, intent, outcome)
        return outcome

    async def _snapshot(self, intent: dict[str, Any]) -> CallFailure | None:
        """Take the snapshot GET (identity-encoded, checked, within the journal budget)."""
        try:
            call = snapshot_call(intent, self.ctx)
        except (UndoImpossible, UntrustedValue) as exc:  # e.g. a snapshot path `//x`: never sent
            return CallFailure(502, f"not sent: no snapshot could be taken ({exc})")
        if call is None:
            return None
        response = await send_within(self._pool, call, self._deadline, self._buffer)
        if isinstance(response, CallFailure):
            return CallFailure(response.status, f"snapshot before the call failed: {response.reason}")
        shown = relative_path(self.ctx, call)
        if not (200 <= response.status < 300 or response.status in (404, 410)):
            return CallFailure(502, f"snapshot GET {shown} answered {response.status}")
        try:
            snapshot = encode_snapshot(response, self._cap)
        except UntrustedValue as exc:
            return CallFailure(502, f"not sent: the snapshot GET {shown} cannot be restored ({exc})")
        size = len(json.dumps(snapshot))
        if self._journal_used + size > self._journal_cap:
            self._metrics.limits_hit.labels("journal.max_batch_bytes").inc()
            return CallFailure(
                413, f"not sent: its snapshot ({size} bytes) would take the batch's journal record "
                f"over journal.max_batch_bytes ({self._journal_cap})",
            )
        self._journal_used += size
        intent["snapshot"] = snapshot
        return None

    async def _record(
        self, position: int, step: AtomicStep, intent: dict[str, Any],
        outcome: SubResponse | CallFailure,
    ) -> None:
        encoded = None
        if isinstance(outcome, SubResponse):
            keep_body = step.undo is not None and step.undo.kind in (UndoKind.DELETE_CREATED, UndoKind.RULE)
            encoded = encode_response(outcome, keep_body=keep_body, cap=self._cap)
            size = len(json.dumps(encoded))
            if self._journal_used + size > self._journal_cap:
                encoded = {**encoded, "body_b64": "", "body_error": "over journal.max_batch_bytes"}
                size = len(json.dumps(encoded))
            self._journal_used += size
        record = CallRecord(step, intent, classify(outcome), encoded, next(self._seq))
        self.records[position] = record
        if step.strategy is Strategy.COMPENSATION:
            written = await self._jot(
                self._journal.step_outcome(self.batch_id, position, record.state, encoded, record.seq)
            )
            if not written and self.abort_reason is None:
                self.abort_reason = f"the journal could not record {intent['where']}"

    # -- commit and compensation ---------------------------------------------------------------

    async def _commit(self) -> tuple[BatchOutcome, str | None]:
        if not await self._transition(BatchState.COMMITTING):
            if self._lost() is not None:
                return BatchOutcome.ROLLBACK_INCOMPLETE, None  # not reported: run() raises BatchLost
            return await self._compensate(commit_error="the journal could not record the commit decision")
        for index, upstream in enumerate(self.txs.begun):
            if self._lost() is not None:
                return BatchOutcome.ROLLBACK_INCOMPLETE, None
            error = await self._end(upstream, commit=True)
            if error is not None:
                committed = self.txs.begun[:index]
                return await self._compensate(commit_error=error, committed=committed)
        await self._transition(BatchState.COMMITTED)
        return BatchOutcome.COMMITTED, self._journal_note(None)

    async def _end(self, upstream: str, *, commit: bool) -> str | None:
        try:
            return await self.txs.end(upstream, commit=commit)
        except Exception as exc:
            log.exception("transaction_end_failed", batch_id=self.batch_id, upstream=upstream)
            return f"{'commit' if commit else 'rollback'} on {upstream!r} failed in the gateway: {exc!r}"

    async def _compensate(
        self, commit_error: str | None = None, committed: list[str] | None = None
    ) -> tuple[BatchOutcome, str | None]:
        await self._transition(BatchState.COMPENSATING, commit_error or self.abort_reason)
        if self._lost() is not None:  # another instance owns it: not one rollback call from here
            return BatchOutcome.ROLLBACK_INCOMPLETE, None
        committed = committed or []
        self._tx_errors = {
            upstream: await self._end(upstream, commit=False)
            for upstream in self.txs.begun
            if upstream not in committed
        }
        for error in self._tx_errors.values():
            self._metrics.rollbacks.labels("transaction", "undone" if error is None else "undo_failed").inc()
        self._tx_errors.update({u: "its transaction was already committed" for u in committed})
        for position, record in sorted(self.records.items(), key=lambda kv: -kv[1].seq):
            if record.step.strategy is Strategy.COMPENSATION and record.state in ("done", "unknown"):
                record.undo = await self._undo(position, record)
        problems = self._problems()
        outcome = BatchOutcome.ROLLBACK_INCOMPLETE if problems else BatchOutcome.ROLLED_BACK
        detail = "; ".join(problems) if problems else commit_error or self.abort_reason
        await self._transition(BatchState(outcome.value), detail)
        return outcome, self._journal_note(detail)

    def _journal_note(self, detail: str | None) -> str | None:
        error = self.journal_error or self.txs.journal_error
        if error is None:
            return detail
        note = f"the journal could not record every step ({error}); recovery may repeat undos"
        return note if detail is None else f"{detail}; {note}"

    async def _undo(self, position: int, record: CallRecord) -> UndoResult:
        outcome = record.outcome if record.state == "done" else None
        if not await self._owned(strict=False):
            return UndoResult(False, "not undone here: the batch was taken over by another gateway instance")
        try:
            result = await run_undo(
                self._pool, self.ctx, record.intent, outcome,
                f"{self.batch_id}.{position}.undo", self._config.batch.rollback,
            )
        except Exception as exc:
            log.exception("undo_crashed", batch_id=self.batch_id, position=position)
            result = UndoResult(False, f"the gateway failed while undoing: {exc!r}")
        state = "undone" if result.done else "undo_failed"
        if record.step.strategy is Strategy.COMPENSATION:
            await self._jot(self._journal.step_undo(self.batch_id, position, state, result.detail))
        self._metrics.rollbacks.labels("compensation", state).inc()
        if result.attempts > 1:
            self._metrics.undo_retries.labels(record.intent["upstream"]).inc(result.attempts - 1)
        if not result.done:
            log.error("undo_failed", batch_id=self.batch_id, position=position, detail=result.detail)
        return result

    def _problems(self) -> list[str]:
        problems = [f"{u}: {e}" for u, e in self._tx_errors.items() if e is not None]
        for _position, record in sorted(self.records.items()):
            if record.undo is not None and not record.undo.done:
                problems.append(f"{record.intent['where']}: {record.undo.detail}")
        return problems

    # -- reporting -----------------------------------------------------------------------------

    def _annotate(self, root: ResultNode, outcome: BatchOutcome) -> ResultNode:
        positions = iter(range(len(self.plan.calls)))

        def walk(node: ResultNode) -> ResultNode:
            if isinstance(node, BatchResult):
                return BatchResult(node.mode, tuple(walk(child) for child in node.items))
            status, detail = self._item_status(next(positions), node, outcome)
            return replace(node, rollback=status, rollback_detail=detail)

        return walk(root)

    def _item_status(
        self, position: int, item: ItemResult, outcome: BatchOutcome
    ) -> tuple[RollbackStatus, str | None]:
        record = self.records.get(position)
        if isinstance(item.outcome, Skipped):
            return RollbackStatus.SKIPPED, None
        if record is None:
            return RollbackStatus.FAILED, None
        if outcome is BatchOutcome.COMMITTED:
            return RollbackStatus.EXECUTED, None
        if record.step.strategy is Strategy.TRANSACTION:
            return self._tx_item_status(record)
        if record.state in ("failed", "not_sent"):
            return RollbackStatus.FAILED, None
        if record.step.strategy is Strategy.SAFE:
            return RollbackStatus.EXECUTED, "read-only call; nothing to roll back"
        if record.undo is not None and record.undo.done:
            return RollbackStatus.ROLLED_BACK, record.undo.detail
        detail = record.undo.detail if record.undo is not None else "no undo was run"
        return RollbackStatus.ROLLBACK_FAILED, detail

    def _tx_item_status(self, record: CallRecord) -> tuple[RollbackStatus, str | None]:
        error = self._tx_errors.get(record.intent["upstream"])
        if error is not None:
            return RollbackStatus.ROLLBACK_FAILED, error
        if record.state in ("failed", "not_sent"):
            return RollbackStatus.FAILED, "upstream transaction rolled back"
        return RollbackStatus.ROLLED_BACK, "upstream transaction rolled back"


def _with_header(
    headers: tuple[tuple[str, str], ...], name: str, value: str
) -> tuple[tuple[str, str], ...]:
    kept = tuple((k, v) for k, v in headers if k.lower() != name.lower())
    return (*kept, (name, value))


def _intent(planned: PlannedCall, step: AtomicStep, replayable: bool) -> dict[str, Any]:
    """What the journal keeps of a compensable call: its own headers (the batch's are kept once),
    the route scope its undo must stay in, and its body only when a declared rule may read it or
    recovery may replay the call (`replayable`: the upstream honours idempotency keys)."""
    keep_body = replayable or (step.undo is not None and step.undo.kind is UndoKind.RULE)
    return {
        "where": planned.where,
        "upstream": planned.upstream,
        "method": planned.call.method,
        "url": str(planned.call.url),
        "path": planned.upstream_path,
        "scope": planned.scope,
        "headers": [list(pair) for pair in planned.own_headers],
        "body_b64": base64.b64encode(planned.call.body or b"").decode("ascii") if keep_body else "",
        "undo": None if step.undo is None else step.undo.to_json(),
        "replayable": replayable,
    }
