"""The durable journal of atomic batches: intents before upstream changes, outcomes after.

`Journal` is the interface; `SqliteJournal` the default, `PostgresJournal` (pg_journal.py) the shared one.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_hex
from typing import Any, Protocol

import aiosqlite
import structlog

from gateway.atomicity.secrets import HeaderSealer, StoredHeaders, load_key
from gateway.atomicity.state import FINAL_STATES, PRUNABLE_STATES, BatchState
from gateway.config import DEFAULT_SENSITIVE_HEADERS, GatewayConfig
from gateway.errors import ConfigError, JournalUnavailable

log = structlog.get_logger("gateway.journal")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, state TEXT NOT NULL, detail TEXT,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS transactions (
    batch_id TEXT NOT NULL, upstream TEXT NOT NULL, state TEXT NOT NULL, token TEXT,
    headers TEXT, updated REAL NOT NULL, PRIMARY KEY (batch_id, upstream));
CREATE TABLE IF NOT EXISTS steps (
    batch_id TEXT NOT NULL, position INTEGER NOT NULL, state TEXT NOT NULL,
    intent TEXT NOT NULL, outcome TEXT, seq INTEGER, undo_state TEXT, undo_detail TEXT,
    updated REAL NOT NULL, PRIMARY KEY (batch_id, position));
CREATE TABLE IF NOT EXISTS secrets (
    batch_id TEXT NOT NULL, ref TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (batch_id, ref));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_ADDED_COLUMNS = {"batches": (("headers", "TEXT"), ("resolution", "TEXT"), ("instance", "TEXT"),
                              ("owner", "TEXT"), ("request_id", "TEXT"))}
"""Columns added after the first release: created on open when an older journal lacks them."""

INSTANCE_VARIABLE = "GATEWAY_INSTANCE"
"""Set by the supervisor for each worker: the journal tags that worker's batches with it, so the
batches of a worker that died can be recovered while the other workers keep running theirs."""

_OWNER_KEY = "owner_key"
"""The `meta` row holding the journal's random HMAC key for batch owners (when no journal key is set)."""

OPERATOR_STATES = (BatchState.ROLLBACK_INCOMPLETE,)
"""Final states that still need an operator (unless resolved)."""
SETTLED_STATES = PRUNABLE_STATES
"""A batch's secrets are erased once it reaches one of these (committed, rolled back, resolved); a
rollback_incomplete batch keeps them until it is retried or resolved, so a retry can authenticate."""


@dataclass(frozen=True, slots=True)
class JournaledTransaction:
    upstream: str
    state: str
    token: str | None
    headers: list[list[str]] | None


@dataclass(frozen=True, slots=True)
class JournaledStep:
    position: int
    state: str
    intent: dict[str, Any]
    outcome: dict[str, Any] | None
    seq: int | None
    undo_state: str | None
    undo_detail: str | None = None


@dataclass(frozen=True, slots=True)
class JournaledBatch:
    batch_id: str
    state: BatchState
    transactions: tuple[JournaledTransaction, ...] = ()
    steps: tuple[JournaledStep, ...] = field(default_factory=tuple)
    headers: tuple[tuple[str, str], ...] = ()
    """What every call of the batch inherited (sensitive values only while the batch is open)."""
    detail: str | None = None
    created: float = 0.0
    updated: float = 0.0
    resolution: str | None = None


@dataclass(frozen=True, slots=True)
class StepStatus:
    """What a batch lookup may show of one journaled call: no URL, query, headers or bodies."""

    position: int
    where: str | None
    method: str | None
    path: str | None
    """Relative to the upstream's base URL, without the query."""
    upstream: str | None
    state: str
    status: int | None
    """The HTTP status of the journaled outcome, if any."""
    undo_state: str | None
    undo_detail: str | None


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """A batch as its owner may look it up (`Journal.lookup`): states and details, nothing secret."""

    batch_id: str
    state: BatchState
    detail: str | None
    steps: tuple[StepStatus, ...]
    transactions: tuple[tuple[str, str], ...]
    """(upstream, state) of each transactional upstream, without tokens or headers."""


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """One line of `gateway batches list`."""

    batch_id: str
    state: str
    detail: str | None
    created: float
    updated: float
    resolution: str | None


