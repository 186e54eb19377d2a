"""The journal under hostile or careless use (issue 9, findings 4 and 5).

Sensitive headers (Authorization, Cookie, `journal.sensitive_headers`) live apart from the rows that
use them, encrypted when a key is configured, and are gone from every journal file once a batch is
final; the outer headers are stored once per batch, not once per call; a batch's journal record is
capped (`journal.max_batch_bytes`); a journal that cannot be written refuses a batch before its
first call (503) and rolls back honestly after it; calls to one transactional upstream must share
one identity. Real upstreams, a real gateway, real SQLite files: what is asserted about secrets is
read from the raw bytes of the database, its WAL and its shared-memory file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from gateway.atomicity.journal import JournaledBatch, SqliteJournal
from gateway.atomicity.state import BatchState
from gateway.demo.launcher import demo_config_data
from gateway.demo.services import FaultRule
from gateway.runtime import GATEWAY
from tests.conftest import MakeGateway, deep_merge, state_of
from tests.test_atomic_fault_matrix import FAST_ROLLBACK, Call, json_document, multipart_body, records, seed
from tests.test_operator_commands import run_cli

Client = TestClient[web.Request, web.Application]
ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "GATEWAY_TEST_JOURNAL_KEY"
PROBLEM = "application/problem+json"


# --- helpers ----------------------------------------------------------------------------------


def journal_path(client: Client) -> Path:
    return Path(client.app[GATEWAY].config.journal.path)


def journal_files(path: Path) -> list[Path]:
    """The database and, when present, its WAL and shared-memory index."""
    return [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


def journal_size(path: Path) -> int:
    """What the journal takes on disk: the database plus its WAL."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def encodings(value: str) -> list[bytes]:
    """The value as is and as it would show inside base64 (bodies are journaled base64) at any
    alignment: the middle of each encoding, which does not depend on the neighbouring bytes."""
    raw = value.encode()
    return [raw] + [base64.b64encode(b"\0" * pad + raw)[4:-4] for pad in range(3)]


def assert_in_no_journal_file(path: Path, *values: str) -> None:
    files = journal_files(path)
    assert files, f"no journal at {path}"
    for file in files:
        data = file.read_bytes()
        for value in values:
            for form in encodings(value):
                assert form not in data, f"{value!r} is in {file.name} (as {form[:12]!r}...)"


async def rows(client: Client, sql: str, *params: Any) -> list[Any]:
    """Rows straight from the gateway's own journal connection."""
    journal = client.app[GATEWAY].batches.journal
    assert isinstance(journal, SqliteJournal)
    cursor = await journal._conn.execute(sql, params)
    return list(await cursor.fetchall())


async def journaled(client: Client, batch_id: str) -> JournaledBatch:
    batch = await client.app[GATEWAY].batches.journal.batch(batch_id)
    assert batch is not None
    return batch


async def until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    ends = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > ends:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def received(server: TestServer, method: str, path: str) -> bool:
    return any(c["method"] == method and c["path"] == path for c in state_of(server).calls)


def headers_of(server: TestServer, method: str, path: str) -> list[dict[str, str]]:
    """The headers (lower-case names) of every call the upstream received for method + path."""
    return [
        {k.lower(): v for k, v in call["headers"]}
        for call in state_of(server).calls
        if call["method"] == method and call["path"] == path
    ]


async def send_batch(
    client: Client, calls: Sequence[Call], fmt: str, outer: dict[str, str],
    own: dict[int, dict[str, str]] | None = None, mode: str = "Serial",
) -> tuple[str, str, str]:
    """Send an atomic batch with outer headers; (batch id, outcome, detail) of a 200 answer."""
    if fmt == "json":
        document = json_document(calls, mode, own or {})
        async with client.post(
            "/batch/v1", json=document, headers={"X-Batch-Atomic": "true", **outer}
        ) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        return answer["batch_id"], answer["atomic"]["outcome"], answer["atomic"].get("detail") or ""
    body, content_type = multipart_body(calls, own or {})
    async with client.post(
        "/v1/api/batch", data=body, headers={"Content-Type": content_type, **outer}
    ) as response:
        assert response.status == 200, await response.text()
        return response.headers["X-Batch-Id"], response.headers["X-Batch-Outcome"], ""


