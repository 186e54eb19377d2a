"""The shared journal on PostgreSQL (asyncpg): the `Journal` protocol for several replicas at once.

Each write of a batch is one transaction fenced by the writer's lease epoch and the batch's owner;
batches of an instance whose lease expired are claimed (row locks, SKIP LOCKED) and recovered once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from secrets import token_hex
from typing import Any

import asyncpg
import structlog
from yarl import URL

from gateway.atomicity.journal import (
    INSTANCE_VARIABLE,
    OPERATOR_STATES,
    SETTLED_STATES,
    BatchStatus,
    BatchSummary,
    CrashPoint,
    JournaledBatch,
    JournaledStep,
    JournaledTransaction,
    StepStatus,
    owner_digest,
    owner_key_from,
    same_owner,
)
from gateway.atomicity.pg_lease import Lease, expire_instance, renew_periodically
from gateway.atomicity.pg_schema import lock_key, migrate
from gateway.atomicity.secrets import HeaderSealer, StoredHeaders
from gateway.atomicity.state import FINAL_STATES, PRUNABLE_STATES, BatchState
from gateway.config import Journal as JournalSettings
from gateway.errors import BatchLost, JournalUnavailable

log = structlog.get_logger("gateway.journal")

DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError,
)
"""What the driver raises when the server is unreachable, restarting or refuses a statement."""
_OPEN_ERRORS: tuple[type[BaseException], ...] = (*DB_ERRORS, RuntimeError, ValueError)
"""Also a schema from a newer gateway (RuntimeError) and a URL the driver refuses (ValueError)."""
_CLOSE_ERRORS: tuple[type[BaseException], ...] = (*DB_ERRORS, asyncio.CancelledError)
_FINALS = [state.value for state in FINAL_STATES]
_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"
"""Timestamps are the server's: replicas' clocks may differ."""

_LAPSED = "its lease lapsed"
_REFUSALS = {
    "GW001": _LAPSED, "GW002": "it is not in the journal", "GW003": "another instance owns it",
    "GW004": "an operator or a recovery parked it",
}
"""SQLSTATEs raised by the schema's fence() function, and what they mean."""
_FENCED = "WITH f AS MATERIALIZED (SELECT fence($1, $2, $3, $4) AS lease_left)"
"""Every write is one statement starting with this: fence() locks the writer's lease row (shared)
and the batch row, and raises unless the lease has its margin left and the batch is the writer's
(or new, when creating). One round trip; the statement commits or fails as a whole."""
_CLAIM = f"""
WITH candidates AS (
    SELECT b.batch_id, b.epoch AS old_epoch FROM batches b
    WHERE b.state <> ALL($2::text[]) AND b.batch_id <> ALL($5::text[])
      AND ((b.epoch IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM instances i WHERE i.epoch = b.epoch AND i.lease_until >= now()))
           OR ($3 AND b.epoch IS NULL))
      AND EXISTS (SELECT 1 FROM instances me
                  WHERE me.epoch = $1 AND me.lease_until > now() + make_interval(secs => $6))
    ORDER BY b.created LIMIT 500
    FOR UPDATE OF b SKIP LOCKED)
UPDATE batches SET epoch = $1, instance = $4, updated = {_NOW}
FROM candidates WHERE batches.batch_id = candidates.batch_id
  AND batches.epoch IS NOT DISTINCT FROM candidates.old_epoch
RETURNING batches.batch_id, batches.created
"""
"""Claim unfinished batches whose owner's lease expired (and parked ones with $3): rows another
claimant holds are skipped, so each batch is taken by exactly one instance."""
_CLAIM_ONE = f"""
UPDATE batches b SET epoch = $1, instance = $3, updated = {_NOW}
WHERE batch_id = $2 AND (b.epoch IS NULL OR b.epoch = $1 OR b.state = ANY($4::text[])
      OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.epoch = b.epoch AND i.lease_until >= now()))
RETURNING batch_id
"""


_SECRETS_CTE = (
    ", secret AS (INSERT INTO secrets (batch_id, ref, value) "
    "SELECT $2, x.ref, x.value FROM f, unnest($5::text[], $6::text[]) AS x(ref, value) "
    "ON CONFLICT DO NOTHING)"
)
"""The sensitive header values a write refers to, written in the same statement ($5, $6)."""


def _secret_params(secrets: dict[str, str]) -> tuple[list[str], list[str]]:
    return list(secrets), list(secrets.values())