class Journal(Protocol):
    """What the coordinator and recovery need from a durable store; every write is durable on return.

    A write that cannot be made raises JournalUnavailable.
    """

    observe_write: Callable[[str, int, float], None] | None
    """Called with (operation, bytes, seconds) after each durable write (metrics)."""
    sealer: HeaderSealer
    """Which headers are secrets, and how they are sealed (operators' views redact them)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def batch_state(
        self, batch_id: str, state: BatchState, detail: str | None = None,
        headers: Sequence[Sequence[str]] | None = None, owner: str | None = None,
        request_id: str | None = None,
    ) -> None: ...
    def owner_of(self, credentials: Sequence[str]) -> str | None: ...
    async def lookup(self, batch_id: str, owner: str | None) -> BatchStatus | None: ...
    async def batch_id_for(self, request_id: str, owner: str | None) -> str | None: ...
    async def tx_state(
        self,
        batch_id: str,
        upstream: str,
        state: str,
        token: str | None = None,
        headers: list[list[str]] | None = None,
    ) -> None: ...
    async def step_intent(self, batch_id: str, position: int, intent: dict[str, Any]) -> None: ...
    async def step_outcome(
        self, batch_id: str, position: int, state: str, outcome: dict[str, Any] | None, seq: int
    ) -> None: ...
    async def step_undo(self, batch_id: str, position: int, undo_state: str, detail: str | None) -> None: ...
    async def unfinished_ids(self, instance: str | None = None) -> list[str]: ...
    async def unfinished(self) -> list[JournaledBatch]: ...
    async def batch(self, batch_id: str, *, reveal: bool = True) -> JournaledBatch | None: ...
    async def summaries(self, *, everything: bool = False, limit: int = 1000) -> list[BatchSummary]: ...
    async def resolve(self, batch_id: str, note: str) -> None: ...
    async def prune(self, older_than_seconds: float) -> int: ...
    async def ping(self) -> None: ...

    # ownership: trivial for a journal of one process (SQLite); leases and fencing for a shared one
    takeover_every: float | None
    """Seconds between looks for batches whose owner's lease expired; None: never (not shared)."""

    async def fence(self, batch_id: str) -> None:
        """Raise BatchLost unless this process still owns the batch (before each upstream call)."""
        ...

    async def claim_unfinished(self, instance: str | None = None, *, parked: bool = True) -> list[str]:
        """Unfinished batches this process may recover now, made its own: every one (or those of one
        dead worker `instance`) in a journal of one process; in a shared one, those whose owner's
        lease expired (a dead worker's at once), and with `parked` those a recovery left parked."""
        ...

    async def claim(self, batch_id: str) -> str | None:
        """Make one batch this process's own for an operator's retry; None, or why it cannot be."""
        ...

    async def release(self, batch_id: str) -> None:
        """Park a batch recovery keeps unfinished (an operator must act): no periodic takeover."""
        ...

    def ended(self, batch_id: str) -> None:
        """The coordinator's run of this batch is over, whatever became of it."""
        ...


