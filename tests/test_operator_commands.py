"""`gateway recover` exit codes and `gateway batches list|show|retry|resolve` (README "Stuck batches").

The commands run in-process through `gateway.cli.main` (which calls asyncio.run, so these tests are
plain sync tests); the demo upstreams serve on loopback from an event loop in a background thread;
the journal is a real SQLite file, written beforehand with the real `SqliteJournal` the way the
coordinator writes it (an open batch is what a gateway killed mid-batch leaves behind).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import secrets
import sqlite3
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from aiohttp import web
from cryptography.fernet import Fernet

from gateway.atomicity.journal import JournaledBatch, SqliteJournal
from gateway.atomicity.plan import UndoKind, UndoSpec
from gateway.atomicity.state import BatchState
from gateway.cli import main
from gateway.demo.launcher import demo_config_data, start_site
from gateway.demo.services import DEMO_STATE, DemoState, FaultRule, ledger_app, legacy_app
from tests.conftest import deep_merge
from tests.test_atomic_fault_matrix import FAST_ROLLBACK

# --- running the CLI in-process --------------------------------------------------------------


def _uncache_gateway_loggers() -> None:
    """`main` configures structlog with cache_logger_on_first_use: module-level loggers used during
    the call would keep writing to this test's stdout and escape later tests' capture_logs."""
    for name, module in list(sys.modules.items()):
        if name == "gateway" or name.startswith("gateway."):
            for value in list(vars(module).values()):
                if isinstance(value, structlog._config.BoundLoggerLazyProxy):
                    vars(value).pop("bind", None)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`gateway <argv>` in this process: (exit code, stdout, stderr); logs are turned off."""
    saved = structlog.get_config()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--log-level", "CRITICAL", *argv])
    finally:
        structlog.configure(**saved)
        _uncache_gateway_loggers()
    return code, out.getvalue(), err.getvalue()


# --- demo upstreams in a background event loop -------------------------------------------------


