"""The PostgreSQL journal against a real server: the protocol, migrations, leases, fencing, takeover.

Each test gets a fresh database on the session's private cluster (tests/pg_cluster.py).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from gateway import cli
from gateway.atomicity.journal import INSTANCE_VARIABLE, open_journal, postgres_driver_problem
from gateway.atomicity.pg_journal import PostgresJournal
from gateway.atomicity.pg_schema import SCHEMA_VERSION, lock_key
from gateway.atomicity.secrets import HeaderSealer
from gateway.atomicity.state import BatchState
from gateway.config import Journal as JournalSettings
from gateway.config import parse_config
from gateway.errors import BatchLost, ConfigError, JournalUnavailable

Opener = Callable[..., Any]


@pytest.fixture
async def opened(pg_url: str) -> AsyncIterator[Opener]:
    """Open PostgresJournals on the test's database (closed at the end)."""
    journals: list[PostgresJournal] = []

    async def open_one(lease: float = 5.0, **settings: Any) -> PostgresJournal:
        journal = PostgresJournal(
            JournalSettings(url=pg_url, lease_seconds=lease, **settings),
            HeaderSealer(frozenset({"authorization", "cookie"})),
        )
        await journal.open()
        journals.append(journal)
        return journal

    yield open_one
    for journal in journals:
        await journal.close()


async def sql(url: str, statement: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url, server_settings={"search_path": "gateway"})
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


async def expire(url: str, journal: PostgresJournal) -> None:
    """End a journal's lease behind its back (as a pause past the lease would)."""
    await sql(url, "UPDATE instances SET lease_until = now() - interval '1 second' WHERE epoch = $1",
              journal.lease.epoch)


async def start_batch(journal: PostgresJournal, batch_id: str, auth: str = "Bearer a") -> None:
    await journal.batch_state(batch_id, BatchState.PLANNED, "2 calls",
                              headers=[["Authorization", auth], ["X-Request-ID", "r1"]],
                              owner=journal.owner_of([auth]), request_id="r1")
    await journal.batch_state(batch_id, BatchState.RUNNING)


INTENT = {"where": "/Batch/items/0/SingleItem", "upstream": "legacy", "method": "PUT",
          "url": "http://u/orders/1", "path": "/orders/1", "headers": [["Cookie", "c=1"]]}


# --- the protocol ------------------------------------------------------------------------------


async def test_every_protocol_method_round_trips(opened: Opener, pg_url: str) -> None:
    journal = await opened()
    await start_batch(journal, "b1")
    await journal.tx_state("b1", "ledger", "open", token="t-1", headers=[["Authorization", "Bearer x"]])
    await journal.step_intent("b1", 0, INTENT)
    await journal.step_outcome("b1", 0, "done", {"status": 200, "headers": []}, 1)
    await journal.step_undo("b1", 0, "undone", "PUT /orders/1")
    batch = await journal.batch("b1")
    assert batch is not None and batch.state is BatchState.RUNNING
    assert ("Authorization", "Bearer a") in batch.headers
    assert batch.transactions[0].token == "t-1"
    assert batch.transactions[0].headers == [["Authorization", "Bearer x"]]
    assert batch.steps[0].intent["headers"] == [["Cookie", "c=1"]]
    assert (batch.steps[0].state, batch.steps[0].undo_state) == ("done", "undone")
    assert await journal.unfinished_ids() == ["b1"]
    owner = journal.owner_of(["Bearer a"])
    status = await journal.lookup("b1", owner)
    assert status is not None and status.steps[0].status == 200
    assert status.transactions == (("ledger", "open"),)
    assert await journal.lookup("b1", journal.owner_of(["Bearer b"])) is None
    assert await journal.batch_id_for("r1", owner) == "b1"
    assert len(await sql(pg_url, "SELECT * FROM secrets WHERE batch_id = 'b1'")) == 3
    await journal.batch_state("b1", BatchState.COMPENSATING)
    await journal.batch_state("b1", BatchState.ROLLED_BACK, "done")
    assert await sql(pg_url, "SELECT * FROM secrets WHERE batch_id = 'b1'") == []  # erased when settled
    assert await journal.unfinished_ids() == []
    assert [s.batch_id for s in await journal.summaries(everything=True)] == ["b1"]
    assert await journal.summaries() == []
    await journal.ping()
    assert await journal.prune(3600) == 0
    assert await journal.prune(-1) == 1
    assert await journal.batch("b1") is None


