"""Crash recovery and cancellation of atomic batches (SPEC section 5 "Journal", STYLE item 8).

The gateway runs as a real process (`python -m gateway serve --config ...`) against the demo
upstreams served in this test's event loop. An atomic batch is sent whose last call the upstream
holds open; once the upstream has received it the gateway is killed with SIGKILL. The journal on
disk then shows the batch unfinished; a restarted gateway (or `gateway recover`) rolls it back from
the journal alone, leaving the upstreams as they were before the batch, and running recovery again
changes nothing. A client that disconnects mid-batch does not stop the batch from finishing or
rolling back.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from gateway.atomicity.journal import JournaledBatch, SqliteJournal
from gateway.atomicity.state import BatchState
from gateway.demo.launcher import demo_config_data
from gateway.demo.services import FaultRule
from tests.conftest import MakeGateway, deep_merge, state_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
HOLD_MS = 30_000  # the upstream holds the last call open far longer than any test runs
OVERRIDES: dict[str, Any] = {
    "batch": {"rollback": {"attempts": 3, "initial_backoff": 0.01, "max_backoff": 0.05}},
    "shutdown_grace": 2,
}


# --- upstreams and a gateway process -------------------------------------------------------------


def seed(legacy: TestServer, ledger: TestServer) -> None:
    for n in (1, 2, 3):
        state_of(legacy).store.create({"item": f"order {n}"})
        state_of(ledger).store.create({"owner": f"owner {n}", "balance": 100 * n})


def records(*servers: TestServer) -> list[dict[str, Any]]:
    return [copy.deepcopy(state_of(server).store.records) for server in servers]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


class GatewayProcess:
    """`python -m gateway <command> --config <file>` with its output kept in files."""

    def __init__(self, config: Path, journal: Path, port: int, logs: Path) -> None:
        self.config, self.journal, self.port, self.logs = config, journal, port, logs
        self.base = f"http://127.0.0.1:{port}"
        self.process: asyncio.subprocess.Process | None = None
        self.env: dict[str, str] = {}
        """Extra environment for the next process (e.g. a test crash point)."""
        self._runs = 0

    async def _spawn(self, *args: str) -> asyncio.subprocess.Process:
        self._runs += 1
        out = open(self.logs / f"gateway-{self._runs}-{args[0]}.log", "wb")  # noqa: SIM115
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "--log-json", *args, "--config", str(self.config),
                cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        finally:
            out.close()

    async def serve(self) -> None:
        """Start `serve` and wait until /readyz says ready (i.e. start-up recovery is done)."""
        self.process = await self._spawn("serve")
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

    def kill(self) -> None:
        assert self.process is not None and self.process.returncode is None
        self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), 20)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await self.wait()

    async def recover(self) -> str:
        process = await self._spawn("recover")
        assert await asyncio.wait_for(process.wait(), 30) == 0, self.output()
        return (self.logs / f"gateway-{self._runs}-recover.log").read_text()

    def output(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-3000:] for path in sorted(self.logs.glob("*.log")))


@pytest.fixture
async def gateway_process(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    journal = tmp_path / "journal" / "journal.sqlite3"
    port = free_port()
    data = deep_merge(
        demo_config_data(url_of(legacy), url_of(ledger), port=port, journal=str(journal)), OVERRIDES
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    logs = tmp_path / "logs"
    logs.mkdir()
    gateway = GatewayProcess(config, journal, port, logs)
    try:
        yield gateway
    finally:
        if gateway.process is not None and gateway.process.returncode is None:
            gateway.process.kill()
            await gateway.process.wait()


async def read_journal(path: Path) -> tuple[list[JournaledBatch], dict[str, JournaledBatch]]:
    """(unfinished batches, every batch by id) straight from the journal file."""
    journal = SqliteJournal(path)
    await journal.open()
    try:
        unfinished = await journal.unfinished()
        cursor = await journal._conn.execute("SELECT batch_id FROM batches")
        ids = [row[0] for row in await cursor.fetchall()]
        everything = {batch_id: await journal.batch(batch_id) for batch_id in ids}
    finally:
        await journal.close()
    return unfinished, {k: v for k, v in everything.items() if v is not None}


async def until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    ends = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > ends:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def received(server: TestServer, method: str, path: str) -> bool:
    return any(c["method"] == method and c["path"] == path for c in state_of(server).calls)


def atomic_batch(*items: tuple[str, str, dict[str, Any] | None]) -> dict[str, Any]:
    singles = []
    for method, operation, body in items:
        single: dict[str, Any] = {"method": method, "operation": operation}
        if body is not None:
            single["body"] = body
        singles.append({"SingleItem": single})
    return {"Batch": {"batch_execution_type": "Serial", "items": singles}}


async def post_and_forget(base: str, document: dict[str, Any]) -> None:
    """Send a batch whose answer never comes (the gateway dies); any client error is expected."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(
                f"{base}/batch/v1", json=document, headers={"X-Batch-Atomic": "true"}
            ) as response:
                await response.read()
        except aiohttp.ClientError:
            pass


