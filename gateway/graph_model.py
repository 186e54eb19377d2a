"""The neutral model of a dependency-graph batch (Graph, OData, Salesforce Composite dialects).

Items with ids, the ids they wait for, references to earlier answers and atomic groups; sans-I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from gateway.model import BatchOutcome, ItemResult, SubRequest, SubResponse


@dataclass(frozen=True, slots=True)
class GraphItem:
    """One call of a graph batch as the client wrote it.

    `request.target`, its headers and body may still hold the dialect's references (`$1/lines`,
    `@{order.id}`); the batch's `ReferenceResolver` replaces them once the items named in
    `depends_on` have answered. `group` names the atomic group the item belongs to (None: none).
    """

    id: str
    request: SubRequest
    depends_on: tuple[str, ...] = ()
    group: str | None = None
    has_references: bool = False
    """True when the request holds references: it is resolved (and planned) just before it runs."""


class FailurePolicy(str, Enum):
    """What a failed item (or failed atomic group) stops."""

    DEPENDENTS = "dependents"
    """Only the items that depend on it, directly or not (Graph, OData with continue-on-error,
    Salesforce Composite without allOrNone)."""
    STOP = "stop"
    """Every item not yet started (OData without continue-on-error)."""


@dataclass(frozen=True, slots=True)
class AnsweredItem:
    """What a reference may read of an earlier item's answer: the answer itself and, when its
    `Location` points back into the gateway's own routes, that location as a gateway target."""

    response: SubResponse
    location_target: str | None = None


class ReferenceUnresolved(Exception):
    """A reference names nothing in the earlier answer (no Location, no such field, not JSON)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ReferenceResolver(Protocol):
    """A dialect's references, pure: the item's request with every reference replaced by what the
    answered items hold. Raises ReferenceUnresolved."""

    def __call__(self, item: GraphItem, answered: Mapping[str, AnsweredItem]) -> SubRequest: ...


@dataclass(frozen=True, slots=True)
class GraphBatch:
    """A decoded graph batch: items in the client's order.

    `sequential`: each item starts only after the one before it has finished (Salesforce
    Composite, OData multipart); otherwise items run as soon as their dependencies succeeded,
    concurrently within the per-upstream bounds. Members of one atomic group are adjacent and run
    in order through the atomicity engine, all-or-nothing.
    """

    items: tuple[GraphItem, ...]
    sequential: bool = False
    on_failure: FailurePolicy = FailurePolicy.DEPENDENTS
    resolver: ReferenceResolver | None = None
    where: str = ""


@dataclass(frozen=True, slots=True)
class Unmet:
    """An item that was not sent because what it waited for failed or was not run.

    `dependency` is the id (or group) that failed; None when the batch stopped (STOP policy) or a
    reference could not be resolved (`unresolved` then holds why).
    """

    reason: str
    dependency: str | None = None
    unresolved: bool = False

    failed = True


@dataclass(frozen=True, slots=True)
class GraphResult:
    """Per item id, in the client's order, its result (Unmet when it was not sent); per atomic
    group that ran, how it ended (client order). A member of a rolled-back group has an ItemResult
    with its rollback status; members after the failing one are Skipped (rollback `skipped`), as the
    atomicity engine reports them; a member whose reference did not resolve is Unmet (unresolved),
    and every member of a group that never started is Unmet."""

    items: tuple[tuple[str, ItemResult | Unmet], ...]
    groups: tuple[tuple[str, BatchOutcome], ...] = ()
    batch_id: str = ""
    group_batches: tuple[tuple[str, str], ...] = ()
    """Per atomic group that ran, the id it is journaled under (batch lookup, recovery): the
    batch id itself when the batch has one group, else `<batch_id>.<n>` (n: the group's ordinal)."""


_WORST_FIRST = (BatchOutcome.ROLLBACK_INCOMPLETE, BatchOutcome.ROLLED_BACK, BatchOutcome.COMMITTED)


def worst_outcome(result: GraphResult) -> BatchOutcome | None:
    """The worst outcome of the batch's atomic groups, None when it had none (`X-Batch-Outcome`,
    the batch's metric outcome)."""
    outcomes = {outcome for _, outcome in result.groups}
    return next((outcome for outcome in _WORST_FIRST if outcome in outcomes), None)