class CrashPoint:
    """Test-only: SIGKILL this process around the Nth durable journal write of a batch.

    `GATEWAY_TEST_CRASH_AFTER_WRITE=N` kills right after the Nth write of a batch is durable (the
    writes of a graph batch's groups, `<batch id>.<n>`, are counted together);
    `GATEWAY_TEST_CRASH_BEFORE_WRITE=N` right before it (so what happened since the previous write,
    e.g. an upstream call, is not journaled). The crash-point tests iterate N. Without either
    variable the journal never builds one, so it costs nothing.
    """

    AFTER = "GATEWAY_TEST_CRASH_AFTER_WRITE"
    BEFORE = "GATEWAY_TEST_CRASH_BEFORE_WRITE"

    def __init__(self, after: int | None, before: int | None) -> None:
        self._after, self._before = after, before
        self._counts: dict[str, int] = {}

    @classmethod
    def from_environment(cls) -> CrashPoint | None:
        after, before = (_positive(os.environ.get(name, "")) for name in (cls.AFTER, cls.BEFORE))
        return None if after is None and before is None else cls(after, before)

    def writing(self, batch_id: str) -> None:
        if self._before is not None and self._counts.get(_request_of(batch_id), 0) + 1 == self._before:
            self._kill(batch_id, "before", self._before)

    def written(self, batch_id: str) -> None:
        request = _request_of(batch_id)
        count = self._counts[request] = self._counts.get(request, 0) + 1
        if count == self._after:
            self._kill(batch_id, "after", count)

    @staticmethod
    def _kill(batch_id: str, when: str, write: int) -> None:
        log.warning("test_crash_point", batch_id=batch_id, when=when, write=write)
        os.kill(os.getpid(), signal.SIGKILL)


def _request_of(batch_id: str) -> str:
    """The batch id of the request: a graph batch's groups (`<batch id>.<n>`) count as one, so the
    crash points reach into every group of a request, in the order they run."""
    stem, dot, ordinal = batch_id.rpartition(".")
    return stem if dot and ordinal.isdigit() else batch_id


def owner_digest(key: bytes | None, credentials: Sequence[str]) -> str | None:
    """HMAC-SHA256 (hex) of `Authorization` value(s) under a journal's owner key; None without any."""
    if key is None:
        raise JournalUnavailable("the journal is not open")
    values = [value.strip() for value in credentials]
    if not any(values):
        return None
    message = "\n".join(values).encode("utf-8", "surrogatepass")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def same_owner(recorded: str | None, owner: str | None) -> bool:
    """Whether a batch recorded with owner digest `recorded` is `owner`'s: compared in constant time
    even when either is missing (an unknown id must take as long), never true without both."""
    same = hmac.compare_digest(str(recorded or "-"), owner or "")
    return same and recorded is not None and owner is not None


def owner_key_from(key: bytes) -> bytes:
    """The owner HMAC key derived from a configured journal encryption key."""
    return hmac.new(key, b"gateway batch owner", hashlib.sha256).digest()


def _positive(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) > 0 else None


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