# --- SIGKILL while an atomic batch is in flight ------------------------------------------------


SPANNING = atomic_batch(
    ("POST", "/orders", {"item": "created"}),
    ("PUT", "/orders/1", {"item": "changed"}),
    ("DELETE", "/orders/2", None),
    ("POST", "/accounts", {"owner": "created"}),
    ("PUT", "/accounts/1", {"owner": "changed"}),  # held open by the ledger
)


@pytest.mark.parametrize("recover_by", ["restart", "recover-command"])
async def test_a_gateway_killed_mid_batch_is_rolled_back_from_the_journal(
    gateway_process: GatewayProcess, legacy: TestServer, ledger: TestServer, recover_by: str
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    hold = FaultRule(path_prefix="/accounts/1", method="PUT", delay_ms=HOLD_MS, times=1)
    state_of(ledger).faults.append(hold)
    await gateway_process.serve()

    client = asyncio.create_task(post_and_forget(gateway_process.base, SPANNING))
    await until(lambda: received(ledger, "PUT", "/accounts/1"), "the held call to arrive")
    # mid-batch: the compensated calls took effect, the ledger's transaction is open
    assert state_of(legacy).store.records != before[0]
    assert len(state_of(ledger).transactions) == 1
    gateway_process.kill()
    assert await gateway_process.wait() == -signal.SIGKILL
    await client

    # the journal on disk shows the batch unfinished, with what recovery needs
    [batch], _ = await read_journal(gateway_process.journal)
    assert batch.state is BatchState.RUNNING
    assert [(s.position, s.state) for s in batch.steps] == [(0, "done"), (1, "done"), (2, "done")]
    [tx] = batch.transactions
    assert tx.upstream == "ledger" and tx.state == "open"
    assert tx.token in state_of(ledger).transactions
    calls_before_recovery = len(state_of(legacy).calls), len(state_of(ledger).calls)

    if recover_by == "restart":
        await gateway_process.serve()  # ready only once start-up recovery is done
        await gateway_process.stop()
    else:
        output = await gateway_process.recover()
        assert batch.batch_id in output and "rolled_back" in output.lower()

    assert records(legacy, ledger) == before
    assert state_of(ledger).transactions == {}
    unfinished, batches = await read_journal(gateway_process.journal)
    assert unfinished == []
    recovered = batches[batch.batch_id]
    assert recovered.state is BatchState.ROLLED_BACK
    assert [s.undo_state for s in recovered.steps] == ["undone"] * 3
    assert [t.state for t in recovered.transactions] == ["rolled_back"]
    undo_keys = [
        dict(c["headers"]).get("Idempotency-Key") for c in state_of(legacy).calls[calls_before_recovery[0]:]
    ]
    assert undo_keys == [f"{batch.batch_id}.{p}.undo" for p in (2, 1, 0)]  # reverse completion

    # recovery is idempotent: running it again calls nobody and changes nothing
    calls = len(state_of(legacy).calls), len(state_of(ledger).calls)
    output = await gateway_process.recover()
    assert "recovered 0 unfinished batch(es)" in output
    await gateway_process.serve()
    await gateway_process.stop()
    assert (len(state_of(legacy).calls), len(state_of(ledger).calls)) == calls
    assert records(legacy, ledger) == before
    _, again = await read_journal(gateway_process.journal)
    assert again[batch.batch_id].state is BatchState.ROLLED_BACK


async def test_a_call_in_flight_at_the_crash_is_undone_from_its_journaled_snapshot(
    gateway_process: GatewayProcess, legacy: TestServer, ledger: TestServer
) -> None:
    """The held call is a compensated PUT: its intent and snapshot are journaled, its outcome
    never is. Recovery treats it as possibly executed and restores the snapshot."""
    seed(legacy, ledger)
    before = records(legacy, ledger)
    hold = FaultRule(path_prefix="/orders/3", method="PUT", delay_ms=HOLD_MS, times=1)
    state_of(legacy).faults.append(hold)
    document = atomic_batch(
        ("POST", "/accounts", {"owner": "created"}),
        ("PATCH", "/orders/1", {"item": "patched"}),
        ("PUT", "/orders/3", {"item": "held"}),
    )
    await gateway_process.serve()

    client = asyncio.create_task(post_and_forget(gateway_process.base, document))
    await until(lambda: received(legacy, "PUT", "/orders/3"), "the held call to arrive")
    gateway_process.kill()
    await gateway_process.wait()
    await client

    [batch], _ = await read_journal(gateway_process.journal)
    assert [(s.position, s.state) for s in batch.steps] == [(1, "done"), (2, "intent")]
    held = batch.steps[1]
    assert held.outcome is None and held.intent["snapshot"]["status"] == 200

    output = await gateway_process.recover()
    assert f"{batch.batch_id}: rolled_back" in output
    assert records(legacy, ledger) == before
    assert state_of(ledger).transactions == {}
    undos = [(c["method"], c["path"]) for c in state_of(legacy).calls if c["method"] != "GET"][-2:]
    assert undos == [("PUT", "/orders/3"), ("PUT", "/orders/1")]  # the in-flight call first

    await gateway_process.recover()
    assert records(legacy, ledger) == before
    unfinished, batches = await read_journal(gateway_process.journal)
    assert unfinished == [] and batches[batch.batch_id].state is BatchState.ROLLED_BACK


async def test_a_gateway_killed_while_compensating_finishes_the_rollback_on_restart(
    gateway_process: GatewayProcess, legacy: TestServer, ledger: TestServer
) -> None:
    """The batch failed and its undos were running: the one already done is not redone, the one
    in flight is sent again with the same Idempotency-Key."""
    seed(legacy, ledger)
    before = records(legacy, ledger)
    state_of(legacy).faults += [
        FaultRule(path_prefix="/orders/2", method="PATCH", status=500, times=1),
        FaultRule(path_prefix="/orders/4", method="DELETE", delay_ms=HOLD_MS, times=1),
    ]
    document = atomic_batch(
        ("POST", "/orders", {"item": "created"}),
        ("PUT", "/orders/1", {"item": "changed"}),
        ("PATCH", "/orders/2", {"item": "fails"}),
    )
    await gateway_process.serve()

    client = asyncio.create_task(post_and_forget(gateway_process.base, document))
    await until(lambda: received(legacy, "DELETE", "/orders/4"), "the held undo to arrive")
    gateway_process.kill()
    await gateway_process.wait()
    await client

    [batch], _ = await read_journal(gateway_process.journal)
    assert batch.state is BatchState.COMPENSATING
    assert [(s.position, s.state, s.undo_state) for s in batch.steps] == [
        (0, "done", None), (1, "done", "undone"), (2, "failed", None),
    ]
    undo_puts = sum(1 for c in state_of(legacy).calls if c["method"] == "PUT")

    await gateway_process.serve()
    await gateway_process.stop()

    assert records(legacy, ledger) == before
    deletes = [dict(c["headers"])["Idempotency-Key"] for c in state_of(legacy).calls
               if c["method"] == "DELETE"]
    assert deletes == [f"{batch.batch_id}.0.undo"] * 2
    assert sum(1 for c in state_of(legacy).calls if c["method"] == "PUT") == undo_puts
    _, batches = await read_journal(gateway_process.journal)
    assert batches[batch.batch_id].state is BatchState.ROLLED_BACK


# --- a client that goes away mid-batch -------------------------------------------------------


@pytest.fixture
async def gateway_url(make_gateway: MakeGateway) -> str:
    """An in-process gateway; aiohttp's test server cancels a handler whose client disconnects,
    so the shield around the atomic run is what keeps the batch going."""
    client = await make_gateway(OVERRIDES)
    return str(client.make_url("")).rstrip("/")


async def disconnect_mid_batch(
    base: str, document: dict[str, Any], in_flight: Callable[[], bool]
) -> None:
    """Send the batch, and once `in_flight` says the slow call is under way, go away."""
    request = asyncio.create_task(post_and_forget(base, document))
    await until(in_flight, "the batch to be under way")
    request.cancel()  # closes the connection; the gateway cancels its handler
    with pytest.raises(asyncio.CancelledError):
        await request


@pytest.mark.parametrize("phase", ["forward calls", "compensation"])
async def test_a_client_that_disconnects_does_not_stop_the_rollback(
    gateway_url: str, legacy: TestServer, ledger: TestServer, phase: str
) -> None:
    seed(legacy, ledger)
    before = records(legacy, ledger)
    if phase == "forward calls":  # the last call is slow, then fails
        slow = FaultRule(path_prefix="/accounts/2", method="PATCH", delay_ms=500, status=500)
        state_of(ledger).faults.append(slow)
    else:  # the last call fails at once; undoing the POST is slow
        state_of(ledger).faults.append(FaultRule(path_prefix="/accounts/2", method="PATCH", status=500))
        state_of(legacy).faults.append(FaultRule(path_prefix="/orders/4", method="DELETE", delay_ms=500))
    document = atomic_batch(
        ("POST", "/orders", {"item": "created"}),
        ("PUT", "/orders/1", {"item": "changed"}),
        ("POST", "/accounts", {"owner": "created"}),
        ("PATCH", "/accounts/2", {"balance": 0}),
    )

    slow_call = ("PATCH", "/accounts/2") if phase == "forward calls" else ("DELETE", "/orders/4")
    slow_server = ledger if phase == "forward calls" else legacy
    await disconnect_mid_batch(gateway_url, document, lambda: received(slow_server, *slow_call))
    assert records(legacy, ledger) != before  # the batch was still going when the client left

    await until(
        lambda: records(legacy, ledger) == before and not state_of(ledger).transactions,
        "the batch to be rolled back",
    )
    assert received(legacy, "DELETE", "/orders/4")


async def test_a_client_that_disconnects_does_not_stop_the_commit(
    gateway_url: str, legacy: TestServer, ledger: TestServer
) -> None:
    seed(legacy, ledger)
    state_of(ledger).faults.append(FaultRule(path_prefix="/accounts/2", method="PATCH", delay_ms=500))
    document = atomic_batch(
        ("POST", "/orders", {"item": "created"}),
        ("PATCH", "/accounts/2", {"balance": 0}),
    )
    await disconnect_mid_batch(
        gateway_url, document, lambda: received(ledger, "PATCH", "/accounts/2")
    )
    assert state_of(ledger).store.records["2"]["balance"] == 200  # not committed yet
    await until(lambda: state_of(ledger).store.records["2"]["balance"] == 0, "the commit")
    assert state_of(ledger).transactions == {}
    assert state_of(legacy).store.records["4"]["item"] == "created"