async def test_resolve_parks_the_batch_and_erases_its_secrets(opened: Opener, pg_url: str) -> None:
    journal = await opened()
    await start_batch(journal, "b2")
    await journal.batch_state("b2", BatchState.COMPENSATING)
    await journal.batch_state("b2", BatchState.ROLLBACK_INCOMPLETE, "undo failed")
    assert [s.batch_id for s in await journal.summaries()] == ["b2"]
    await journal.resolve("b2", "fixed by hand")
    assert await sql(pg_url, "SELECT * FROM secrets") == []
    batch = await journal.batch("b2")
    assert batch is not None and batch.state is BatchState.RESOLVED and batch.resolution == "fixed by hand"
    assert await journal.summaries() == []


# --- schema --------------------------------------------------------------------------------------


async def test_migration_is_idempotent_and_versioned(opened: Opener, pg_url: str) -> None:
    first = await opened()
    await start_batch(first, "b1")
    await first.close()
    await opened()  # a second start migrates nothing and keeps the data
    rows = await sql(pg_url, "SELECT value FROM meta WHERE name = 'schema_version'")
    assert [row[0] for row in rows] == [str(SCHEMA_VERSION)]
    assert len(await sql(pg_url, "SELECT * FROM batches")) == 1


async def test_a_schema_from_a_newer_gateway_is_refused(opened: Opener, pg_url: str) -> None:
    await opened()
    await sql(pg_url, "UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(JournalUnavailable, match="version 99, written by a newer gateway"):
        await opened()


async def test_several_journals_starting_at_once_migrate_once(opened: Opener, pg_url: str) -> None:
    journals = await asyncio.gather(*(opened() for _ in range(6)))
    assert len({journal.lease.epoch for journal in journals}) == 6
    assert len(await sql(pg_url, "SELECT * FROM meta WHERE name = 'schema_version'")) == 1
    assert len({journal.owner_of(["Bearer a"]) for journal in journals}) == 1  # one shared owner key


async def test_an_unreachable_server_is_a_clear_journal_error(tmp_path: Path) -> None:
    journal = PostgresJournal(JournalSettings(url=f"postgresql://nobody@/db?host={tmp_path}", timeout=2))
    with pytest.raises(JournalUnavailable, match="cannot open the journal postgresql://nobody@/db"):
        await journal.open()


# --- fencing ---------------------------------------------------------------------------------------


async def test_a_write_under_a_stale_epoch_is_refused(opened: Opener, pg_url: str) -> None:
    journal = await opened()
    await start_batch(journal, "b1")
    await expire(pg_url, journal)
    with pytest.raises(BatchLost, match="no longer this instance's"):
        await journal.step_intent("b1", 0, INTENT)
    with pytest.raises(BatchLost):
        await journal.fence("b1")
    assert await sql(pg_url, "SELECT * FROM steps") == []  # nothing was written


async def test_a_lease_within_its_safety_margin_already_refuses_writes(opened: Opener, pg_url: str) -> None:
    journal = await opened(lease=6)
    await start_batch(journal, "b1")
    await sql(pg_url, "UPDATE instances SET lease_until = now() + interval '1 second' WHERE epoch = $1",
              journal.lease.epoch)  # still valid, but less than lease/3 left
    with pytest.raises(BatchLost):
        await journal.step_intent("b1", 0, INTENT)


async def test_after_losing_its_lease_an_instance_starts_new_batches_under_a_new_epoch(
    opened: Opener, pg_url: str
) -> None:
    journal = await opened()
    await start_batch(journal, "old")
    old_epoch = journal.lease.epoch
    await expire(pg_url, journal)
    await start_batch(journal, "new")  # the lapsed lease is replaced, the new batch goes on
    assert journal.lease.epoch > old_epoch
    rows = await sql(pg_url, "SELECT batch_id, epoch FROM batches ORDER BY batch_id")
    assert [(row[0], row[1]) for row in rows] == [("new", journal.lease.epoch), ("old", old_epoch)]
    with pytest.raises(BatchLost):  # the old epoch's batch stays fenced off
        await journal.batch_state("old", BatchState.COMPENSATING)


async def test_a_batch_taken_over_is_refused_to_its_old_owner(opened: Opener, pg_url: str) -> None:
    first, second = await opened(), await opened()
    await start_batch(first, "b1")
    await expire(pg_url, first)
    assert await second.claim_unfinished(parked=False) == ["b1"]
    conn = await asyncpg.connect(pg_url, server_settings={"search_path": "gateway"})
    try:
        await first.lease.keep(conn)  # its renewal finds the lease lapsed: a new epoch
    finally:
        await conn.close()
    with pytest.raises(BatchLost, match="its lease lapsed"):  # under the epoch it ran with
        await first.step_intent("b1", 0, INTENT)
    first.ended("b1")
    with pytest.raises(BatchLost, match="another instance owns it"):  # under its new epoch
        await first.step_intent("b1", 0, INTENT)
    await second.step_intent("b1", 0, INTENT)  # the new owner writes
    await second.batch_state("b1", BatchState.ROLLED_BACK)


async def test_fence_costs_no_round_trip_while_the_lease_is_fresh(opened: Opener, pg_url: str) -> None:
    journal = await opened()
    await start_batch(journal, "b1")
    await sql(pg_url, "UPDATE batches SET epoch = 999")  # a round trip would find another owner
    await journal.fence("b1")  # answered from the fresh lease alone
    journal.lease.valid_until = 0.0
    with pytest.raises(BatchLost):
        await journal.fence("b1")


async def test_the_lease_is_renewed_in_the_background(opened: Opener) -> None:
    journal = await opened(lease=0.6)
    await start_batch(journal, "b1")
    epoch = journal.lease.epoch
    await asyncio.sleep(1.5)  # well past the lease: only renewals keep the batch this instance's
    await journal.step_intent("b1", 0, INTENT)
    assert journal.lease.epoch == epoch


async def test_a_closed_journal_owns_nothing(opened: Opener) -> None:
    journal = await opened()
    await start_batch(journal, "b1")
    await journal.close()
    with pytest.raises(BatchLost, match="released its lease"):
        await journal.fence("b1")  # a run still going at exit sends no call


# --- takeover ------------------------------------------------------------------------------------


async def test_a_live_instances_batches_are_never_taken(opened: Opener) -> None:
    first, second = await opened(), await opened()
    await start_batch(first, "b1")
    assert await second.claim_unfinished() == []
    assert await second.claim("b1") is not None  # an operator's retry is refused too
    assert await second.summaries() == []  # a live replica's batch in flight needs no operator


async def test_claimants_racing_take_each_batch_exactly_once(opened: Opener, pg_url: str) -> None:
    claimants = [await opened() for _ in range(3)]
    for trial in range(5):  # a race: repeated, each time with a fresh dead instance
        dead = await opened()
        ids = [f"t{trial}-b{n}" for n in range(30)]
        for batch_id in ids:
            await start_batch(dead, batch_id)
        await expire(pg_url, dead)
        taken = await asyncio.gather(*(c.claim_unfinished(parked=False) for c in claimants))
        taken += await asyncio.gather(*(c.claim_unfinished(parked=False) for c in claimants))
        all_taken = [batch_id for claimed in taken for batch_id in claimed]
        assert sorted(all_taken) == sorted(ids)  # every one, none twice
        rows = await sql(pg_url, "SELECT epoch FROM batches WHERE batch_id = ANY($1::text[])", ids)
        assert {row[0] for row in rows} <= {c.lease.epoch for c in claimants}


async def test_a_closed_journal_releases_its_lease_at_once(opened: Opener) -> None:
    first, second = await opened(lease=60), await opened(lease=60)
    await start_batch(first, "b1")
    await first.close()
    assert await second.claim_unfinished(parked=False) == ["b1"]


async def test_parked_batches_wait_for_an_operator_or_a_start_up(opened: Opener, pg_url: str) -> None:
    first, second = await opened(), await opened()
    await start_batch(first, "b1")
    await expire(pg_url, first)
    assert await second.claim_unfinished(parked=False) == ["b1"]
    await second.release("b1")  # recovery could not act on it
    assert await second.claim_unfinished(parked=False) == []  # periodic takeover leaves it
    assert [s.batch_id for s in await second.summaries()] == ["b1"]
    assert await second.claim_unfinished(parked=True) == ["b1"]  # a start-up or `gateway recover`


async def test_claiming_a_dead_workers_batches_ends_its_lease_first(
    opened: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = await opened(lease=60)
    monkeypatch.setenv(INSTANCE_VARIABLE, "w0.1.1")  # as the supervisor starts a worker
    worker = await opened(lease=60)
    assert worker.instance == "w0.1.1"
    await start_batch(worker, "b1")
    assert await supervisor.claim_unfinished(parked=False) == []
    assert await supervisor.claim_unfinished("w0.1.1") == ["b1"]  # it saw the worker die
    assert await supervisor.claim_unfinished(supervisor.instance) == []  # never its own lease


# --- pruning ---------------------------------------------------------------------------------------


async def test_pruning_runs_on_one_instance_at_a_time(opened: Opener, pg_url: str) -> None:
    journal = await opened()
    await start_batch(journal, "b1")
    await journal.batch_state("b1", BatchState.COMMITTING)
    await journal.batch_state("b1", BatchState.COMMITTED)
    holder = await asyncpg.connect(pg_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", lock_key("gateway", "prune"))
        assert await journal.prune(-1) == 0  # another instance is pruning: this one skips
        await holder.execute("SELECT pg_advisory_unlock($1)", lock_key("gateway", "prune"))
    finally:
        await holder.close()
    assert await journal.prune(-1) == 1


# --- configuration -------------------------------------------------------------------------------


def config_data(journal: dict[str, Any]) -> dict[str, Any]:
    return {"upstreams": {"u": {"url": "http://127.0.0.1:1"}}, "routes": [{"prefix": "/", "upstream": "u"}],
            "journal": journal}


@pytest.mark.parametrize(("journal", "message"), [
    ({"url": "mysql://h/db"}, "g.yaml: journal.url: must be a postgresql:// or postgres:// URL"),
    ({"url": "postgresql://h"}, "must name a database"),
    ({"url": "postgresql://h/db", "path": "j.sqlite3"}, "give either path (SQLite) or url (PostgreSQL)"),
    ({"url": "postgresql://h/db", "lease_seconds": 0}, "journal.lease_seconds"),
    ({"url": "postgresql://h/db", "db_schema": "a-b"}, "journal.db_schema"),
])
def test_bad_postgres_settings_are_config_errors(journal: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_data(journal), "g.yaml")
    assert message in str(caught.value)


def test_a_missing_driver_is_a_config_error_also_for_check_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg now fails
    assert postgres_driver_problem() is not None
    config = parse_config(config_data({"url": "postgresql://h/db"}), "g.yaml")
    with pytest.raises(ConfigError, match=r"journal.url: .*pip install 'batch-gateway\[postgres\]'"):
        open_journal(config, "g.yaml")
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config_data({"url": "postgresql://h/db"})))
    assert cli.main(["check-config", str(path)]) == 2
    assert "journal.url: a PostgreSQL journal needs the asyncpg driver" in capsys.readouterr().err