class SqliteJournal:
    """SQLite in WAL mode with synchronous=FULL: each write is fsynced before the call it guards.

    Sensitive headers are stored once per batch in `secrets` and deleted (with secure_delete on
    and the WAL truncated) as soon as the batch is final.
    """

    def __init__(
        self, path: str | Path, sealer: HeaderSealer | None = None, *, key: bytes | None = None
    ) -> None:
        self._path = str(path)
        self._key = key
        """The journal encryption key, if configured: batch owners are keyed with it."""
        self._owner_key: bytes | None = None
        self._db: aiosqlite.Connection | None = None
        self.sealer = sealer or HeaderSealer(DEFAULT_SENSITIVE_HEADERS)
        self._crash_point = CrashPoint.from_environment()
        self.instance = os.environ.get(INSTANCE_VARIABLE) or None
        self.observe_write: Callable[[str, int, float], None] | None = None
        """Called with (operation, bytes, seconds) after each durable write (metrics)."""
        self.takeover_every: float | None = None
        """One process (or the workers of one supervisor) per file: nothing to take over."""

    async def fence(self, batch_id: str) -> None:
        """One process owns the file: a batch is never taken over while it runs."""

    async def claim_unfinished(self, instance: str | None = None, *, parked: bool = True) -> list[str]:
        return await self.unfinished_ids(instance)

    async def claim(self, batch_id: str) -> str | None:
        return None

    async def release(self, batch_id: str) -> None:
        """Nothing to park: recovery at the next start-up tries it again."""

    def ended(self, batch_id: str) -> None:
        """Nothing to track."""

    async def open(self) -> None:
        try:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self._path)
            if self._path != ":memory:":
                os.chmod(self._path, 0o600)  # sensitive headers of open batches live here
            await self._db.execute("PRAGMA busy_timeout=5000")  # worker processes share the file
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=FULL")
            await self._db.execute("PRAGMA secure_delete=ON")  # erased secrets are overwritten
            await self._db.executescript(_SCHEMA)
            await self._add_columns()
            await self._db.commit()
            self._owner_key = await self._load_owner_key()
        except (sqlite3.Error, OSError) as exc:
            raise JournalUnavailable(f"cannot open the journal {self._path!r}: {exc}") from None

    async def _load_owner_key(self) -> bytes:
        """The HMAC key of batch owners: derived from the journal key when one is configured, else
        a random secret created once per journal file and kept in `meta` (workers share it)."""
        if self._key is not None:
            return owner_key_from(self._key)
        select = "SELECT value FROM meta WHERE name=?"
        rows = list(await (await self._conn.execute(select, (_OWNER_KEY,))).fetchall())
        if not rows:  # INSERT OR IGNORE: a worker opening the file at the same time may win
            await self._conn.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES (?,?)", (_OWNER_KEY, token_hex(32))
            )
            await self._conn.commit()
            rows = list(await (await self._conn.execute(select, (_OWNER_KEY,))).fetchall())
        return bytes.fromhex(rows[0][0])

    async def _add_columns(self) -> None:
        for table, columns in _ADDED_COLUMNS.items():
            cursor = await self._conn.execute(f"PRAGMA table_info({table})")
            present = {row[1] for row in await cursor.fetchall()}
            for name, kind in columns:
                if name not in present:
                    await self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise JournalUnavailable("the journal is not open")
        return self._db

    async def _write(
        self, sql: str, params: tuple[Any, ...], batch_id: str,
        secrets: dict[str, str] | None = None,
    ) -> int:
        """One durable write (plus the secrets it refers to); returns the rows changed."""
        if self._crash_point is not None:
            self._crash_point.writing(batch_id)
        started = time.perf_counter()
        try:
            if secrets:
                await self._conn.executemany(
                    "INSERT OR IGNORE INTO secrets (batch_id, ref, value) VALUES (?,?,?)",
                    [(batch_id, ref, value) for ref, value in secrets.items()],
                )
            cursor = await self._conn.execute(sql, params)
            await self._conn.commit()
        except (sqlite3.Error, OSError) as exc:
            await self._rollback_quietly()
            raise JournalUnavailable(f"the journal could not be written: {exc}") from None
        if self._crash_point is not None:
            self._crash_point.written(batch_id)
        if self.observe_write is not None:
            size = sum(len(v) for v in (*params, *(secrets or {}).values()) if isinstance(v, str | bytes))
            self.observe_write(_operation(sql), size, time.perf_counter() - started)
        return cursor.rowcount

    async def _rollback_quietly(self) -> None:
        with contextlib.suppress(sqlite3.Error, OSError, JournalUnavailable):
            await self._conn.rollback()

    def _seal(self, batch_id: str, headers: Sequence[Sequence[str]] | None) -> tuple[Any, dict[str, str]]:
        if headers is None:
            return None, {}
        return self.sealer.seal(batch_id, headers)

    async def batch_state(
        self, batch_id: str, state: BatchState, detail: str | None = None,
        headers: Sequence[Sequence[str]] | None = None, owner: str | None = None,
        request_id: str | None = None,
    ) -> None:
        """`owner` (from `owner_of`) and the client's `request_id` are kept from the batch's first
        write; later ones cannot change them."""
        now = time.time()
        stored, secrets = self._seal(batch_id, headers)
        await self._write(
            "INSERT INTO batches (batch_id, state, detail, created, updated, headers, instance, owner, "
            "request_id) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(batch_id) DO UPDATE SET "
            "state=excluded.state, detail=COALESCE(excluded.detail, detail), "
            "updated=excluded.updated, headers=COALESCE(excluded.headers, headers)",
            (batch_id, state.value, detail, now, now, _dump(stored), self.instance, owner, request_id),
            batch_id, secrets,
        )
        if state in SETTLED_STATES:
            await self._erase_secrets(batch_id)

    async def _erase_secrets(self, batch_id: str) -> None:
        """Delete a final batch's secrets and truncate the WAL so no journal file holds them."""
        erased = await self._write("DELETE FROM secrets WHERE batch_id=?", (batch_id,), batch_id)
        if erased:
            try:
                await self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # busy readers: the next final batch truncates it
                log.warning("journal_checkpoint_failed", detail=str(exc))

    async def tx_state(
        self,
        batch_id: str,
        upstream: str,
        state: str,
        token: str | None = None,
        headers: list[list[str]] | None = None,
    ) -> None:
        stored, secrets = self._seal(batch_id, headers)
        await self._write(
            "INSERT INTO transactions (batch_id, upstream, state, token, headers, updated) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT(batch_id, upstream) DO UPDATE SET "
            "state=excluded.state, token=COALESCE(excluded.token, token), "
            "headers=COALESCE(excluded.headers, headers), updated=excluded.updated",
            (batch_id, upstream, state, token, _dump(stored), time.time()),
            batch_id, secrets,
        )

    async def step_intent(self, batch_id: str, position: int, intent: dict[str, Any]) -> None:
        stored, secrets = self._seal(batch_id, intent.get("headers", []))
        await self._write(
            "INSERT OR REPLACE INTO steps (batch_id, position, state, intent, updated) "
            "VALUES (?,?,'intent',?,?)",
            (batch_id, position, json.dumps({**intent, "headers": stored}), time.time()),
            batch_id, secrets,
        )

    async def step_outcome(
        self, batch_id: str, position: int, state: str, outcome: dict[str, Any] | None, seq: int
    ) -> None:
        await self._write(
            "UPDATE steps SET state=?, outcome=?, seq=?, updated=? WHERE batch_id=? AND position=?",
            (state, None if outcome is None else json.dumps(outcome), seq, time.time(), batch_id, position),
            batch_id,
        )

    async def step_undo(self, batch_id: str, position: int, undo_state: str, detail: str | None) -> None:
        await self._write(
            "UPDATE steps SET undo_state=?, undo_detail=?, updated=? WHERE batch_id=? AND position=?",
            (undo_state, detail, time.time(), batch_id, position),
            batch_id,
        )

    def owner_of(self, credentials: Sequence[str]) -> str | None:
        """HMAC-SHA256 (hex) of the `Authorization` value(s) a batch was sent with, under the
        journal's owner key; None without credentials (such a batch cannot be looked up)."""
        return owner_digest(self._owner_key, credentials)

    async def batch_id_for(self, request_id: str, owner: str | None) -> str | None:
        """The newest batch the same owner sent with this X-Request-ID (a client whose connection
        dropped knows its own request id, not the batch id); None otherwise."""
        if owner is None:
            return None
        rows = await self._read(
            "SELECT batch_id, owner FROM batches WHERE request_id=? ORDER BY created DESC LIMIT 20",
            (request_id,),
        )
        return next((row[0] for row in rows if same_owner(row[1], owner)), None)

    async def lookup(self, batch_id: str, owner: str | None) -> BatchStatus | None:
        """The batch's states if `owner` is the one it was sent with; None when it is unknown,
        pruned, another owner's, or was sent without credentials (never told apart). Reads no
        secret, header or body."""
        rows = await self._read("SELECT state, detail, owner FROM batches WHERE batch_id=?", (batch_id,))
        if not same_owner(rows[0][2] if rows else None, owner):  # also when unknown: no row
            return None
        steps = await self._read(
            "SELECT position, json_extract(intent, '$.where'), json_extract(intent, '$.method'), "
            "json_extract(intent, '$.path'), json_extract(intent, '$.upstream'), state, "
            "json_extract(outcome, '$.status'), undo_state, undo_detail "
            "FROM steps WHERE batch_id=? ORDER BY position",
            (batch_id,),
        )
        transactions = await self._read(
            "SELECT upstream, state FROM transactions WHERE batch_id=? ORDER BY upstream", (batch_id,)
        )
        return BatchStatus(
            batch_id=batch_id,
            state=BatchState(rows[0][0]),
            detail=rows[0][1],
            steps=tuple(StepStatus(*row) for row in steps),
            transactions=tuple((row[0], row[1]) for row in transactions),
        )

    async def resolve(self, batch_id: str, note: str) -> None:
        """An operator marks a batch dealt with: state `resolved`, the note kept, secrets erased."""
        changed = await self._write(
            "UPDATE batches SET state=?, resolution=?, updated=? WHERE batch_id=?",
            (BatchState.RESOLVED.value, note, time.time(), batch_id),
            batch_id,
        )
        if changed:
            await self._erase_secrets(batch_id)

    async def ping(self) -> None:
        """A cheap real read (schema and the batches table) for /readyz; JournalUnavailable if not."""
        await self._read("SELECT 1 FROM batches LIMIT 1", ())

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        try:
            cursor = await self._conn.execute(sql, params)
            return list(await cursor.fetchall())
        except (sqlite3.Error, OSError) as exc:
            raise JournalUnavailable(f"the journal could not be read: {exc}") from None

    async def unfinished_ids(self, instance: str | None = None) -> list[str]:
        """Batches not in a final state; with `instance`, only those that worker journaled."""
        finals = tuple(state.value for state in FINAL_STATES)
        marks = ",".join("?" for _ in finals)
        mine = "" if instance is None else " AND instance = ?"
        params = finals if instance is None else (*finals, instance)
        rows = await self._read(
            f"SELECT batch_id FROM batches WHERE state NOT IN ({marks}){mine} ORDER BY created", params
        )
        return [row[0] for row in rows]

    async def unfinished(self) -> list[JournaledBatch]:
        batches = [await self.batch(batch_id) for batch_id in await self.unfinished_ids()]
        return [batch for batch in batches if batch is not None]

    async def summaries(self, *, everything: bool = False, limit: int = 1000) -> list[BatchSummary]:
        """Batches needing an operator (unfinished or rollback_incomplete), or all with `everything`."""
        rows = await self._read(
            "SELECT batch_id, state, detail, created, updated, resolution FROM batches "
            "ORDER BY created DESC LIMIT ?", (limit if everything else -1,),
        )
        summaries = [BatchSummary(*row) for row in rows]
        if everything:
            return summaries
        wanted = {s.value for s in OPERATOR_STATES}
        finals = {s.value for s in FINAL_STATES}
        return [s for s in summaries if s.state in wanted or s.state not in finals][:limit]

    async def batch(self, batch_id: str, *, reveal: bool = True) -> JournaledBatch | None:
        """The batch with its headers unsealed; raises ValueError/KeyError on a corrupt record.

        `reveal` (for calls): a secret this process cannot decrypt raises SecretUnavailable;
        without it (for operators) such a value reads `<sealed>`.
        """
        rows = await self._read(
            "SELECT state, headers, detail, created, updated, resolution FROM batches WHERE batch_id=?",
            (batch_id,),
        )
        if not rows:
            return None
        state, headers, detail, created, updated, resolution = rows[0]
        secrets = dict(await self._read("SELECT ref, value FROM secrets WHERE batch_id=?", (batch_id,)))
        return JournaledBatch(
            batch_id=batch_id,
            state=BatchState(state),
            transactions=await self._transactions(batch_id, secrets, reveal),
            steps=await self._steps(batch_id, secrets, reveal),
            headers=tuple(self._unseal(headers, secrets, reveal)),
            detail=detail,
            created=created,
            updated=updated,
            resolution=resolution,
        )

    def _unseal(self, stored: str | None, secrets: dict[str, str], reveal: bool) -> list[tuple[str, str]]:
        raw: StoredHeaders = [] if stored is None else json.loads(stored)
        return self.sealer.unseal(raw, secrets, strict=reveal)

    async def _transactions(
        self, batch_id: str, secrets: dict[str, str], reveal: bool
    ) -> tuple[JournaledTransaction, ...]:
        rows = await self._read(
            "SELECT upstream, state, token, headers FROM transactions WHERE batch_id=? ORDER BY upstream",
            (batch_id,),
        )
        return tuple(
            JournaledTransaction(
                row[0], row[1], row[2],
                None if row[3] is None else [list(h) for h in self._unseal(row[3], secrets, reveal)],
            )
            for row in rows
        )

    async def _steps(
        self, batch_id: str, secrets: dict[str, str], reveal: bool
    ) -> tuple[JournaledStep, ...]:
        rows = await self._read(
            "SELECT position, state, intent, outcome, seq, undo_state, undo_detail FROM steps "
            "WHERE batch_id=? ORDER BY position",
            (batch_id,),
        )
        steps = []
        for row in rows:
            intent = json.loads(row[2])
            stored_headers = intent.get("headers", [])
            intent["headers"] = [list(h) for h in self.sealer.unseal(stored_headers, secrets, strict=reveal)]
            steps.append(JournaledStep(
                position=row[0], state=row[1], intent=intent,
                outcome=None if row[3] is None else json.loads(row[3]),
                seq=row[4], undo_state=row[5], undo_detail=row[6],
            ))
        return tuple(steps)

    async def prune(self, older_than_seconds: float) -> int:
        """Delete committed, rolled back and resolved batches older than the retention; returns how many."""
        cutoff = time.time() - older_than_seconds
        finals = tuple(state.value for state in PRUNABLE_STATES)
        marks = ",".join("?" for _ in finals)
        rows = await self._read(
            f"SELECT batch_id FROM batches WHERE state IN ({marks}) AND updated < ?", (*finals, cutoff)
        )
        ids = [(row[0],) for row in rows]
        try:
            for table in ("steps", "transactions", "secrets", "batches"):
                await self._conn.executemany(f"DELETE FROM {table} WHERE batch_id=?", ids)
            await self._conn.commit()
        except (sqlite3.Error, OSError) as exc:
            await self._rollback_quietly()
            raise JournalUnavailable(f"the journal could not be pruned: {exc}") from None
        return len(ids)


