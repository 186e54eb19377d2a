"""The neutral batch model: what a client asked for and what came back.

Small frozen dataclasses shared by both wire formats, the planner, the executors and atomicity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

Headers = tuple[tuple[str, str], ...]
"""Ordered header pairs; names keep the client's spelling, repeats stay separate pairs."""


class ExecutionMode(str, Enum):
    """How the items of one batch run: in order, stopping at the first failure, or concurrently."""

    SERIAL = "Serial"
    UNORDERED = "Unordered"


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """Limits the codecs and the planner enforce before anything is executed."""

    max_body_bytes: int = 10 * 1024 * 1024
    max_items: int = 1000
    max_depth: int = 8
    max_part_headers: int = 100
    max_part_header_bytes: int = 60 * 1024


@dataclass(frozen=True, slots=True)
class SubRequest:
    """One call as the client wrote it: method, origin-form target, its own headers and body.

    `where` says where the call sits in the client's request, for error messages and skip reasons:
    a JSON pointer such as `/Batch/items/2/SingleItem` or `part 3`.
    """

    method: str
    target: str
    headers: Headers = ()
    body: bytes | None = None
    where: str = ""
    content_id: str | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """An ordered group of items (calls or nested batches) run with one execution mode."""

    mode: ExecutionMode
    items: tuple[SubRequest | Batch, ...]
    where: str = ""


Item = SubRequest | Batch


@dataclass(frozen=True, slots=True)
class SubResponse:
    """What an upstream answered to one call: status line, headers and the body bytes as received."""

    status: int
    reason: str = ""
    headers: Headers = ()
    body: bytes = b""

    @property
    def failed(self) -> bool:
        return self.status >= 400


@dataclass(frozen=True, slots=True)
class CallFailure:
    """A call that got no response: 502 (unreachable, connection lost) or 504 (timed out)."""

    status: int
    reason: str
    maybe_executed: bool = False
    """True when the request may have reached the upstream before the failure (outcome unknown)."""

    failed = True


@dataclass(frozen=True, slots=True)
class Skipped:
    """A call that was not executed, with the reason (naming the failed item that stopped it)."""

    reason: str

    failed = False


Outcome = SubResponse | CallFailure | Skipped


class RollbackStatus(str, Enum):
    """What became of one call of an atomic batch."""

    EXECUTED = "executed"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    FAILED = "failed"
    SKIPPED = "skipped"


class BatchOutcome(str, Enum):
    """The overall result of an atomic batch."""

    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_INCOMPLETE = "rollback_incomplete"


@dataclass(frozen=True, slots=True)
class ItemResult:
    """The outcome of one call, plus its atomicity status when the batch was atomic."""

    outcome: Outcome
    rollback: RollbackStatus | None = None
    rollback_detail: str | None = None

    @property
    def failed(self) -> bool:
        return self.outcome.failed


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The results of a batch, item for item at the same positions as the request."""

    mode: ExecutionMode
    items: tuple[ItemResult | BatchResult, ...]

    @property
    def failed(self) -> bool:
        return any(item.failed for item in self.items)


ResultNode = ItemResult | BatchResult


@dataclass(frozen=True, slots=True)
class BatchReport:
    """Everything the codecs need to answer: the result tree and the batch's own identity/outcome."""

    root: ResultNode
    batch_id: str
    atomic_outcome: BatchOutcome | None = None
    outcome_detail: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def iter_calls(item: Item) -> list[SubRequest]:
    """The calls of an item tree in depth-first order: the order that defines call positions."""
    if isinstance(item, SubRequest):
        return [item]
    calls: list[SubRequest] = []
    for child in item.items:
        calls.extend(iter_calls(child))
    return calls
