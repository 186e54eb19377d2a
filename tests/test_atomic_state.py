"""The atomic batch state machine and the durable journal (SPEC section 5, STYLE item 2).

The transition table is written out here as the spec states it and the machine is walked through
every (from, to) pair: each allowed edge works, every other raises IllegalTransition. The SQLite
journal is checked against a real file: writes survive close and reopen, `unfinished()` lists
exactly the batches not in a final state, and `prune()` deletes only old finished batches.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.atomicity.journal import Journal, SqliteJournal
from gateway.atomicity.state import (
    FINAL_STATES,
    TRANSITIONS,
    BatchState,
    BatchStateMachine,
    IllegalTransition,
)
from gateway.errors import JournalUnavailable

S = BatchState

# The spec's table: PLANNED -> RUNNING -> COMMITTING -> COMMITTED | COMPENSATING -> ROLLED_BACK |
# ROLLBACK_INCOMPLETE. PLANNED may go straight to COMPENSATING (nothing ran; recovery of a batch that
# crashed before its first call) and a failed commit compensates.
ALLOWED = {
    (S.PLANNED, S.RUNNING),
    (S.PLANNED, S.COMPENSATING),
    (S.RUNNING, S.COMMITTING),
    (S.RUNNING, S.COMPENSATING),
    (S.COMMITTING, S.COMMITTED),
    (S.COMMITTING, S.COMPENSATING),
    (S.COMPENSATING, S.ROLLED_BACK),
    (S.COMPENSATING, S.ROLLBACK_INCOMPLETE),
}
# An operator (gateway batches retry|resolve) may retry a rollback_incomplete batch, or mark any
# batch that is not committed or rolled back as resolved by hand.
OPERATOR = {
    (S.ROLLBACK_INCOMPLETE, S.COMPENSATING),
    *((src, S.RESOLVED) for src in (
        S.PLANNED, S.RUNNING, S.COMMITTING, S.COMPENSATING, S.ROLLBACK_INCOMPLETE
    )),
}
ALLOWED |= OPERATOR
ALL_PAIRS = list(itertools.product(BatchState, BatchState))


def test_the_table_in_the_code_is_the_table_in_the_spec() -> None:
    assert set(TRANSITIONS) == set(BatchState)
    in_code = {(src, dst) for src, targets in TRANSITIONS.items() for dst in targets}
    assert in_code == ALLOWED


def test_final_states_are_the_three_outcomes_and_resolved_and_lead_nowhere_on_their_own() -> None:
    assert {S.COMMITTED, S.ROLLED_BACK, S.ROLLBACK_INCOMPLETE, S.RESOLVED} == FINAL_STATES
    for state in BatchState:
        assert state.final == (state in FINAL_STATES)
        assert state.final == (not any(src is state for src, _ in ALLOWED - OPERATOR))


def test_a_new_machine_starts_planned() -> None:
    assert BatchStateMachine().state is S.PLANNED


@pytest.mark.parametrize(
    ("src", "dst"), sorted(ALLOWED), ids=[f"{a.value}->{b.value}" for a, b in sorted(ALLOWED)]
)
def test_every_allowed_transition_works(src: BatchState, dst: BatchState) -> None:
    machine = BatchStateMachine(src)
    assert machine.to(dst) is dst
    assert machine.state is dst


FORBIDDEN = [pair for pair in ALL_PAIRS if pair not in ALLOWED]


@pytest.mark.parametrize(
    ("src", "dst"), FORBIDDEN, ids=[f"{a.value}->{b.value}" for a, b in FORBIDDEN]
)
def test_every_other_transition_raises_and_leaves_the_state_alone(
    src: BatchState, dst: BatchState
) -> None:
    machine = BatchStateMachine(src)
    with pytest.raises(IllegalTransition, match=f"{src.value} -> {dst.value}"):
        machine.to(dst)
    assert machine.state is src


@pytest.mark.parametrize(
    "path",
    [
        [S.RUNNING, S.COMMITTING, S.COMMITTED],
        [S.RUNNING, S.COMPENSATING, S.ROLLED_BACK],
        [S.RUNNING, S.COMPENSATING, S.ROLLBACK_INCOMPLETE],
        [S.RUNNING, S.COMMITTING, S.COMPENSATING, S.ROLLED_BACK],
        [S.COMPENSATING, S.ROLLBACK_INCOMPLETE],
    ],
    ids=lambda path: "->".join(state.value for state in path),
)
def test_whole_lifecycles_from_planned_end_final(path: list[BatchState]) -> None:
    machine = BatchStateMachine()
    for state in path:
        machine.to(state)
    assert machine.state.final
    with pytest.raises(IllegalTransition):
        machine.to(S.RUNNING)


# --- the SQLite journal ----------------------------------------------------------------------


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[SqliteJournal]:
    store = SqliteJournal(tmp_path / "j" / "journal.sqlite3")
    await store.open()
    yield store
    await store.close()


INTENT = {
    "where": "/Batch/items/0",
    "upstream": "legacy",
    "method": "PUT",
    "url": "http://127.0.0.1:1/orders/1",
    "path": "/orders/1",
    "headers": [["Authorization", "Bearer t"]],
    "body_b64": "e30=",
    "undo": {"kind": "restore", "snapshot_path": "/orders/1"},
    "snapshot": {"status": 200, "headers": [], "body_b64": "e30="},
}
OUTCOME = {"status": 200, "headers": [["Content-Type", "application/json"]], "body_b64": ""}


async def _write_a_running_batch(journal: Journal, batch_id: str) -> None:
    await journal.batch_state(batch_id, S.PLANNED, "2 calls")
    await journal.batch_state(batch_id, S.RUNNING)
    await journal.tx_state(batch_id, "ledger", "beginning", headers=[["Authorization", "Bearer t"]])
    await journal.tx_state(batch_id, "ledger", "open", token="tok-1")
    await journal.step_intent(batch_id, 0, INTENT)
    await journal.step_outcome(batch_id, 0, "done", OUTCOME, 1)
    await journal.step_intent(batch_id, 2, {**INTENT, "where": "/Batch/items/2"})


async def test_the_journal_file_is_private_and_in_wal_mode(
    journal: SqliteJournal, tmp_path: Path
) -> None:
    path = tmp_path / "j" / "journal.sqlite3"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_everything_written_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    first = SqliteJournal(path)
    await first.open()
    await _write_a_running_batch(first, "b1")
    await first.close()

    again = SqliteJournal(path)
    await again.open()
    try:
        batch = await again.batch("b1")
    finally:
        await again.close()
    assert batch is not None
    assert batch.state is S.RUNNING
    [tx] = batch.transactions
    assert (tx.upstream, tx.state, tx.token) == ("ledger", "open", "tok-1")
    assert tx.headers == [["Authorization", "Bearer t"]]  # kept from "beginning" (COALESCE)
    done, in_flight = batch.steps
    assert (done.position, done.state, done.seq) == (0, "done", 1)
    assert done.intent == INTENT and done.outcome == OUTCOME and done.undo_state is None
    assert (in_flight.position, in_flight.state, in_flight.outcome, in_flight.seq) == (
        2, "intent", None, None,
    )


async def test_a_later_batch_state_keeps_the_first_detail_unless_given_a_new_one(
    journal: SqliteJournal,
) -> None:
    await journal.batch_state("b1", S.PLANNED, "5 calls")
    await journal.batch_state("b1", S.RUNNING)
    await journal.batch_state("b1", S.COMPENSATING, "/Batch/items/3 failed with status 500")
    await journal.batch_state("b1", S.ROLLED_BACK)
    batch = await journal.batch("b1")
    assert batch is not None and batch.state is S.ROLLED_BACK
    with sqlite3.connect(journal._path) as conn:  # detail is not in the read model; look directly
        [(detail,)] = conn.execute("SELECT detail FROM batches WHERE batch_id='b1'").fetchall()
    assert detail == "/Batch/items/3 failed with status 500"


async def test_undo_state_is_recorded_per_step(journal: SqliteJournal) -> None:
    await _write_a_running_batch(journal, "b1")
    await journal.step_undo("b1", 0, "undone", "PUT /orders/1")
    await journal.step_undo("b1", 2, "undo_failed", "undo failed after 5 attempts")
    batch = await journal.batch("b1")
    assert batch is not None
    assert [step.undo_state for step in batch.steps] == ["undone", "undo_failed"]


async def test_unfinished_lists_exactly_the_batches_not_in_a_final_state_oldest_first(
    journal: SqliteJournal,
) -> None:
    assert await journal.unfinished() == []
    assert await journal.batch("nope") is None
    states = {
        "p": S.PLANNED, "r": S.RUNNING, "c": S.COMMITTING, "x": S.COMPENSATING,
        "ok": S.COMMITTED, "rb": S.ROLLED_BACK, "ri": S.ROLLBACK_INCOMPLETE,
    }
    for batch_id, state in states.items():
        await journal.batch_state(batch_id, state)
        await asyncio.sleep(0.002)  # distinct creation times
    await _write_a_running_batch(journal, "full")
    unfinished = await journal.unfinished()
    assert [b.batch_id for b in unfinished] == ["p", "r", "c", "x", "full"]
    full = unfinished[-1]
    assert len(full.steps) == 2 and len(full.transactions) == 1


async def test_prune_deletes_only_settled_batches_older_than_the_retention(
    journal: SqliteJournal,
) -> None:
    """Committed, rolled back and resolved batches are pruned; a rollback_incomplete one stays until
    an operator resolves it (it is what `gateway batches list` shows)."""
    for batch_id, state in [("old-ok", S.COMMITTED), ("old-rb", S.ROLLED_BACK),
                            ("old-ri", S.ROLLBACK_INCOMPLETE), ("old-incomplete", S.ROLLBACK_INCOMPLETE)]:
        await _write_a_running_batch(journal, batch_id)
        await journal.batch_state(batch_id, state)
    await journal.resolve("old-ri", "fixed by hand")
    await _write_a_running_batch(journal, "old-running")
    await asyncio.sleep(0.05)
    await _write_a_running_batch(journal, "new-ok")
    await journal.batch_state("new-ok", S.COMMITTED)

    assert await journal.prune(3600) == 0  # nothing is an hour old
    assert await journal.prune(0.03) == 3
    for gone in ("old-ok", "old-rb", "old-ri"):
        assert await journal.batch(gone) is None
    kept = [await journal.batch(b) for b in ("old-running", "new-ok", "old-incomplete")]
    assert all(b is not None and len(b.steps) == 2 for b in kept)
    with sqlite3.connect(journal._path) as conn:  # no orphaned step or transaction rows
        orphans = conn.execute(
            "SELECT COUNT(*) FROM steps WHERE batch_id IN ('old-ok','old-rb','old-ri')"
        ).fetchone()[0]
        orphan_txs = conn.execute(
            "SELECT COUNT(*) FROM transactions WHERE batch_id IN ('old-ok','old-rb','old-ri')"
        ).fetchone()[0]
    assert orphans == 0 and orphan_txs == 0
    assert await journal.prune(0.03) == 0  # pruning again finds nothing new
    assert [b.batch_id for b in await journal.unfinished()] == ["old-running"]


async def test_a_closed_journal_refuses_to_write(tmp_path: Path) -> None:
    closed = SqliteJournal(tmp_path / "journal.sqlite3")
    with pytest.raises(JournalUnavailable, match="not open"):
        await closed.batch_state("b", S.PLANNED)