async def problem(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.content_type == PROBLEM, await response.text()
    document: dict[str, Any] = json.loads(await response.read())
    return document


def fresh_secrets() -> dict[str, str]:
    """Unique values nobody else writes, so finding one in a file means it came from this test."""
    return {name: secrets.token_urlsafe(24) for name in ("auth", "cookie", "api_key", "own", "ledger")}


# --- secrets are erased once a batch is final --------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "multipart"])
@pytest.mark.parametrize("ends", ["committed", "rolled_back"])
async def test_sensitive_headers_are_in_no_journal_file_once_the_batch_is_final(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, fmt: str, ends: str
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    client = await make_gateway(FAST_ROLLBACK)
    s = fresh_secrets()
    outer = {"Authorization": f"Bearer {s['auth']}", "Cookie": f"s={s['cookie']}", "X-Tenant": "t1"}
    own = {1: {"Authorization": f"Bearer {s['own']}"}, 2: {"Cookie": f"s={s['ledger']}"}}
    calls = [
        Call("legacy", "POST", "/orders", {"item": "new"}),
        Call("legacy", "PUT", "/orders/1", {"item": "replaced"}),
        Call("ledger", "POST", "/accounts", {"owner": "new"}),
    ]
    if ends == "rolled_back":
        calls.append(Call("legacy", "PATCH", "/orders/2", {"qty": 0}))
        state_of(legacy).faults.append(FaultRule(path_prefix="/orders/2", method="PATCH", status=500))

    batch_id, outcome, _ = await send_batch(client, calls, fmt, outer, own)

    assert outcome == ends
    # the secrets were used: forward calls and undos carried them
    [put] = [h for h in headers_of(legacy, "PUT", "/orders/1") if "idempotency-key" in h][:1]
    assert put["authorization"] == f"Bearer {s['own']}" and put["cookie"] == f"s={s['cookie']}"
    [begin] = headers_of(ledger, "POST", "/tx")
    assert begin["authorization"] == f"Bearer {s['auth']}" and begin["cookie"] == f"s={s['ledger']}"
    if ends == "rolled_back":
        assert records(legacy, ledger) == before
        [undo] = headers_of(legacy, "DELETE", "/orders/4")
        assert undo["authorization"] == f"Bearer {s['auth']}" and undo["cookie"] == f"s={s['cookie']}"
        puts = headers_of(legacy, "PUT", "/orders/1")
        [restore] = [h for h in puts if h["idempotency-key"].endswith(".undo")]
        assert restore["authorization"] == f"Bearer {s['own']}"
    # ... and are now in no journal file, while the rest of the record is kept
    assert_in_no_journal_file(journal_path(client), *s.values())
    batch = await journaled(client, batch_id)
    assert batch.state is BatchState(ends)
    assert ("X-Tenant", "t1") in batch.headers
    assert {name.lower() for name, _ in batch.headers}.isdisjoint({"authorization", "cookie"})
    assert [s.position for s in batch.steps] == ([0, 1, 3] if ends == "rolled_back" else [0, 1])
    for step in batch.steps:
        assert "authorization" not in {name.lower() for name, _ in step.intent["headers"]}
    assert await rows(client, "SELECT count(*) FROM secrets") == [(0,)]


async def test_a_configured_sensitive_header_is_erased_too(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    client = await make_gateway(
        deep_merge(FAST_ROLLBACK, {"journal": {"sensitive_headers": ["X-Api-Key"]}})
    )
    s = fresh_secrets()
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/2", method="PATCH", status=500))
    calls = [Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("legacy", "PATCH", "/orders/2", {"qty": 0})]
    outer = {"X-Api-Key": s["api_key"], "X-Tenant": "t1"}
    batch_id, outcome, _ = await send_batch(client, calls, "json", outer, {0: {"X-Api-Key": s["own"]}})
    assert outcome == "rolled_back"
    [undo] = headers_of(legacy, "DELETE", "/orders/4")
    assert undo["x-api-key"] == s["own"]
    assert_in_no_journal_file(journal_path(client), s["api_key"], s["own"])
    batch = await journaled(client, batch_id)
    assert ("X-Tenant", "t1") in batch.headers
    assert "x-api-key" not in {name.lower() for name, _ in batch.headers}


async def test_a_sensitive_header_is_kept_apart_and_readable_while_the_batch_is_open(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    """No key configured: the open batch's secret is in the `secrets` table (so recovery could use
    it) and nowhere else; the rows that use it hold a reference."""
    seed(legacy, ledger)
    client = await make_gateway(FAST_ROLLBACK)
    s = fresh_secrets()
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/1", method="PUT", delay_ms=800))
    calls = [Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("legacy", "PUT", "/orders/1", {"item": "held"})]
    outer = {"Authorization": f"Bearer {s['auth']}", "X-Tenant": "t1"}
    batch = asyncio.create_task(send_batch(client, calls, "json", outer, {1: {"Cookie": s["own"]}}))
    await until(lambda: received(legacy, "PUT", "/orders/1"), "the held call")

    for sql in ("SELECT intent FROM steps", "SELECT coalesce(outcome, '') FROM steps",
                "SELECT detail FROM batches", "SELECT headers FROM batches"):
        for (value,) in await rows(client, sql):
            assert s["auth"] not in (value or "") and s["own"] not in (value or ""), sql
    stored = {value for (value,) in await rows(client, "SELECT value FROM secrets")}
    assert stored == {f"plain:Bearer {s['auth']}", f"plain:{s['own']}"}
    [(headers,)] = await rows(client, "SELECT headers FROM batches")
    assert ["X-Tenant", "t1"] in json.loads(headers)
    [open_batch] = await client.app[GATEWAY].batches.journal.unfinished()
    assert ("Authorization", f"Bearer {s['auth']}") in open_batch.headers  # recovery can use it
    assert ["Cookie", s["own"]] in open_batch.steps[1].intent["headers"]

    _, outcome, _ = await batch
    assert outcome == "committed"
    assert_in_no_journal_file(journal_path(client), s["auth"], s["own"])


async def test_with_a_key_the_open_batch_secret_is_encrypted_in_every_journal_file(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    key = Fernet.generate_key()
    monkeypatch.setenv(KEY_ENV, key.decode())
    client = await make_gateway(deep_merge(FAST_ROLLBACK, {"journal": {"key_env": KEY_ENV}}))
    s = fresh_secrets()
    # the held call then fails, so the batch is rolled back with the secret
    state_of(legacy).faults.append(
        FaultRule(path_prefix="/orders/1", method="PUT", delay_ms=800, status=500)
    )
    calls = [Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("legacy", "PUT", "/orders/1", {"item": "held"})]
    outer = {"Authorization": f"Bearer {s['auth']}", "Cookie": f"s={s['cookie']}"}
    batch = asyncio.create_task(send_batch(client, calls, "json", outer))
    await until(lambda: received(legacy, "PUT", "/orders/1"), "the held call")

    assert_in_no_journal_file(journal_path(client), s["auth"], s["cookie"])
    stored = [value for (value,) in await rows(client, "SELECT value FROM secrets")]
    assert len(stored) == 2 and all(value.startswith("fernet:") for value in stored)
    plain = {Fernet(key).decrypt(value.removeprefix("fernet:").encode()).decode() for value in stored}
    assert plain == {f"Bearer {s['auth']}", f"s={s['cookie']}"}

    _, outcome, _ = await batch
    assert outcome == "rolled_back" and records(legacy, ledger) == before
    [undo] = headers_of(legacy, "DELETE", "/orders/4")
    assert undo["authorization"] == f"Bearer {s['auth']}"
    assert await rows(client, "SELECT count(*) FROM secrets") == [(0,)]
    assert_in_no_journal_file(journal_path(client), s["auth"], s["cookie"])


# --- a configured key that is missing or malformed -------------------------------------------


def write_config(tmp_path: Path, journal: dict[str, Any]) -> Path:
    data = demo_config_data("http://127.0.0.1:9", "http://127.0.0.1:9", port=free_port(),
                            journal=str(tmp_path / "journal.sqlite3"))
    data["journal"].update(journal)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def run_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=30, env=env if env is not None else dict(os.environ),
    )


KEY_PROBLEMS = [
    pytest.param({"key_env": KEY_ENV}, None, "journal.key_env",
                 f"environment variable {KEY_ENV} is not set", id="unset-env"),
    pytest.param({"key_env": KEY_ENV}, "not-a-fernet-key", "journal.key_env", "not a Fernet key",
                 id="malformed-key"),
    pytest.param({"key_file": "/nonexistent/journal.key"}, None, "journal.key_file",
                 "cannot read the key", id="missing-file"),
]


@pytest.mark.parametrize(("journal", "env_value", "names", "says"), KEY_PROBLEMS)
def test_a_configured_key_that_cannot_be_used_stops_serve_with_exit_2(
    tmp_path: Path, journal: dict[str, Any], env_value: str | None, names: str, says: str,
) -> None:
    config = write_config(tmp_path, journal)
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    if env_value is not None:
        env[KEY_ENV] = env_value
    done = run_gateway("serve", "--config", str(config), env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("gateway: ") and names in line and says in line
    assert "Traceback" not in done.stdout + done.stderr
    assert not Path(tmp_path / "journal.sqlite3").exists()  # stopped before opening the journal


@pytest.mark.parametrize(("journal", "env_value", "names", "says"), KEY_PROBLEMS)
@pytest.mark.parametrize("command", [("recover",), ("batches", "list"), ("batches", "show", "b1")])
def test_a_configured_key_that_cannot_be_used_stops_the_operator_commands_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: dict[str, Any], env_value: str | None,
    names: str, says: str, command: tuple[str, ...],
) -> None:
    config = write_config(tmp_path, journal)
    monkeypatch.delenv(KEY_ENV, raising=False)
    if env_value is not None:
        monkeypatch.setenv(KEY_ENV, env_value)
    code, out, err = run_cli(*command, "--config", str(config))
    assert code == 2, out + err
    [line] = err.strip().splitlines()
    assert line.startswith("gateway: ") and names in line and says in line


def test_a_key_error_names_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, {"key_env": KEY_ENV})
    monkeypatch.delenv(KEY_ENV, raising=False)
    code, _, err = run_cli("recover", "--config", str(config))
    assert code == 2
    assert f"{config}: journal.key_env: " in err


# --- outer headers are stored once per batch ---------------------------------------------------


async def test_outer_headers_are_journaled_once_per_batch_not_once_per_call(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    """100 creates with ~55 KB of outer headers: the journal grows by a few hundred KB, not by
    100 x 55 KB, and no step row holds an outer header value."""
    client = await make_gateway()
    pads = {f"X-Pad-{n:02d}": f"pad{n:02d}-" + "p" * 1000 for n in range(55)}
    calls = [Call("legacy", "POST", "/orders", {"item": f"o{n}"}) for n in range(100)]
    path = journal_path(client)
    size_before = journal_size(path)

    batch_id, outcome, _ = await send_batch(client, calls, "json", pads, mode="Unordered")

    assert outcome == "committed"
    assert len(state_of(legacy).store.records) == 100
    grown = journal_size(path) - size_before
    assert grown < 3 * 1024 * 1024, f"the journal grew by {grown} bytes"
    intents = await rows(client, "SELECT intent FROM steps WHERE batch_id=?", batch_id)
    assert len(intents) == 100
    for (intent,) in intents:
        assert "pad00-" not in intent and "X-Pad" not in intent
    batch = await journaled(client, batch_id)
    assert {name for name, _ in batch.headers} >= set(pads)
    assert all(value == pads[name] for name, value in batch.headers if name in pads)


# --- journal.max_batch_bytes ------------------------------------------------------------------


async def test_a_batch_whose_journal_record_would_exceed_the_cap_is_refused_before_any_call(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    client = await make_gateway({"journal": {"max_batch_bytes": 4096}})
    many = json_document([Call("legacy", "POST", "/orders", {"item": str(n)}) for n in range(30)],
                         "Serial", {})
    async with client.post("/batch/v1", json=many, headers={"X-Batch-Atomic": "true"}) as response:
        assert response.status == 413
        doc = await problem(response)
    assert doc["type"].endswith("/too-large") and "journal.max_batch_bytes" in doc["detail"]
    # outer headers count too: they are journaled once, but they are journaled
    one = json_document([Call("legacy", "POST", "/orders", {"item": "x"})], "Serial", {})
    big = {"X-Big": "b" * 5000, "X-Batch-Atomic": "true"}
    async with client.post("/batch/v1", json=one, headers=big) as response:
        assert response.status == 413
        assert "journal.max_batch_bytes" in (await problem(response))["detail"]
    assert state_of(legacy).calls == [] and state_of(ledger).calls == []

    few = json_document([Call("legacy", "POST", "/orders", {"item": str(n)}) for n in range(3)],
                        "Serial", {})
    async with client.post("/batch/v1", json=few, headers={"X-Batch-Atomic": "true"}) as response:
        assert response.status == 200
        assert (await response.json())["atomic"]["outcome"] == "committed"
    assert len(state_of(legacy).store.records) == 3


async def test_a_snapshot_that_would_exceed_the_cap_fails_its_call_unsent_and_rolls_back(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    state_of(legacy).store.put("1", {"item": "big", "blob": "x" * 20_000})
    before = records(legacy, ledger)
    client = await make_gateway(deep_merge(FAST_ROLLBACK, {"journal": {"max_batch_bytes": 8192}}))
    calls = [Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("legacy", "PUT", "/orders/1", {"item": "small"})]
    document = json_document(calls, "Serial", {})
    async with client.post("/batch/v1", json=document, headers={"X-Batch-Atomic": "true"}) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["atomic"]["outcome"] == "rolled_back"
    put = answer["Batch"]["items"][1]["SingleItem"]["Result"]
    assert put["status"] == 413 and put["rollback"] == "failed"
    assert not headers_of(legacy, "PUT", "/orders/1")  # never sent
    assert records(legacy, ledger) == before


# --- a journal that cannot be written -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "multipart"])
async def test_an_unwritable_journal_refuses_an_atomic_batch_with_503_before_any_call(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, fmt: str
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    client = await make_gateway()
    await rows(client, "PRAGMA query_only=ON")
    calls = [Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("ledger", "POST", "/accounts", {"owner": "new"})]
    if fmt == "json":
        request = client.post("/batch/v1", json=json_document(calls, "Serial", {}),
                              headers={"X-Batch-Atomic": "true"})
    else:
        body, content_type = multipart_body(calls, {})
        request = client.post("/v1/api/batch", data=body, headers={"Content-Type": content_type})
    async with request as response:
        assert response.status == 503
        doc = await problem(response)
    assert doc["type"].endswith("/journal-unavailable") and doc["status"] == 503
    assert state_of(legacy).calls == [] and state_of(ledger).calls == []
    assert records(legacy, ledger) == before

    # the gateway keeps serving: plain proxying, and atomic batches once the journal is back
    async with client.get("/orders/1") as response:
        assert response.status == 200 and (await response.json())["item"] == "order 1"
    await rows(client, "PRAGMA query_only=OFF")
    _, outcome, _ = await send_batch(client, calls, fmt, {})
    assert outcome == "committed"
    assert len(state_of(legacy).store.records) == 4 and len(state_of(ledger).store.records) == 4


async def test_a_journal_that_becomes_unwritable_mid_batch_ends_in_an_honest_rollback(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    client = await make_gateway(FAST_ROLLBACK)
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/1", method="PUT", delay_ms=300))
    calls = [Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("ledger", "POST", "/accounts", {"owner": "new"}),
             Call("legacy", "PUT", "/orders/1", {"item": "held"}),
             Call("legacy", "DELETE", "/orders/2")]
    batch = asyncio.create_task(send_batch(client, calls, "json", {}))
    await until(lambda: received(legacy, "PUT", "/orders/1"), "the held call")
    await rows(client, "PRAGMA query_only=ON")
    try:
        _, outcome, detail = await batch
    finally:
        await rows(client, "PRAGMA query_only=OFF")

    assert outcome == "rolled_back", detail
    assert "journal" in detail
    assert records(legacy, ledger) == before
    assert state_of(ledger).transactions == {}
    assert not received(legacy, "DELETE", "/orders/2")  # its intent could not be recorded: not sent
    # the journal still shows the batch unfinished: recovery after a restart repeats the undos
    [stuck] = await client.app[GATEWAY].batches.journal.unfinished()
    assert stuck.state is BatchState.RUNNING


async def test_a_journal_that_fills_up_mid_batch_ends_in_an_honest_rollback(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    """Each PUT journals a ~40 KB snapshot: the first fits in the pages left, the second does not."""
    seed(legacy, ledger)
    for n in (1, 2, 3):
        state_of(legacy).store.put(str(n), {"item": f"order {n}", "blob": f"{n}" * 40_000})
    before = records(legacy, ledger)
    client = await make_gateway(FAST_ROLLBACK)
    [(pages,)] = await rows(client, "PRAGMA page_count")
    [(page_size,)] = await rows(client, "PRAGMA page_size")
    room = (40_000 * 3 // 2) // page_size  # one snapshot and a half
    await rows(client, f"PRAGMA max_page_count={pages + room}")
    calls = [Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("legacy", "PUT", "/orders/1", {"item": "small"}),
             Call("legacy", "PUT", "/orders/2", {"item": "small"}),
             Call("legacy", "PUT", "/orders/3", {"item": "small"})]

    _, outcome, detail = await send_batch(client, calls, "json", {})

    assert outcome in ("rolled_back", "rollback_incomplete"), detail
    assert "journal" in detail
    assert records(legacy, ledger) == before
    assert received(legacy, "POST", "/orders") and received(legacy, "DELETE", "/orders/4")  # made, undone
    puts = [c["path"] for c in state_of(legacy).calls if c["method"] == "PUT"]
    assert "/orders/3" not in puts


# --- one identity per upstream transaction --------------------------------------------------


async def test_calls_to_a_transactional_upstream_with_different_credentials_are_refused(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    client = await make_gateway()
    calls = [Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("ledger", "POST", "/accounts", {"owner": "a"}),
             Call("ledger", "PATCH", "/accounts/1", {"balance": 1})]
    own = {1: {"Authorization": "Bearer alice"}, 2: {"Authorization": "Bearer mallory"}}
    document = json_document(calls, "Serial", own)
    async with client.post("/batch/v1", json=document, headers={"X-Batch-Atomic": "true"}) as response:
        assert response.status == 422
        doc = await problem(response)
    assert doc["type"].endswith("/mixed-credentials")
    assert doc["pointer"].startswith("/Batch/items/2")
    assert "/Batch/items/1" in doc["detail"] and "authorization" in doc["detail"]
    assert "alice" not in json.dumps(doc) and "mallory" not in json.dumps(doc)
    # one call with credentials and one inheriting none of its own differ too
    outer = {"Authorization": "Bearer alice", "X-Batch-Atomic": "true"}
    document = json_document(calls, "Serial", {2: {"Authorization": "Bearer mallory"}})
    async with client.post("/batch/v1", json=document, headers=outer) as response:
        assert response.status == 422
        assert (await problem(response))["pointer"].startswith("/Batch/items/2")
    assert state_of(ledger).calls == [] and state_of(legacy).calls == []
    assert records(legacy, ledger) == before

    _, outcome, _ = await send_batch(client, calls, "json", {}, {1: own[1], 2: own[1]})
    assert outcome == "committed"
    assert all(h.get("authorization") == "Bearer alice" for h in
               (dict((k.lower(), v) for k, v in c["headers"]) for c in state_of(ledger).calls))


async def test_calls_to_a_compensation_upstream_may_carry_different_credentials(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    client = await make_gateway(FAST_ROLLBACK)
    state_of(legacy).faults.append(FaultRule(path_prefix="/orders/3", method="DELETE", status=500))
    calls = [Call("legacy", "POST", "/orders", {"item": "new"}),
             Call("legacy", "PUT", "/orders/1", {"item": "b"}),
             Call("legacy", "DELETE", "/orders/3")]
    own = {0: {"Authorization": "Bearer alice"}, 1: {"Authorization": "Bearer bob"}}
    _, outcome, _ = await send_batch(client, calls, "json", {"Authorization": "Bearer carol"}, own)
    assert outcome == "rolled_back"
    assert records(legacy, ledger) == before
    # each undo went with its own call's credentials
    [delete] = headers_of(legacy, "DELETE", "/orders/4")
    restores = [h for h in headers_of(legacy, "PUT", "/orders/1") if h["idempotency-key"].endswith(".undo")]
    assert delete["authorization"] == "Bearer alice"
    assert [h["authorization"] for h in restores] == ["Bearer bob"]


@pytest.mark.parametrize("configured", [True, False])
async def test_a_configured_sensitive_header_counts_as_a_credential(
    make_gateway: MakeGateway, legacy: TestServer, ledger: TestServer, configured: bool
) -> None:
    seed(legacy, ledger)
    extra = {"journal": {"sensitive_headers": ["X-Api-Key"]}} if configured else {}
    client = await make_gateway(extra)
    calls = [Call("ledger", "POST", "/accounts", {"owner": "a"}),
             Call("ledger", "PATCH", "/accounts/1", {"balance": 1})]
    body, content_type = multipart_body(calls, {0: {"X-Api-Key": "k1"}, 1: {"X-Api-Key": "k2"}})
    async with client.post("/v1/api/batch", data=body, headers={"Content-Type": content_type}) as response:
        if not configured:  # an ordinary header may differ between the calls of one transaction
            assert response.status == 200 and response.headers["X-Batch-Outcome"] == "committed"
            return
        assert response.status == 422
        doc = await problem(response)
    assert doc["type"].endswith("/mixed-credentials") and doc["where"] == "part 2"
    assert "x-api-key" in doc["detail"] and "k1" not in doc["detail"] and "k2" not in doc["detail"]
    assert state_of(ledger).calls == []


# --- a keyed journal survives a crash: recovery decrypts the secret -------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Gateway:
    """`python -m gateway serve|recover --config FILE` in a subprocess, output kept in a file."""

    def __init__(self, config: Path, port: int, logs: Path) -> None:
        self.config, self.logs, self.base = config, logs, f"http://127.0.0.1:{port}"
        self.process: asyncio.subprocess.Process | None = None
        self._runs = 0

    async def spawn(self, command: str, env: dict[str, str]) -> asyncio.subprocess.Process:
        self._runs += 1
        with open(self.logs / f"{self._runs}-{command}.log", "wb") as out:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", command, "--config", str(self.config),
                cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env,
            )

    async def serve(self, env: dict[str, str]) -> None:
        self.process = await self.spawn("serve", env)
        ends = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < ends:
                assert self.process.returncode is None, self.output()
                try:
                    async with session.get(f"{self.base}/_gateway/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"the gateway did not become ready:\n{self.output()}")

    async def run(self, command: str, env: dict[str, str]) -> tuple[int, str]:
        process = await self.spawn(command, env)
        code = await asyncio.wait_for(process.wait(), 30)
        return code, (self.logs / f"{self._runs}-{command}.log").read_text()

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("*.log")))


@pytest.fixture
async def keyed_gateway(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> AsyncIterator[tuple[Gateway, Path]]:
    journal = tmp_path / "journal.sqlite3"
    port = free_port()
    data = deep_merge(
        demo_config_data(str(legacy.make_url("")).rstrip("/"), str(ledger.make_url("")).rstrip("/"),
                         port=port, journal=str(journal)),
        deep_merge(FAST_ROLLBACK, {"journal": {"key_env": KEY_ENV}}),
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    logs = tmp_path / "logs"
    logs.mkdir()
    gateway = Gateway(config, port, logs)
    try:
        yield gateway, journal
    finally:
        if gateway.process is not None and gateway.process.returncode is None:
            gateway.process.kill()
            await gateway.process.wait()


async def post_and_forget(base: str, document: dict[str, Any], headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(f"{base}/batch/v1", json=document, headers=headers) as response:
                await response.read()
        except aiohttp.ClientError:
            pass


@pytest.mark.slow
async def test_a_keyed_journal_keeps_the_secret_encrypted_through_a_crash_and_recovery_uses_it(
    keyed_gateway: tuple[Gateway, Path], legacy: TestServer, ledger: TestServer
) -> None:
    gateway, journal = keyed_gateway
    seed(legacy, ledger)
    before = records(legacy, ledger)
    key = Fernet.generate_key().decode()
    with_key = {**os.environ, KEY_ENV: key, "PYTHONUNBUFFERED": "1"}
    without_key = {k: v for k, v in with_key.items() if k != KEY_ENV}
    secret = secrets.token_urlsafe(24)
    hold = FaultRule(path_prefix="/orders/3", method="PUT", delay_ms=30_000, times=1)
    state_of(legacy).faults.append(hold)
    document = json_document(
        [Call("legacy", "POST", "/orders", {"item": "new"}),
         Call("legacy", "PATCH", "/orders/1", {"item": "patched"}),
         Call("legacy", "PUT", "/orders/3", {"item": "held"})],
        "Serial", {},
    )
    headers = {"X-Batch-Atomic": "true", "Authorization": f"Bearer {secret}"}
    await gateway.serve(with_key)
    client = asyncio.create_task(post_and_forget(gateway.base, document, headers))
    await until(lambda: received(legacy, "PUT", "/orders/3"), "the held call")
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(gateway.process.wait(), 20) == -signal.SIGKILL
    await client

    # the open batch's secret is on disk only encrypted
    assert_in_no_journal_file(journal, secret)
    from gateway.atomicity.secrets import HeaderSealer
    from gateway.config import DEFAULT_SENSITIVE_HEADERS

    keyed = SqliteJournal(journal, HeaderSealer(DEFAULT_SENSITIVE_HEADERS, key.encode()))
    await keyed.open()
    try:
        [batch] = await keyed.unfinished()
    finally:
        await keyed.close()
    assert ("Authorization", f"Bearer {secret}") in batch.headers

    # without the key recovery refuses to start and touches nothing
    code, output = await gateway.run("recover", without_key)
    assert code == 2 and "journal.key_env" in output, output
    assert not received(legacy, "DELETE", "/orders/4")

    code, output = await gateway.run("recover", with_key)
    assert code == 0, output
    assert f"{batch.batch_id}: rolled_back" in output
    assert records(legacy, ledger) == before
    undos = [h for method, path in (("PUT", "/orders/3"), ("PUT", "/orders/1"), ("DELETE", "/orders/4"))
             for h in headers_of(legacy, method, path)
             if h.get("idempotency-key", "").endswith(".undo")]
    assert len(undos) == 3
    assert all(h["authorization"] == f"Bearer {secret}" for h in undos)
    assert_in_no_journal_file(journal, secret)
    with contextlib.closing(sqlite3.connect(journal)) as db:
        assert db.execute("SELECT count(*) FROM secrets").fetchone() == (0,)

