"""An instance's lease on the shared journal: a row with a fresh epoch whose `lease_until` it renews.

Times are the server's (`now()`), never this host's clock; `valid_until` is a local, conservative
estimate (monotonic) that lets a fence check skip the round trip while the lease is surely valid.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

log = structlog.get_logger("gateway.journal")

_REGISTER = (
    "INSERT INTO instances (epoch, name, lease_until) "
    "VALUES (nextval('epochs'), $1, now() + make_interval(secs => $2)) RETURNING epoch"
)
_RENEW = (
    "UPDATE instances SET lease_until = now() + make_interval(secs => $2) "
    "WHERE epoch = $1 AND lease_until > now() RETURNING epoch"
)
"""An expired lease is never renewed: another instance may be taking its batches over."""
_EXPIRE_EPOCH = "UPDATE instances SET lease_until = now() WHERE epoch = $1 AND lease_until > now()"
_EXPIRE_NAME = (
    "UPDATE instances SET lease_until = now() WHERE name = $1 AND epoch <> $2 AND lease_until > now()"
)


class Lease:
    """This process's ownership of its batches: `epoch` changes when a lapsed lease is replaced."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name = name
        self.seconds = seconds
        self.margin = seconds / 3
        """A write is accepted only while the lease has at least this long left."""
        self.epoch = 0
        self.valid_until = 0.0
        """time.monotonic() before which the lease surely has `margin` left (0: unknown)."""

    def surely_valid(self) -> bool:
        return time.monotonic() < self.valid_until - self.margin

    def seen(self, started: float, remaining: float | None) -> None:
        """A server answer (sent at monotonic `started`) said the lease has `remaining` seconds."""
        if remaining is not None:
            self.valid_until = max(self.valid_until, started + remaining)

    async def register(self, conn: Any) -> int:
        started = time.monotonic()
        self.epoch = int(await conn.fetchval(_REGISTER, self.name, self.seconds))
        self.valid_until = started + self.seconds
        log.debug("journal_lease_registered", instance=self.name, epoch=self.epoch,
                 lease_seconds=self.seconds)
        return self.epoch

    async def renew(self, conn: Any) -> bool:
        """Extend the lease; False when it had lapsed (then `register` a new epoch)."""
        started = time.monotonic()
        renewed = await conn.fetchval(_RENEW, self.epoch, self.seconds)
        if renewed is None:
            return False
        self.valid_until = started + self.seconds
        return True

    async def keep(self, conn: Any) -> None:
        """Renew, or after a lapse (a pause, a partition) start a new epoch for new batches: the
        old epoch's batches are fenced off and taken over once it has expired."""
        if await self.renew(conn):
            return
        old = self.epoch
        self.valid_until = 0.0
        await self.register(conn)
        log.error("journal_lease_lost", instance=self.name, old_epoch=old, epoch=self.epoch,
                  detail="the lease lapsed; batches of the old epoch are stopped and taken over")

    async def release(self, conn: Any) -> None:
        """End the lease now (on close): what this process left unfinished can be taken over."""
        self.valid_until = 0.0
        await conn.execute(_EXPIRE_EPOCH, self.epoch)


async def expire_instance(conn: Any, name: str, keep: int) -> None:
    """End the lease of an instance known to be dead (a worker whose supervisor saw it exit);
    never the epoch `keep` (the caller's own)."""
    await conn.execute(_EXPIRE_NAME, name, keep)


async def renew_periodically(lease: Lease, pool: Any, errors: tuple[type[BaseException], ...]) -> None:
    """Renew every third of the lease; a failure is logged and retried at the next tick."""
    while True:
        await asyncio.sleep(lease.seconds / 3)
        try:
            async with pool.acquire() as conn:
                await lease.keep(conn)
        except errors as exc:
            log.error("journal_lease_renew_failed", instance=lease.name, epoch=lease.epoch,
                      detail=str(exc)[:300])
        except Exception:  # never end the renewals: a lapsed lease loses every batch in flight
            log.exception("journal_lease_renew_failed", instance=lease.name, epoch=lease.epoch)
