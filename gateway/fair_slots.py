"""An upstream's batch call slots, shared fairly between batches: the least recently served goes next.

One big batch can use every free slot, but when a slot frees up and another batch is waiting, the
batch that was served longest ago (a newcomer first) gets it, so a small batch never queues behind
a big one's whole backlog.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class FairSlots:
    """`capacity` slots; waiting batches are served in order of their last grant (oldest first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiting: dict[Hashable, deque[asyncio.Future[None]]] = {}
        self._last_grant: dict[Hashable, int] = {}
        self._active: dict[Hashable, int] = {}
        self._ticks = itertools.count()

    @asynccontextmanager
    async def slot(self, batch: Hashable) -> AsyncIterator[None]:
        await self.acquire(batch)
        try:
            yield
        finally:
            self.release(batch)

    async def acquire(self, batch: Hashable) -> None:
        """Wait for a slot for `batch`; pair with `release(batch)`."""
        if self.in_use < self.capacity and not self._waiting:
            self._grant(batch)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(batch, deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(batch)  # granted just as it was cancelled: hand the slot on
            else:
                self._forget(batch, future)
            raise

    def _grant(self, batch: Hashable) -> None:
        self.in_use += 1
        self._active[batch] = self._active.get(batch, 0) + 1
        self._last_grant[batch] = next(self._ticks)

    def release(self, batch: Hashable) -> None:
        self.in_use -= 1
        self._active[batch] -= 1
        if not self._active[batch]:
            del self._active[batch]
            if batch not in self._waiting:  # nothing left of it here: forget its history
                self._last_grant.pop(batch, None)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.in_use < self.capacity and self._waiting:
            batch = min(self._waiting, key=lambda b: self._last_grant.get(b, -1))
            queue = self._waiting[batch]
            future = queue.popleft()
            if not queue:
                del self._waiting[batch]
            if future.done():  # cancelled while queued
                continue
            self._grant(batch)
            future.set_result(None)

    def _forget(self, batch: Hashable, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(batch)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._waiting[batch]
