"""Memory budgets for buffered sub-response bytes: one per batch, inside one shared by the process.

A batch holds its sub-responses until its answer is written; these budgets bound what that costs.
"""

from __future__ import annotations


class BudgetExceeded(Exception):
    """Taking these bytes would exceed a budget; the message names the config key (`limit`)."""

    def __init__(self, detail: str, limit: str) -> None:
        super().__init__(detail)
        self.limit = limit


class ByteBudget:
    """A counter of bytes held, with a limit; a child budget also draws on its parent."""

    def __init__(self, limit: int, key: str, parent: ByteBudget | None = None) -> None:
        self.limit = limit
        self.key = key
        self.held = 0
        self._parent = parent
        self._released = False

    def child(self, limit: int, key: str) -> ByteBudget:
        return ByteBudget(limit, key, parent=self)

    def take(self, size: int) -> None:
        """Reserve `size` more bytes, or raise BudgetExceeded naming the budget that is full."""
        if self._released:
            return  # the answer was already written (a shielded atomic run outlives its client)
        if self.held + size > self.limit:
            raise BudgetExceeded(
                f"buffering it would take {self.key} over {self.limit} bytes "
                f"({self.held} held)", self.key,
            )
        if self._parent is not None:
            self._parent.take(size)
        self.held += size

    def give_back(self, size: int) -> None:
        size = min(size, self.held)
        self.held -= size
        if self._parent is not None:
            self._parent.give_back(size)

    def release(self) -> None:
        """Give back everything (the batch's answer is written); later takes are not counted."""
        self.give_back(self.held)
        self._released = True