@dataclass
class Upstreams:
    legacy_url: str
    ledger_url: str
    legacy: DemoState
    ledger: DemoState


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="demo-upstreams", daemon=True)
    thread.start()

    async def start() -> list[tuple[web.AppRunner, str]]:
        return [await start_site(legacy_app()), await start_site(ledger_app())]

    sites = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        (legacy, legacy_url), (ledger, ledger_url) = sites
        yield Upstreams(legacy_url, ledger_url, legacy.app[DEMO_STATE], ledger.app[DEMO_STATE])
    finally:
        async def stop() -> None:
            for runner, _ in sites:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def config_file(upstreams: Upstreams, tmp_path: Path) -> Path:
    data = deep_merge(
        demo_config_data(upstreams.legacy_url, upstreams.ledger_url, journal=str(tmp_path / "j.sqlite3")),
        FAST_ROLLBACK,
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def journal_of(config_file: Path) -> Path:
    return Path(yaml.safe_load(config_file.read_text())["journal"]["path"])


# --- journal records as the coordinator writes them -----------------------------------------


def response_record(status: int, headers: list[list[str]], body: Any = None) -> dict[str, Any]:
    raw = b"" if body is None else json.dumps(body).encode()
    return {"status": status, "headers": headers, "body_b64": base64.b64encode(raw).decode()}


def create_intent(base_url: str, own: list[list[str]]) -> dict[str, Any]:
    """A journaled `POST /orders` (undo: delete what it created)."""
    return {
        "where": "/Batch/items/0/SingleItem", "upstream": "legacy", "method": "POST",
        "url": f"{base_url}/orders", "path": "/orders", "scope": "/orders", "headers": own,
        "body_b64": "", "undo": UndoSpec(kind=UndoKind.DELETE_CREATED).to_json(),
    }


def replace_intent(base_url: str, key: str, snapshot: dict[str, Any]) -> dict[str, Any]:
    """A journaled `PUT /orders/<key>` with its snapshot (undo: restore it)."""
    return {
        "where": "/Batch/items/1/SingleItem", "upstream": "legacy", "method": "PUT",
        "url": f"{base_url}/orders/{key}", "path": f"/orders/{key}", "scope": "/orders", "headers": [],
        "body_b64": "", "undo": UndoSpec(kind=UndoKind.RESTORE, snapshot_path=f"/orders/{key}").to_json(),
        "snapshot": response_record(200, [["Content-Type", "application/json"]], snapshot),
    }


async def _write(path: Path, batches: list[tuple[str, list[BatchState], list[list[str]],
                                                  list[tuple[dict[str, Any], dict[str, Any]]]]]) -> None:
    journal = SqliteJournal(path)
    await journal.open()
    try:
        for batch_id, states, headers, steps in batches:
            await journal.batch_state(batch_id, states[0], f"{len(steps)} calls", headers=headers)
            for state in states[1:]:
                await journal.batch_state(batch_id, state)
            for position, (intent, outcome) in enumerate(steps):
                await journal.step_intent(batch_id, position, intent)
                await journal.step_outcome(batch_id, position, "done", outcome, position + 1)
    finally:
        await journal.close()


def write_batches(path: Path, *batches: tuple[str, list[BatchState], list[list[str]],
                                               list[tuple[dict[str, Any], dict[str, Any]]]]) -> None:
    asyncio.run(_write(path, list(batches)))


def read_batch(path: Path, batch_id: str) -> JournaledBatch:
    async def read() -> JournaledBatch | None:
        journal = SqliteJournal(path)
        await journal.open()
        try:
            return await journal.batch(batch_id)
        finally:
            await journal.close()

    batch = asyncio.run(read())
    assert batch is not None
    return batch


def secrets_stored(path: Path, batch_id: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        (count,) = db.execute("SELECT count(*) FROM secrets WHERE batch_id=?", (batch_id,)).fetchone()
    return int(count)


def journal_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


RUNNING = [BatchState.PLANNED, BatchState.RUNNING]
INCOMPLETE = [*RUNNING, BatchState.COMPENSATING, BatchState.ROLLBACK_INCOMPLETE]
COMMITTED = [*RUNNING, BatchState.COMMITTING, BatchState.COMMITTED]


def calls_to(state: DemoState, method: str, path: str) -> list[dict[str, str]]:
    return [
        {k.lower(): v for k, v in call["headers"]}
        for call in state.calls
        if call["method"] == method and call["path"] == path
    ]


# --- gateway recover --------------------------------------------------------------------------


def test_recover_with_nothing_to_do_exits_0(config_file: Path, upstreams: Upstreams) -> None:
    write_batches(journal_of(config_file), ("bdone", COMMITTED, [], []))
    code, out, err = run_cli("recover", "--config", str(config_file))
    assert (code, err) == (0, "")
    assert "recovered 0 unfinished batch(es)" in out and "needs an operator" not in out
    assert upstreams.legacy.calls == [] and upstreams.ledger.calls == []
    code, out, _ = run_cli("batches", "list", "--config", str(config_file))
    assert code == 0 and out.strip() == "0 batch(es) need an operator"


def test_a_batch_whose_undo_keeps_failing_needs_an_operator_until_it_is_retried(
    config_file: Path, upstreams: Upstreams
) -> None:
    journal = journal_of(config_file)
    store = upstreams.legacy.store
    for n in (1, 2, 3):
        store.create({"item": f"order {n}"})
    before = store.snapshot()
    store.create({"item": "created by the batch"})  # id 4
    store.put("2", {"item": "replaced by the other batch"})
    secret, cookie = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    headers = [["Authorization", f"Bearer {secret}"], ["X-Tenant", "t1"]]
    created = response_record(201, [["Location", "/orders/4"]], {"id": "4"})
    write_batches(
        journal,
        ("bstuck", RUNNING, headers, [(create_intent(upstreams.legacy_url, [["Cookie", cookie]]), created)]),
        ("bfine", RUNNING, headers,
         [(replace_intent(upstreams.legacy_url, "2", before["2"]), response_record(200, []))]),
    )

    # before recovery: both are listed; show redacts the secrets it still holds
    code, out, _ = run_cli("batches", "list", "--config", str(config_file))
    assert code == 3
    assert sorted(line.split("\t")[:2] for line in out.splitlines()[:-1]) == [
        ["bfine", "running"], ["bstuck", "running"]
    ]
    assert out.splitlines()[-1] == "2 batch(es) need an operator"
    code, out, _ = run_cli("batches", "show", "bstuck", "--config", str(config_file))
    assert code == 0
    shown = json.loads(out)
    assert shown["state"] == "running"
    assert ["Authorization", "<redacted>"] in shown["headers"] and ["X-Tenant", "t1"] in shown["headers"]
    assert [(s["method"], s["state"]) for s in shown["left_to_undo"]] == [("POST", "done")]
    assert secret not in out and cookie not in out

    # recovery: the DELETE keeps answering 500, the other batch is rolled back regardless
    upstreams.legacy.faults.append(FaultRule(path_prefix="/orders/4", method="DELETE", status=500))
    code, out, err = run_cli("recover", "--config", str(config_file))
    assert code == 3, out + err
    assert "bstuck: rollback_incomplete" in out and "bfine: rolled_back" in out
    assert "recovered 2 unfinished batch(es)" in out
    [needs] = [line for line in out.splitlines() if line.startswith("needs an operator:")]
    assert needs.startswith("needs an operator: bstuck: ") and "500" in needs
    deletes = calls_to(upstreams.legacy, "DELETE", "/orders/4")
    assert len(deletes) == FAST_ROLLBACK["batch"]["rollback"]["attempts"]
    assert all(d["authorization"] == f"Bearer {secret}" and d["cookie"] == cookie for d in deletes)
    assert store.records["2"] == before["2"] and "4" in store.records

    code, out, _ = run_cli("batches", "list", "--config", str(config_file))
    assert code == 3
    [line, summary] = out.splitlines()
    assert line.split("\t")[:2] == ["bstuck", "rollback_incomplete"]
    assert summary == "1 batch(es) need an operator"
    code, out, _ = run_cli("batches", "show", "bstuck", "--config", str(config_file))
    shown = json.loads(out)
    assert code == 0 and shown["state"] == "rollback_incomplete"
    [left] = shown["left_to_undo"]
    assert (left["method"], left["undo_state"]) == ("POST", "undo_failed") and "500" in left["undo_detail"]
    assert secret not in out and cookie not in out

    # the upstream is fixed: retry finishes the rollback (what was undone is not redone)
    upstreams.legacy.faults.clear()
    puts = len(calls_to(upstreams.legacy, "PUT", "/orders/2"))
    code, out, err = run_cli("batches", "retry", "bstuck", "--config", str(config_file))
    assert code == 0, out + err
    assert "bstuck: rolled_back" in out and "needs an operator" not in out
    assert store.records == before
    assert len(calls_to(upstreams.legacy, "PUT", "/orders/2")) == puts
    # a rollback_incomplete batch keeps its secrets until it is settled, so the retried undo
    # authenticates like the first one did (and they are erased once it is rolled back)
    retried = calls_to(upstreams.legacy, "DELETE", "/orders/4")[-1]
    assert retried["authorization"] == f"Bearer {secret}" and retried["x-tenant"] == "t1"
    assert read_batch(journal, "bstuck").state is BatchState.ROLLED_BACK
    code, out, _ = run_cli("batches", "list", "--config", str(config_file))
    assert code == 0 and out.strip() == "0 batch(es) need an operator"
    code, out, _ = run_cli("batches", "list", "--all", "--config", str(config_file))
    assert code == 0
    assert sorted(line.split("\t")[:2] for line in out.splitlines()) == [
        ["bfine", "rolled_back"], ["bstuck", "rolled_back"]
    ]


def test_retry_of_a_batch_that_still_cannot_be_undone_exits_3(
    config_file: Path, upstreams: Upstreams
) -> None:
    upstreams.legacy.store.create({"item": "created by the batch"})
    created = response_record(201, [["Location", "/orders/1"]], {"id": "1"})
    write_batches(journal_of(config_file),
                  ("bstuck", INCOMPLETE, [], [(create_intent(upstreams.legacy_url, []), created)]))
    upstreams.legacy.faults.append(FaultRule(path_prefix="/orders/1", method="DELETE", status=503))
    code, out, _ = run_cli("batches", "retry", "bstuck", "--config", str(config_file))
    assert code == 3
    assert "bstuck: rollback_incomplete" in out and "needs an operator: bstuck" in out
    assert upstreams.legacy.store.records.keys() == {"1"}
    # a later `gateway recover` has nothing unfinished to do, but still says the batch needs someone
    code, out, _ = run_cli("recover", "--config", str(config_file))
    assert code == 3
    assert "recovered 0 unfinished batch(es)" in out and "needs an operator: bstuck" in out


# --- gateway batches resolve / show on what cannot be resolved --------------------------------


def test_resolve_marks_a_stuck_batch_dealt_with_and_erases_its_secrets(
    config_file: Path, upstreams: Upstreams
) -> None:
    journal = journal_of(config_file)
    secret = secrets.token_urlsafe(24)
    headers = [["Authorization", f"Bearer {secret}"], ["X-Tenant", "t1"]]
    created = response_record(201, [["Location", "/orders/1"]], {"id": "1"})
    intent = create_intent(upstreams.legacy_url, [])
    write_batches(
        journal,
        ("bopen", RUNNING, headers, [(intent, created)]),
        ("bincomplete", INCOMPLETE, headers, [(intent, created)]),
        ("bcommitted", COMMITTED, headers, [(intent, created)]),
    )
    assert secrets_stored(journal, "bopen") == 1 and secret.encode() in journal_bytes(journal)

    for batch_id in ("bopen", "bincomplete"):
        code, out, err = run_cli("batches", "resolve", batch_id, "--note", "x", "--config", str(config_file))
        assert (code, err) == (0, ""), out
        assert out.strip() == f"{batch_id}: resolved (x)"
        batch = read_batch(journal, batch_id)
        assert (batch.state, batch.resolution) == (BatchState.RESOLVED, "x")
        assert ("X-Tenant", "t1") in batch.headers
        assert secrets_stored(journal, batch_id) == 0
    assert secret.encode() not in journal_bytes(journal)
    assert upstreams.legacy.calls == []  # resolving calls nobody

    code, out, _ = run_cli("batches", "list", "--config", str(config_file))
    assert code == 0 and out.strip() == "0 batch(es) need an operator"
    code, out, _ = run_cli("batches", "list", "--all", "--config", str(config_file))
    listed = {line.split("\t")[0]: line for line in out.splitlines()}
    assert code == 0 and listed.keys() == {"bopen", "bincomplete", "bcommitted"}
    assert listed["bopen"].endswith("(resolved: x)") and "\tresolved\t" in listed["bopen"]
    code, out, _ = run_cli("batches", "show", "bopen", "--config", str(config_file))
    assert code == 0 and json.loads(out)["left_to_undo"] == []
    # recovery leaves a resolved batch alone
    code, out, _ = run_cli("recover", "--config", str(config_file))
    assert code == 0 and upstreams.legacy.calls == []

    # nothing to resolve: a committed batch, a resolved one, an unknown id
    for batch_id, says in (("bcommitted", "bcommitted is committed: nothing to resolve"),
                           ("bopen", "bopen is resolved: nothing to resolve"),
                           ("bnope", "no batch 'bnope' in the journal")):
        code, out, _ = run_cli("batches", "resolve", batch_id, "--note", "y", "--config", str(config_file))
        assert (code, out.strip()) == (1, says)
    assert read_batch(journal, "bcommitted").state is BatchState.COMMITTED
    assert read_batch(journal, "bopen").resolution == "x"


def test_show_of_an_unknown_batch_exits_1(config_file: Path) -> None:
    code, out, _ = run_cli("batches", "show", "bnope", "--config", str(config_file))
    assert (code, out.strip()) == (1, "no batch 'bnope' in the journal")


def test_recover_with_a_key_that_cannot_decrypt_the_secrets_does_not_undo_without_them(
    config_file: Path, upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.atomicity.secrets import HeaderSealer
    from gateway.config import DEFAULT_SENSITIVE_HEADERS

    journal = journal_of(config_file)
    written_with, configured = Fernet.generate_key(), Fernet.generate_key()

    async def write() -> None:
        sealed = SqliteJournal(journal, HeaderSealer(DEFAULT_SENSITIVE_HEADERS, written_with))
        await sealed.open()
        try:
            await sealed.batch_state("bkeyed", BatchState.PLANNED, "1 calls",
                                     headers=[["Authorization", "Bearer s3cret"]])
            await sealed.batch_state("bkeyed", BatchState.RUNNING)
            await sealed.step_intent("bkeyed", 0, create_intent(upstreams.legacy_url, []))
            created = response_record(201, [["Location", "/orders/1"]], {"id": "1"})
            await sealed.step_outcome("bkeyed", 0, "done", created, 1)
        finally:
            await sealed.close()

    asyncio.run(write())
    upstreams.legacy.store.create({"item": "created by the batch"})
    data = yaml.safe_load(config_file.read_text())
    data["journal"]["key_env"] = "GATEWAY_TEST_OTHER_KEY"
    config_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("GATEWAY_TEST_OTHER_KEY", configured.decode())

    code, out, _ = run_cli("recover", "--config", str(config_file))

    deletes = calls_to(upstreams.legacy, "DELETE", "/orders/1")
    assert all(d.get("authorization") == "Bearer s3cret" for d in deletes), "undo sent without credentials"
    assert secrets_stored(journal, "bkeyed") == 1, "the encrypted secret was erased"
    assert code == 3 and "needs an operator: bkeyed" in out
