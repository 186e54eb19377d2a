"""Takeover with a shared journal: every third of the lease, recover the batches of dead instances.

Only for a journal that says so (`Journal.takeover_every`); a SQLite journal is recovered at start-up.
"""

from __future__ import annotations

import asyncio

import structlog

from gateway.atomicity.recovery import Recovery
from gateway.metrics import count_recovered
from gateway.runtime import GatewayRef

log = structlog.get_logger("gateway.recovery")


def start_takeover(ref: GatewayRef) -> asyncio.Task[None] | None:
    """The takeover loop as a task (cancel it on stop), or None when the journal is not shared."""
    every = ref.current.batches.journal.takeover_every
    return None if every is None else asyncio.create_task(take_over_periodically(ref, every))


async def take_over_periodically(ref: GatewayRef, every: float) -> None:
    """Claim and recover what instances whose lease expired left unfinished (each batch exactly
    once across the replicas: the claim is a row lock); parked batches are left to operators."""
    while True:
        await asyncio.sleep(every)
        gateway = ref.current  # after reloads: the newest config and pools
        try:
            report = await Recovery(
                gateway.config, gateway.routes, gateway.pool, gateway.batches.journal
            ).run(parked=False)
        except Exception:  # never let one bad round end takeover for the life of the process
            log.exception("takeover_failed")
            continue
        if report.outcomes:
            log.warning("batches_recovered_after_takeover",
                        batches={k: v.value for k, v in report.outcomes.items()})
        count_recovered(gateway.metrics, [v.value for v in report.outcomes.values()])
        for batch_id, reason in report.needs_operator.items():
            if batch_id != "*":
                log.error("batch_needs_operator", batch_id=batch_id, reason=reason,
                          hint=f"gateway batches show {batch_id}")
