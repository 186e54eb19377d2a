"""`GET {gateway.prefix}/batches/{batch_id}`: an atomic batch's outcome and per-call rollback status.

Read from the journal while the batch is retained, so a client whose connection dropped (or that
was answered 503 at shutdown) can learn what became of its batch. Only the credentials that sent
the batch may read it: its first journal write keeps `owner = HMAC-SHA256(key, Authorization)`
(`Journal.owner_of`), and a lookup must carry an `Authorization` with the same HMAC. A batch sent
without `Authorization` cannot be looked up by anyone. An unknown id, a pruned batch, another
owner's batch and a lookup without credentials all get the same 404: the answer tells nothing
about which. Lookups are not rate-limited.

What the journal cannot tell, and so the answer does not claim:

- Only compensated calls are journaled one by one (their intent is written before they are sent).
  Calls inside an upstream transaction are not: `transactions` reports each transactional
  upstream's state instead (`committed`, `rolled_back`, `rollback_failed`, `open`, ...).
  Read-only calls, skipped calls and calls refused before their intent was written (e.g. a failed
  snapshot) are not journaled either, so they are not listed.
- A call whose undo result was never journaled (the journal could not be written) is `unknown`,
  except in a batch that ended `rolled_back`: that outcome is only recorded once every undo
  succeeded, so the call is reported `rolled_back` with a detail saying it is inferred.
- A `resolved` batch was finished by an operator; its calls' undo results are what was journaled
  before that, anything else is `unknown`.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from gateway.atomicity.journal import BatchStatus, StepStatus
from gateway.atomicity.state import BatchState
from gateway.errors import ClientError
from gateway.runtime import KIND, gateway_of

_BATCH_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
NOT_FOUND = "no atomic batch with this id is retained for the credentials of this request"

EXECUTED, ROLLED_BACK, ROLLBACK_FAILED, FAILED, UNKNOWN = (
    "executed", "rolled_back", "rollback_failed", "failed", "unknown",
)
_NOT_UNDOING = frozenset(
    {BatchState.PLANNED, BatchState.RUNNING, BatchState.COMMITTING, BatchState.COMMITTED}
)


class BatchNotFound(ClientError):
    """The one answer for an unknown, pruned, not-yours or credential-less batch lookup."""

    status = 404
    title = "Batch not found"
    type_suffix = "batch-not-found"


async def batch_lookup(request: web.Request) -> web.Response:
    request[KIND] = "batch_lookup"
    journal = gateway_of(request).batches.journal
    batch_id = request.match_info["batch_id"]
    owner = journal.owner_of(request.headers.getall("Authorization", []))
    status = await journal.lookup(batch_id, owner) if _BATCH_ID_RE.match(batch_id) else None
    return _answer(status)


async def batch_lookup_by_request(request: web.Request) -> web.Response:
    """`GET {prefix}/batches?request_id=X`: the batch the caller sent with `X-Request-ID: X`
    (same credentials), for a client that lost the answer and so the batch id; same 404 otherwise."""
    request[KIND] = "batch_lookup"
    journal = gateway_of(request).batches.journal
    owner = journal.owner_of(request.headers.getall("Authorization", []))
    wanted = request.query.get("request_id", "")
    batch_id = await journal.batch_id_for(wanted, owner) if 0 < len(wanted) <= 128 else None
    status = None if batch_id is None else await journal.lookup(batch_id, owner)
    return _answer(status)


def _answer(status: BatchStatus | None) -> web.Response:
    """The lookup answer, never cached; the same 404 for every reason it is not shown."""
    if status is None:
        raise BatchNotFound(NOT_FOUND)
    response = web.json_response(describe(status))
    response.headers["Cache-Control"] = "no-store"
    response.headers["Vary"] = "Authorization"
    return response


def describe(batch: BatchStatus) -> dict[str, Any]:
    """The lookup answer: states, paths and details only (no URLs, queries, headers, bodies, tokens)."""
    return {
        "batch_id": batch.batch_id,
        "state": batch.state.value,
        "detail": batch.detail,
        "items": [_item(step, batch.state) for step in batch.steps],
        "transactions": [{"upstream": upstream, "state": state} for upstream, state in batch.transactions],
    }


def _item(step: StepStatus, batch: BatchState) -> dict[str, Any]:
    rollback, detail = item_rollback(step, batch)
    return {
        "where": step.where, "method": step.method, "path": step.path, "upstream": step.upstream,
        "state": step.state, "rollback": rollback, "detail": detail,
    }


def item_rollback(step: StepStatus, batch: BatchState) -> tuple[str, str | None]:
    """What became of one journaled call, from its step state, its undo state and the batch's state."""
    if step.undo_state == "undone":
        return ROLLED_BACK, step.undo_detail
    if step.undo_state == "undo_failed":
        return ROLLBACK_FAILED, step.undo_detail
    if step.state in ("failed", "not_sent"):
        return FAILED, None if step.status is None else f"answered {step.status}"
    if step.state in ("done", "unknown") and batch is BatchState.ROLLED_BACK:
        return ROLLED_BACK, "inferred from the batch's outcome; the undo result was not journaled"
    if step.state == "done" and batch in _NOT_UNDOING:
        return EXECUTED, None
    if step.state == "done" and batch is BatchState.COMPENSATING:
        return EXECUTED, "not undone yet: the batch is rolling back"
    if step.state == "unknown":
        return UNKNOWN, "its outcome is unknown (timeout or lost connection); no undo result was journaled"
    if step.state == "intent":
        return UNKNOWN, "sent or about to be sent; its outcome was not journaled"
    return UNKNOWN, "no undo result was journaled for this call"
