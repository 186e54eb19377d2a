"""Running compensations: one undo call retried with exponential backoff within a deadline.

Shared by the live coordinator and crash recovery; an undo that did not succeed is never reported done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.atomicity.compensation import (
    CallContext,
    UndoImpossible,
    relative_path,
    undo_call,
    undo_succeeded,
)
from gateway.config import Rollback
from gateway.errors import UpstreamError
from gateway.upstream import UpstreamPool


@dataclass(frozen=True, slots=True)
class UndoResult:
    """done: the effect is reverted (or there was nothing to revert); detail says why not."""

    done: bool
    detail: str | None = None
    attempts: int = 0


async def with_retries(
    attempt: Callable[[], Awaitable[str | None]], policy: Rollback
) -> tuple[str | None, int]:
    """Call `attempt` until it returns None (success); backoff doubles up to the policy's limits."""
    ends = time.monotonic() + policy.deadline
    delay, error, tries = policy.initial_backoff, None, 0
    for tries in range(1, policy.attempts + 1):
        error = await attempt()
        if error is None or time.monotonic() + delay > ends or tries == policy.attempts:
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, policy.max_backoff)
    return error, tries


async def run_undo(
    pool: UpstreamPool,
    ctx: CallContext,
    intent: dict[str, Any],
    outcome: dict[str, Any] | None,
    key: str,
    policy: Rollback,
) -> UndoResult:
    """Build and send the undo of one call; `outcome` None means its outcome is unknown."""
    try:
        call = undo_call(intent, outcome, ctx, key)
    except UndoImpossible as exc:
        return UndoResult(False, f"undo not sent: {exc}")
    except (KeyError, ValueError, TypeError) as exc:  # a journaled record the gateway cannot read
        return UndoResult(False, f"undo not sent: the journaled call is unreadable ({exc!r})")
    if call is None:
        return UndoResult(True, "nothing to undo")

    shown = relative_path(ctx, call)

    async def attempt() -> str | None:
        try:
            response = await pool.send(call)
        except UpstreamError as exc:
            return exc.detail
        if undo_succeeded(call, response):
            return None
        return f"{call.method} {shown} answered {response.status}"

    error, tries = await with_retries(attempt, policy)
    if error is None:
        return UndoResult(True, f"{call.method} {shown}", tries)
    return UndoResult(False, f"undo failed after {tries} attempts: {error}", tries)
