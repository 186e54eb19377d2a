"""Operator commands on the journal: `gateway recover` and `gateway batches list|show|retry|resolve`.

They print plain lines (or JSON for `show`) and return the process exit code; secrets are never printed.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.atomicity.journal import JournaledBatch, open_journal
from gateway.atomicity.recovery import RecoveryReport, with_recovery
from gateway.atomicity.state import BatchState, BatchStateMachine, IllegalTransition
from gateway.config import GatewayConfig

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NEEDS_OPERATOR = 3
"""Some batches are left for an operator: rollback_incomplete or kept unfinished (ids printed)."""


def print_report(report: RecoveryReport) -> int:
    for batch_id, state in report.outcomes.items():
        print(f"{batch_id}: {state.value}")
    print(f"recovered {len(report.outcomes)} unfinished batch(es)")
    for batch_id, reason in report.needs_operator.items():
        print(f"needs an operator: {batch_id}: {reason}")
    return EXIT_OK if report.clean else EXIT_NEEDS_OPERATOR


async def recover(config: GatewayConfig) -> int:
    """Finish every unfinished batch; 3 when some (from this run or before) need an operator."""
    report = await with_recovery(config)
    journal = open_journal(config)
    await journal.open()
    try:
        for summary in await journal.summaries():
            report.needs_operator.setdefault(summary.batch_id, f"{summary.state}: {summary.detail or ''}")
    finally:
        await journal.close()
    return print_report(report)


async def retry(config: GatewayConfig, batch_id: str) -> int:
    """Run recovery again for one batch, a rollback_incomplete one included."""
    return print_report(await with_recovery(config, [batch_id]))


async def list_batches(config: GatewayConfig, *, everything: bool) -> int:
    journal = open_journal(config)
    await journal.open()
    try:
        summaries = await journal.summaries(everything=everything)
    finally:
        await journal.close()
    for s in summaries:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.updated))
        note = f" (resolved: {s.resolution})" if s.resolution else ""
        print(f"{s.batch_id}\t{s.state}\t{stamp}\t{(s.detail or '')[:200]}{note}")
    if not everything:
        print(f"{len(summaries)} batch(es) need an operator")
    return EXIT_NEEDS_OPERATOR if summaries and not everything else EXIT_OK


async def show(config: GatewayConfig, batch_id: str) -> int:
    journal = open_journal(config)
    await journal.open()
    try:
        batch = await journal.batch(batch_id, reveal=False)
    finally:
        await journal.close()
    if batch is None:
        print(f"no batch {batch_id!r} in the journal")
        return EXIT_FAILED
    print(json.dumps(describe(batch, journal.sealer.sensitive), indent=2))
    return EXIT_OK


async def resolve(config: GatewayConfig, batch_id: str, note: str) -> int:
    """Mark a rollback_incomplete (or stuck unfinished) batch as dealt with by hand."""
    journal = open_journal(config)
    await journal.open()
    try:
        batch = await journal.batch(batch_id, reveal=False)
        if batch is None:
            print(f"no batch {batch_id!r} in the journal")
            return EXIT_FAILED
        try:
            BatchStateMachine(batch.state).to(BatchState.RESOLVED)
        except IllegalTransition:
            print(f"{batch_id} is {batch.state.value}: nothing to resolve")
            return EXIT_FAILED
        await journal.resolve(batch_id, note)
    finally:
        await journal.close()
    print(f"{batch_id}: resolved ({note})")
    return EXIT_OK


def describe(batch: JournaledBatch, sensitive: frozenset[str]) -> dict[str, Any]:
    """A batch as an operator reads it: what ran, what was undone, what is left; no secrets."""
    left = [
        {"where": s.intent.get("where"), "method": s.intent.get("method"), "url": s.intent.get("url"),
         "state": s.state, "undo_state": s.undo_state, "undo_detail": s.undo_detail}
        for s in batch.steps
        if s.state in ("done", "unknown", "intent") and s.undo_state != "undone"
    ]
    return {
        "batch_id": batch.batch_id,
        "state": batch.state.value,
        "detail": batch.detail,
        "resolution": batch.resolution,
        "created": batch.created,
        "updated": batch.updated,
        "headers": [[k, "<redacted>" if k.lower() in sensitive else v] for k, v in batch.headers],
        "transactions": [
            {"upstream": t.upstream, "state": t.state, "token_recorded": t.token is not None}
            for t in batch.transactions
        ],
        "steps": [
            {"position": s.position, "where": s.intent.get("where"), "method": s.intent.get("method"),
             "url": s.intent.get("url"), "state": s.state, "undo_state": s.undo_state,
             "undo_detail": s.undo_detail}
            for s in batch.steps
        ],
        "left_to_undo": left if _open_or_incomplete(batch.state) else [],
    }


def _open_or_incomplete(state: BatchState) -> bool:
    return not state.final or state is BatchState.ROLLBACK_INCOMPLETE
