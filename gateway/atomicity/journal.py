"""The durable journal of atomic batches: intents before upstream changes, outcomes after.

`Journal` is the interface (a shared store can serve several replicas); `SqliteJournal` the default.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from gateway.atomicity.state import FINAL_STATES, BatchState

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
"""


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


@dataclass(frozen=True, slots=True)
class JournaledBatch:
    batch_id: str
    state: BatchState
    transactions: tuple[JournaledTransaction, ...] = ()
    steps: tuple[JournaledStep, ...] = field(default_factory=tuple)


class Journal(Protocol):
    """What the coordinator and recovery need from a durable store; every write is durable on return."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def batch_state(self, batch_id: str, state: BatchState, detail: str | None = None) -> None: ...
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
    async def unfinished(self) -> list[JournaledBatch]: ...
    async def batch(self, batch_id: str) -> JournaledBatch | None: ...
    async def prune(self, older_than_seconds: float) -> int: ...


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


class SqliteJournal:
    """SQLite in WAL mode with synchronous=FULL: each write is fsynced before the call it guards."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path)
        if self._path != ":memory:":
            os.chmod(self._path, 0o600)  # it holds the forwarded headers (credentials) of open batches
        await self._db.execute("PRAGMA busy_timeout=5000")  # worker processes share the file
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._db.executescript(_SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("journal is not open")
        return self._db

    async def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        await self._conn.execute(sql, params)
        await self._conn.commit()

    async def batch_state(self, batch_id: str, state: BatchState, detail: str | None = None) -> None:
        now = time.time()
        await self._write(
            "INSERT INTO batches (batch_id, state, detail, created, updated) VALUES (?,?,?,?,?) "
            "ON CONFLICT(batch_id) DO UPDATE SET state=excluded.state, "
            "detail=COALESCE(excluded.detail, detail), updated=excluded.updated",
            (batch_id, state.value, detail, now, now),
        )

    async def tx_state(
        self,
        batch_id: str,
        upstream: str,
        state: str,
        token: str | None = None,
        headers: list[list[str]] | None = None,
    ) -> None:
        await self._write(
            "INSERT INTO transactions (batch_id, upstream, state, token, headers, updated) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT(batch_id, upstream) DO UPDATE SET "
            "state=excluded.state, token=COALESCE(excluded.token, token), "
            "headers=COALESCE(excluded.headers, headers), updated=excluded.updated",
            (batch_id, upstream, state, token, _dump(headers), time.time()),
        )

    async def step_intent(self, batch_id: str, position: int, intent: dict[str, Any]) -> None:
        await self._write(
            "INSERT OR REPLACE INTO steps (batch_id, position, state, intent, updated) "
            "VALUES (?,?,'intent',?,?)",
            (batch_id, position, json.dumps(intent), time.time()),
        )

    async def step_outcome(
        self, batch_id: str, position: int, state: str, outcome: dict[str, Any] | None, seq: int
    ) -> None:
        await self._write(
            "UPDATE steps SET state=?, outcome=?, seq=?, updated=? WHERE batch_id=? AND position=?",
            (state, None if outcome is None else json.dumps(outcome), seq, time.time(), batch_id, position),
        )

    async def step_undo(self, batch_id: str, position: int, undo_state: str, detail: str | None) -> None:
        await self._write(
            "UPDATE steps SET undo_state=?, undo_detail=?, updated=? WHERE batch_id=? AND position=?",
            (undo_state, detail, time.time(), batch_id, position),
        )

    async def unfinished(self) -> list[JournaledBatch]:
        finals = tuple(state.value for state in FINAL_STATES)
        cursor = await self._conn.execute(
            "SELECT batch_id FROM batches WHERE state NOT IN (?,?,?) ORDER BY created", finals
        )
        ids = [row[0] for row in await cursor.fetchall()]
        batches = [await self.batch(batch_id) for batch_id in ids]
        return [batch for batch in batches if batch is not None]

    async def batch(self, batch_id: str) -> JournaledBatch | None:
        cursor = await self._conn.execute("SELECT state FROM batches WHERE batch_id=?", (batch_id,))
        row = await cursor.fetchone()
        if row is None:
            return None
        return JournaledBatch(
            batch_id=batch_id,
            state=BatchState(row[0]),
            transactions=await self._transactions(batch_id),
            steps=await self._steps(batch_id),
        )

    async def _transactions(self, batch_id: str) -> tuple[JournaledTransaction, ...]:
        cursor = await self._conn.execute(
            "SELECT upstream, state, token, headers FROM transactions WHERE batch_id=? "
            "ORDER BY upstream",
            (batch_id,),
        )
        return tuple(
            JournaledTransaction(row[0], row[1], row[2], None if row[3] is None else json.loads(row[3]))
            for row in await cursor.fetchall()
        )

    async def _steps(self, batch_id: str) -> tuple[JournaledStep, ...]:
        cursor = await self._conn.execute(
            "SELECT position, state, intent, outcome, seq, undo_state FROM steps "
            "WHERE batch_id=? ORDER BY position",
            (batch_id,),
        )
        return tuple(
            JournaledStep(
                position=row[0],
                state=row[1],
                intent=json.loads(row[2]),
                outcome=None if row[3] is None else json.loads(row[3]),
                seq=row[4],
                undo_state=row[5],
            )
            for row in await cursor.fetchall()
        )

    async def prune(self, older_than_seconds: float) -> int:
        """Delete finished batches last updated longer ago than the retention; returns how many."""
        cutoff = time.time() - older_than_seconds
        finals = tuple(state.value for state in FINAL_STATES)
        cursor = await self._conn.execute(
            "SELECT batch_id FROM batches WHERE state IN (?,?,?) AND updated < ?", (*finals, cutoff)
        )
        ids = [(row[0],) for row in await cursor.fetchall()]
        for table in ("steps", "transactions", "batches"):
            await self._conn.executemany(f"DELETE FROM {table} WHERE batch_id=?", ids)
        await self._conn.commit()
        return len(ids)
