"""The atomic batch state machine; every transition is in the table below and nowhere else.

PLANNED -> RUNNING -> COMMITTING -> COMMITTED, or -> COMPENSATING -> ROLLED_BACK | ROLLBACK_INCOMPLETE;
an operator may retry a ROLLBACK_INCOMPLETE batch (-> COMPENSATING) or mark a stuck one RESOLVED.
"""

from __future__ import annotations

from enum import Enum


class BatchState(str, Enum):
    PLANNED = "planned"
    RUNNING = "running"
    COMMITTING = "committing"
    COMMITTED = "committed"
    COMPENSATING = "compensating"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_INCOMPLETE = "rollback_incomplete"
    RESOLVED = "resolved"
    """An operator dealt with what a rollback left (gateway batches resolve)."""

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {BatchState.COMMITTED, BatchState.ROLLED_BACK, BatchState.ROLLBACK_INCOMPLETE, BatchState.RESOLVED}
)
PRUNABLE_STATES = frozenset({BatchState.COMMITTED, BatchState.ROLLED_BACK, BatchState.RESOLVED})
"""Final states the retention prunes; a rollback_incomplete batch stays until an operator resolves it."""

_RESOLVED = BatchState.RESOLVED
TRANSITIONS: dict[BatchState, frozenset[BatchState]] = {
    BatchState.PLANNED: frozenset({BatchState.RUNNING, BatchState.COMPENSATING, _RESOLVED}),
    BatchState.RUNNING: frozenset({BatchState.COMMITTING, BatchState.COMPENSATING, _RESOLVED}),
    BatchState.COMMITTING: frozenset({BatchState.COMMITTED, BatchState.COMPENSATING, _RESOLVED}),
    BatchState.COMPENSATING: frozenset(
        {BatchState.ROLLED_BACK, BatchState.ROLLBACK_INCOMPLETE, _RESOLVED}
    ),
    BatchState.COMMITTED: frozenset(),
    BatchState.ROLLED_BACK: frozenset(),
    BatchState.ROLLBACK_INCOMPLETE: frozenset({BatchState.COMPENSATING, _RESOLVED}),
    BatchState.RESOLVED: frozenset(),
}


class IllegalTransition(Exception):
    """A bug in the coordinator: it tried a transition the table does not allow."""


class BatchStateMachine:
    """Holds one batch's state and refuses any transition not in TRANSITIONS."""

    def __init__(self, state: BatchState = BatchState.PLANNED) -> None:
        self.state = state

    def to(self, new: BatchState) -> BatchState:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.state.value} -> {new.value} is not allowed")
        self.state = new
        return new