_TABLE = re.compile(r"\b(?:INTO|UPDATE|FROM)\s+(\w+)")


def _operation(sql: str) -> str:
    """`insert_steps`, `update_batches`, ...: the metrics label of a write."""
    table = _TABLE.search(sql)
    return f"{sql.split(None, 1)[0].lower()}_{table.group(1) if table else 'other'}"


def open_journal(config: GatewayConfig, config_file: str = "<config>") -> Journal:
    """The configured journal (not yet opened), with its sensitive headers and encryption key:
    PostgreSQL when `journal.url` is set, else the SQLite file.

    Raises ConfigError when a configured key cannot be read, or the PostgreSQL driver is missing.
    """
    key = load_key(config.journal.key_env, config.journal.key_file, config_file)
    sealer = HeaderSealer(config.journal.sensitive, key)
    if config.journal.url is None:
        return SqliteJournal(config.journal.path, sealer, key=key)
    problem = postgres_driver_problem()
    if problem is not None:
        raise ConfigError(config_file, "journal.url", problem)
    from gateway.atomicity.pg_journal import PostgresJournal

    return PostgresJournal(config.journal, sealer, key=key)


def postgres_driver_problem() -> str | None:
    """Why a PostgreSQL journal cannot be used in this installation, or None."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return ("a PostgreSQL journal needs the asyncpg driver, which is not installed: "
                "pip install 'batch-gateway[postgres]'")
    return None