async def _no_reset(conn: Any) -> None:
    """Connections go back to the pool as they are (the journal sets no session state), saving a
    round trip per write; one left inside a transaction (an error mid-way) is rolled back."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def instance_name() -> str:
    """The worker's instance id under a supervisor, else host:pid."""
    return os.environ.get(INSTANCE_VARIABLE) or f"{socket.gethostname()}:{os.getpid()}"


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parsed = URL(url)
    return str(parsed.with_password(None)) if parsed.password else url


class PostgresJournal:
    """A journal several gateway processes share; see the module docstring and the README."""

    def __init__(
        self, settings: JournalSettings, sealer: HeaderSealer | None = None, *, key: bytes | None = None
    ) -> None:
        if settings.url is None:
            raise ValueError("PostgresJournal needs journal.url")
        self._url = settings.url
        self._schema = settings.db_schema
        self._timeout = settings.timeout
        self._pool_size = settings.pool_size
        self._key = key
        self._owner_key: bytes | None = None
        self._pool: Any = None
        self._renewer: asyncio.Task[None] | None = None
        self.sealer = sealer or HeaderSealer(frozenset())
        self.instance = instance_name()
        self.lease = Lease(self.instance, settings.lease_seconds)
        self._epochs: dict[str, int] = {}
        """Batch id -> the epoch this process runs or recovers it under (its own batches in flight)."""
        self._lost: set[str] = set()
        """Batches fenced off here: every later write or fence of them is refused without asking."""
        self._closed = False
        """Closed: its lease is released, so it owns nothing any more (no call may go out)."""
        self._running: set[str] = set()
        """Batches a coordinator of this process runs (until `ended`): never claimed by this process."""
        self._crash_point = CrashPoint.from_environment()
        self.observe_write: Callable[[str, int, float], None] | None = None
        self.takeover_every: float | None = settings.lease_seconds / 3

    # -- opening and closing ----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=1, max_size=self._pool_size, timeout=self._timeout,
                command_timeout=self._timeout, reset=_no_reset,
                server_settings={
                    "search_path": f'"{self._schema}"', "application_name": "batch-gateway",
                    # a process paused inside a journal transaction must not hold its row locks
                    # (and so block takeover) past its lease: the server ends such a session
                    "idle_in_transaction_session_timeout": str(max(1, int(self.lease.margin * 1000))),
                },
            )
            async with self._connection() as conn:
                await migrate(conn, self._schema)
                self._owner_key = await self._load_owner_key(conn)
                await self.lease.register(conn)
        except _OPEN_ERRORS as exc:
            await self._close_pool()
            raise JournalUnavailable(f"cannot open the journal {shown_url(self._url)}: {exc}") from None
        self._renewer = asyncio.create_task(renew_periodically(self.lease, self._pool, DB_ERRORS))

    async def _load_owner_key(self, conn: Any) -> bytes:
        """Derived from the journal key when one is set, else a random key kept in `meta` (shared)."""
        if self._key is not None:
            return owner_key_from(self._key)
        await conn.execute(
            "INSERT INTO meta (name, value) VALUES ('owner_key', $1) ON CONFLICT (name) DO NOTHING",
            token_hex(32),
        )
        return bytes.fromhex(await conn.fetchval("SELECT value FROM meta WHERE name = 'owner_key'"))

    async def close(self) -> None:
        """Stop renewing and end the lease, so what is left unfinished is taken over at once."""
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._pool is not None and self.lease.epoch:
            with contextlib.suppress(*DB_ERRORS):
                async with self._connection() as conn:
                    await self.lease.release(conn)
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except _CLOSE_ERRORS:
                pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise JournalUnavailable("the journal is not open")
        async with self._pool.acquire(timeout=self._timeout) as conn:
            yield conn

    # -- fenced writes ----------------------------------------------------------------------------

    async def _fenced(
        self, batch_id: str, operation: str, size: int, sql: str, *params: Any, creating: bool = False
    ) -> int:
        """One write: `sql` (after _FENCED, its own parameters from $5) runs only if this process's
        lease has its margin left and the batch is its own (or new, with `creating`); else BatchLost.
        Returns the epoch it was written under."""
        if self._crash_point is not None:
            self._crash_point.writing(batch_id)
        started = time.perf_counter()
        for attempt in (1, 2):
            epoch = self._epochs.get(batch_id, self.lease.epoch)
            refusal = await self._try_fenced(batch_id, epoch, sql, params, creating)
            if refusal is None:
                break
            if refusal == _LAPSED and creating and attempt == 1 and batch_id not in self._epochs:
                await self._keep_lease()  # a lapsed lease: new batches go on under a new epoch
                continue
            raise self._lose(batch_id, refusal)
        if self._crash_point is not None:
            self._crash_point.written(batch_id)
        if self.observe_write is not None:
            self.observe_write(operation, size, time.perf_counter() - started)
        return epoch

    def _lose(self, batch_id: str, reason: str) -> BatchLost:
        self._epochs.pop(batch_id, None)
        if len(self._lost) > 10_000:
            self._lost.clear()
        self._lost.add(batch_id)
        return BatchLost(
            f"batch {batch_id} is no longer this instance's ({reason}); the instance that took it "
            "over finishes it: look it up by its id"
        )

    async def _try_fenced(
        self, batch_id: str, epoch: int, sql: str, params: tuple[Any, ...], creating: bool
    ) -> str | None:
        """None when written, else why the fence refused it."""
        if self._closed:
            return "this instance closed its journal and released its lease"
        if batch_id in self._lost:
            return "it was fenced off before"
        sent = time.monotonic()
        try:
            async with self._connection() as conn:
                left = await conn.fetchval(
                    f"{_FENCED} {sql}", epoch, batch_id, self.lease.margin, creating, *params
                )
        except asyncpg.PostgresError as exc:
            refusal = _REFUSALS.get(getattr(exc, "sqlstate", "") or "")
            if refusal is None:
                raise JournalUnavailable(f"the journal could not be written: {exc}") from None
            if refusal == _LAPSED and epoch == self.lease.epoch:
                self.lease.valid_until = 0.0  # known lapsed: fence() asks the server
            return refusal
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"the journal could not be written: {exc}") from None
        if epoch == self.lease.epoch:
            self.lease.seen(sent, left)
        if creating:
            self._running.add(batch_id)
        return None

    async def _keep_lease(self) -> None:
        try:
            async with self._connection() as conn:
                await self.lease.keep(conn)
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"the journal lease could not be renewed: {exc}") from None

    async def fence(self, batch_id: str) -> None:
        """Before an upstream call: free while the lease surely has its margin left, else one read."""
        if self._closed:
            raise self._lose(batch_id, "this instance closed its journal and released its lease")
        if batch_id in self._lost:
            raise self._lose(batch_id, "it was fenced off before")
        epoch = self._epochs.get(batch_id, self.lease.epoch)
        if epoch == self.lease.epoch and self.lease.surely_valid():
            return
        sent = time.monotonic()
        try:
            async with self._connection() as conn:
                remaining, owner = await conn.fetchrow(
                    "SELECT (SELECT EXTRACT(EPOCH FROM lease_until - now())::float8 FROM instances "
                    "WHERE epoch = $1), (SELECT ARRAY[epoch] FROM batches WHERE batch_id = $2)",
                    epoch, batch_id,
                )
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"the journal could not be read: {exc}") from None
        if epoch == self.lease.epoch:
            self.lease.seen(sent, remaining)
        if remaining is None or remaining <= self.lease.margin:
            raise self._lose(batch_id, "its lease lapsed")
        if owner is None or owner[0] != epoch:
            raise self._lose(batch_id, "another instance owns it" if owner else "it is not in the journal")

    def _seal(self, batch_id: str, headers: Sequence[Sequence[str]] | None) -> tuple[Any, dict[str, str]]:
        if headers is None:
            return None, {}
        return self.sealer.seal(batch_id, headers)

    @staticmethod
    async def _add_secrets(conn: Any, batch_id: str, secrets: dict[str, str]) -> None:
        if secrets:
            await conn.executemany(
                "INSERT INTO secrets (batch_id, ref, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                [(batch_id, ref, value) for ref, value in secrets.items()],
            )

    # -- the writes of the protocol ---------------------------------------------------------------

    async def batch_state(
        self, batch_id: str, state: BatchState, detail: str | None = None,
        headers: Sequence[Sequence[str]] | None = None, owner: str | None = None,
        request_id: str | None = None,
    ) -> None:
        stored, secrets = self._seal(batch_id, headers)
        dumped = None if stored is None else json.dumps(stored)
        creating = state is BatchState.PLANNED
        size = len(dumped or "") + len(detail or "") + sum(len(v) for v in secrets.values())
        try:
            epoch = await self._fenced(
                batch_id, "insert_batches", size,
                f"{_SECRETS_CTE}, erased AS (DELETE FROM secrets WHERE batch_id = $2 AND $13 "
                "AND EXISTS (SELECT 1 FROM f)) "
                "INSERT INTO batches (batch_id, state, detail, created, updated, headers, instance, owner, "
                f"request_id, epoch) SELECT $2, $7, $8, {_NOW}, {_NOW}, $9, $10, $11, $12, $1 FROM f "
                "ON CONFLICT (batch_id) DO UPDATE SET state = excluded.state, "
                "detail = COALESCE(excluded.detail, batches.detail), updated = excluded.updated, "
                "headers = COALESCE(excluded.headers, batches.headers) "
                "RETURNING (SELECT lease_left FROM f)",
                *_secret_params(secrets), state.value, detail, dumped, self.instance, owner, request_id,
                state in SETTLED_STATES, creating=creating,
            )
            if not state.final:
                self._epochs[batch_id] = epoch  # the epoch it runs under, even if the lease moves on
        finally:
            if state.final:
                self._epochs.pop(batch_id, None)

    async def tx_state(
        self, batch_id: str, upstream: str, state: str, token: str | None = None,
        headers: list[list[str]] | None = None,
    ) -> None:
        stored, secrets = self._seal(batch_id, headers)
        dumped = None if stored is None else json.dumps(stored)
        await self._fenced(
            batch_id, "insert_transactions", len(dumped or "") + len(token or ""),
            f"{_SECRETS_CTE} INSERT INTO transactions (batch_id, upstream, state, token, headers, updated) "
            f"SELECT $2, $7, $8, $9, $10, {_NOW} FROM f "
            "ON CONFLICT (batch_id, upstream) DO UPDATE SET "
            "state = excluded.state, token = COALESCE(excluded.token, transactions.token), "
            "headers = COALESCE(excluded.headers, transactions.headers), updated = excluded.updated "
            "RETURNING (SELECT lease_left FROM f)",
            *_secret_params(secrets), upstream, state, token, dumped,
        )

    async def step_intent(self, batch_id: str, position: int, intent: dict[str, Any]) -> None:
        stored, secrets = self._seal(batch_id, intent.get("headers", []))
        text = json.dumps({**intent, "headers": stored})
        await self._fenced(
            batch_id, "insert_steps", len(text),
            f"{_SECRETS_CTE} INSERT INTO steps (batch_id, position, state, intent, updated) "
            f"SELECT $2, $7, 'intent', $8, {_NOW} FROM f ON CONFLICT (batch_id, position) DO UPDATE SET "
            "state = 'intent', intent = excluded.intent, outcome = NULL, seq = NULL, "
            "undo_state = NULL, undo_detail = NULL, updated = excluded.updated "
            "RETURNING (SELECT lease_left FROM f)",
            *_secret_params(secrets), position, text,
        )

    async def step_outcome(
        self, batch_id: str, position: int, state: str, outcome: dict[str, Any] | None, seq: int
    ) -> None:
        text = None if outcome is None else json.dumps(outcome)
        await self._fenced(
            batch_id, "update_steps", len(text or ""),
            f"UPDATE steps SET state = $6, outcome = $7, seq = $8, updated = {_NOW} FROM f "
            "WHERE batch_id = $2 AND position = $5 RETURNING f.lease_left",
            position, state, text, seq,
        )

    async def step_undo(self, batch_id: str, position: int, undo_state: str, detail: str | None) -> None:
        await self._fenced(
            batch_id, "update_steps", len(detail or ""),
            f"UPDATE steps SET undo_state = $6, undo_detail = $7, updated = {_NOW} FROM f "
            "WHERE batch_id = $2 AND position = $5 RETURNING f.lease_left",
            position, undo_state, detail,
        )

    async def resolve(self, batch_id: str, note: str) -> None:
        """An operator's word: not fenced; the batch is parked (no owner), its secrets erased."""
        try:
            async with self._connection() as conn, conn.transaction():
                changed = await conn.execute(
                    f"UPDATE batches SET state = $2, resolution = $3, updated = {_NOW}, epoch = NULL "
                    "WHERE batch_id = $1", batch_id, BatchState.RESOLVED.value, note,
                )
                if changed != "UPDATE 0":
                    await conn.execute("DELETE FROM secrets WHERE batch_id = $1", batch_id)
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"the journal could not be written: {exc}") from None
        self._epochs.pop(batch_id, None)

    # -- ownership --------------------------------------------------------------------------------

    def ended(self, batch_id: str) -> None:
        """The coordinator's run of the batch is over: if it was lost, this process may now take
        it over like any other (it never does while its own run could still write)."""
        self._running.discard(batch_id)
        self._lost.discard(batch_id)
        self._epochs.pop(batch_id, None)

    async def claim_unfinished(self, instance: str | None = None, *, parked: bool = True) -> list[str]:
        """Take over unfinished batches of expired leases (`instance`: a worker known dead, whose
        lease is ended first), and parked ones with `parked`; oldest first."""
        try:
            async with self._connection() as conn:
                if instance is not None:
                    await expire_instance(conn, instance, self.lease.epoch)
                rows = await conn.fetch(
                    _CLAIM, self.lease.epoch, _FINALS, parked, self.instance,
                    [*self._epochs, *self._running], self.lease.margin,
                )
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"the journal could not be read: {exc}") from None
        claimed = [row[0] for row in sorted(rows, key=lambda row: row[1])]
        for batch_id in claimed:
            self._epochs[batch_id] = self.lease.epoch
            self._lost.discard(batch_id)
        if claimed:
            log.warning("batches_taken_over", instance=self.instance, epoch=self.lease.epoch,
                        batches=claimed)
        return claimed

    async def claim(self, batch_id: str) -> str | None:
        try:
            async with self._connection() as conn:
                claimed = await conn.fetchval(
                    _CLAIM_ONE, self.lease.epoch, batch_id, self.instance, _FINALS
                )
                holder = None if claimed else await conn.fetchval(
                    "SELECT instance FROM batches WHERE batch_id = $1", batch_id
                )
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"the journal could not be written: {exc}") from None
        if claimed:
            self._epochs[batch_id] = self.lease.epoch
            self._lost.discard(batch_id)
            return None
        if holder is None:
            return "no such batch in the journal"
        return f"it is running on the live instance {holder!r}; retry once it ended or its lease expired"

    async def release(self, batch_id: str) -> None:
        epoch = self._epochs.pop(batch_id, self.lease.epoch)
        try:
            async with self._connection() as conn:
                await conn.execute(
                    "UPDATE batches SET epoch = NULL WHERE batch_id = $1 AND epoch = $2", batch_id, epoch
                )
        except DB_ERRORS as exc:
            log.error("journal_release_failed", batch_id=batch_id, detail=str(exc)[:300])

    # -- reads ------------------------------------------------------------------------------------

    async def _read(self, sql: str, *params: Any) -> list[Any]:
        try:
            async with self._connection() as conn:
                return list(await conn.fetch(sql, *params))
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"the journal could not be read: {exc}") from None

    async def ping(self) -> None:
        await self._read("SELECT 1 FROM batches LIMIT 1")

    def owner_of(self, credentials: Sequence[str]) -> str | None:
        return owner_digest(self._owner_key, credentials)

    async def batch_id_for(self, request_id: str, owner: str | None) -> str | None:
        if owner is None:
            return None
        rows = await self._read(
            "SELECT batch_id, owner FROM batches WHERE request_id = $1 ORDER BY created DESC LIMIT 20",
            request_id,
        )
        return next((row[0] for row in rows if same_owner(row[1], owner)), None)

    async def lookup(self, batch_id: str, owner: str | None) -> BatchStatus | None:
        rows = await self._read("SELECT state, detail, owner FROM batches WHERE batch_id = $1", batch_id)
        if not same_owner(rows[0][2] if rows else None, owner):  # also when unknown: no row
            return None
        steps = await self._read(
            "SELECT position, (intent::jsonb)->>'where', (intent::jsonb)->>'method', "
            "(intent::jsonb)->>'path', (intent::jsonb)->>'upstream', state, "
            "((outcome::jsonb)->>'status')::int, undo_state, undo_detail "
            "FROM steps WHERE batch_id = $1 ORDER BY position", batch_id,
        )
        transactions = await self._read(
            "SELECT upstream, state FROM transactions WHERE batch_id = $1 ORDER BY upstream", batch_id
        )
        return BatchStatus(
            batch_id=batch_id, state=BatchState(rows[0][0]), detail=rows[0][1],
            steps=tuple(StepStatus(*row) for row in steps),
            transactions=tuple((row[0], row[1]) for row in transactions),
        )

    async def unfinished_ids(self, instance: str | None = None) -> list[str]:
        rows = await self._read(
            "SELECT batch_id FROM batches WHERE state <> ALL($1::text[]) "
            "AND ($2::text IS NULL OR instance = $2) ORDER BY created", _FINALS, instance,
        )
        return [row[0] for row in rows]

    async def unfinished(self) -> list[JournaledBatch]:
        batches = [await self.batch(batch_id) for batch_id in await self.unfinished_ids()]
        return [batch for batch in batches if batch is not None]

    async def summaries(self, *, everything: bool = False, limit: int = 1000) -> list[BatchSummary]:
        """Batches needing an operator: rollback_incomplete, or unfinished with no live owner
        (a live replica's batch in flight is not listed); all with `everything`."""
        rows = await self._read(
            "SELECT b.batch_id, b.state, b.detail, b.created, b.updated, b.resolution FROM batches b "
            "WHERE $1 OR b.state = ANY($2::text[]) OR (b.state <> ALL($3::text[]) AND NOT EXISTS ("
            "SELECT 1 FROM instances i WHERE i.epoch = b.epoch AND i.lease_until >= now())) "
            "ORDER BY b.created DESC LIMIT $4",
            everything, [s.value for s in OPERATOR_STATES], _FINALS, limit,
        )
        return [BatchSummary(*row) for row in rows]

    async def batch(self, batch_id: str, *, reveal: bool = True) -> JournaledBatch | None:
        rows = await self._read(
            "SELECT state, headers, detail, created, updated, resolution FROM batches WHERE batch_id = $1",
            batch_id,
        )
        if not rows:
            return None
        state, headers, detail, created, updated, resolution = rows[0]
        secrets = {row[0]: row[1] for row in await self._read(
            "SELECT ref, value FROM secrets WHERE batch_id = $1", batch_id
        )}
        transactions = await self._read(
            "SELECT upstream, state, token, headers FROM transactions WHERE batch_id = $1 ORDER BY upstream",
            batch_id,
        )
        steps = await self._read(
            "SELECT position, state, intent, outcome, seq, undo_state, undo_detail FROM steps "
            "WHERE batch_id = $1 ORDER BY position", batch_id,
        )
        return JournaledBatch(
            batch_id=batch_id, state=BatchState(state),
            transactions=tuple(self._transaction(row, secrets, reveal) for row in transactions),
            steps=tuple(self._step(row, secrets, reveal) for row in steps),
            headers=tuple(self._unseal(headers, secrets, reveal)),
            detail=detail, created=created, updated=updated, resolution=resolution,
        )

    def _unseal(self, stored: str | None, secrets: dict[str, str], reveal: bool) -> list[tuple[str, str]]:
        raw: StoredHeaders = [] if stored is None else json.loads(stored)
        return self.sealer.unseal(raw, secrets, strict=reveal)

    def _transaction(self, row: Any, secrets: dict[str, str], reveal: bool) -> JournaledTransaction:
        headers = None if row[3] is None else [list(h) for h in self._unseal(row[3], secrets, reveal)]
        return JournaledTransaction(row[0], row[1], row[2], headers)

    def _step(self, row: Any, secrets: dict[str, str], reveal: bool) -> JournaledStep:
        intent = json.loads(row[2])
        stored: StoredHeaders = intent.get("headers", [])
        intent["headers"] = [list(h) for h in self.sealer.unseal(stored, secrets, strict=reveal)]
        return JournaledStep(
            position=row[0], state=row[1], intent=intent,
            outcome=None if row[3] is None else json.loads(row[3]),
            seq=row[4], undo_state=row[5], undo_detail=row[6],
        )

    # -- retention --------------------------------------------------------------------------------

    async def prune(self, older_than_seconds: float) -> int:
        """Delete settled batches past the retention, and long-expired instance rows that own none;
        one instance at a time (an advisory lock: the others skip this round and return 0)."""
        try:
            async with self._connection() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)",
                                           lock_key(self._schema, "prune")):
                    return 0
                ids = [row[0] for row in await conn.fetch(
                    f"SELECT batch_id FROM batches WHERE state = ANY($1::text[]) AND updated < {_NOW} - $2",
                    [state.value for state in PRUNABLE_STATES], older_than_seconds,
                )]
                for table in ("steps", "transactions", "secrets", "batches"):
                    await conn.execute(f"DELETE FROM {table} WHERE batch_id = ANY($1::text[])", ids)
                await conn.execute(
                    "DELETE FROM instances i WHERE lease_until < now() - make_interval(secs => $1) "
                    "AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.epoch = i.epoch)",
                    max(older_than_seconds, 0.0),
                )
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"the journal could not be pruned: {exc}") from None
        return len(ids)
