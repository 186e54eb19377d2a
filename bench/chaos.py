"""Chaos run for atomic batches (issue 18): SIGKILL gateways under concurrent atomic traffic, then
check every batch all-or-nothing against the upstreams' state.

    python -m bench.chaos [--seconds 60] [--clients 16] [--gateways 2] [--kill-every 5]
                          [--idempotency-keys on|off] [--seed N] [--workdir DIR] [--show 20]

Not part of the pytest run; bounded by `--seconds` of traffic plus about 10 s of start-up, shutdown
and checking. Exit 0 when every batch is all-or-nothing, 1 when some are not (the violations are
listed with their tags and journal rows), 2 when the run itself could not be set up.

What it does
------------
- The demo upstreams `legacy` (/orders, compensation) and `ledger` (/accounts, transaction tokens)
  run in this script's event loop on 127.0.0.1, so their in-memory state is read directly at the
  end. `--idempotency-keys on|off` sets both the services' `honour_idempotency_keys` and the
  upstreams' `idempotency_keys` in the gateway config.
- G gateway processes (`python -m gateway serve --config <yaml>`), each with its own port and
  journal under the work directory (kept after the run, with the processes' logs).
- C clients loop sending atomic batches to a random ready gateway: JSON (`/batch/v1` with
  `X-Batch-Atomic: true`) or multipart (`/v1/api/batch`, atomic by default), Serial or Unordered.
  Every batch has a unique tag T (`s<seed>-c<client>-<seq>`), sent as `X-Request-ID`, which the
  journal keeps in the batch's headers: that is how a batch whose answer never came is found in a
  journal.
- Every `--kill-every` seconds one gateway (round robin) is marked not ready, SIGKILLed and
  restarted; `serve` runs start-up recovery before `/readyz` answers 200.
- At the end the clients stop, the gateways get SIGTERM, `python -m gateway recover --config` runs
  for each journal (exit 3: some batches need an operator), and every batch is checked.

The batch design, and why it is checkable
-----------------------------------------
Client c owns three records, seeded before the run: order `o<c>` and account `a<c>` (patched by
every batch of c) and order `p<c>` (replaced by some). A batch of client c with sequence number s
and tag T holds, shuffled:

- `POST /orders {"created_by": T}`                    effect: exactly one order with created_by T
- `PATCH /orders/o<c> {"last": T, "h<s>": T}`         effect: key h<s> in o<c>
- `PATCH /accounts/a<c> {"last": T, "h<s>": T}`       effect: key h<s> in a<c> (in a transaction)
- half the time `PUT /accounts/n-<T> {"created_by": T}`   effect: account n-<T> exists
- half the time `PUT /orders/p<c> {"put_by": T, "seq": s}` effect: see "last writer" below
- sometimes a `GET /orders/o<c>` (read-only)

PATCH merges shallowly, so every applied batch leaves its own `h<s>` key in both owned records and
a rolled-back one leaves none (the undo restores the snapshot taken before the call): each batch's
effect on each record is visible on its own, not only the last one. The `PUT /orders/p<c>` is
checked as "last writer": p<c> shows the latest applied PUT; a batch whose seq is above the visible
writer's must not have applied, one below it is not observable and is left out of the check.
Accounts are created with `PUT /accounts/n-<T>`, not `POST /accounts`: the demo ledger forks its
whole store (including the next id) per transaction and merges touched keys on commit, so two
concurrent transactions that each POST get the same id and the later commit overwrites the other's
record. That is a limitation of the demo service, and it would show up here as partial batches
that have nothing to do with the gateway.

About one batch in five ends with an item that fails: `GET /accounts/999999` (404, inside the
transaction), `GET /orders/o<c>` with `X-Demo-Fail: 500`, or `PATCH /orders/nope-<T>` (404, a
failing write). In Serial it is the last item, in Unordered it runs alongside the others; either
way the whole batch must be rolled back.

A client sends one batch at a time. When an answer never comes (the gateway died), the client
waits until that gateway has been restarted and is ready (its start-up recovery has settled the
batch) before it sends the next one: otherwise recovery of the old batch could restore a snapshot
of o<c> over a newer batch's change, a lost update that compensation cannot prevent and that this
check would rightly count.

Per batch, the effects present are counted: all present -> applied, none -> absent, some ->
**partial**. Violations (exit 1): partial; an order created twice for one tag; an answer
`committed` that is not applied or `rolled_back` that is not absent (also 4xx/5xx answers and
refused connections, which must be absent); a batch meant to fail that is applied; a journal state
`committed`/`rolled_back` that disagrees with the upstreams; a batch with effects but no journal
row; a batch still unfinished in a journal after `gateway recover`. A partial batch the journal
marks `rollback_incomplete` was reported honestly (an operator is told) and is listed as such, but
it still counts as a violation of all-or-nothing. Open transactions left on the ledger are counted
too (the gateway begins them with a lifetime, so they would expire on their own later).

Given `--seed`, each client's sequence of batches (calls, format, mode, failing item) is the same
from run to run; which gateway gets a batch (a random ready one), how many batches fit in the time
and where the kills land relative to them depend on timing and are not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from gateway.atomicity.journal import JournaledBatch, SqliteJournal
from gateway.demo.launcher import demo_config_data, start_site
from gateway.demo.services import DEMO_STATE, DemoState, ledger_app, legacy_app

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
OVERRIDES: dict[str, Any] = {
    "batch": {"rollback": {"attempts": 3, "initial_backoff": 0.01, "max_backoff": 0.05}},
    "shutdown_grace": 2,
}
FINAL = ("committed", "rolled_back", "rollback_incomplete", "resolved")
FAIL_KINDS = ("get404", "fault500", "patch404")
READY_SECONDS = 30.0
CLIENT_TIMEOUT = 60.0


# -- batches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Sent:
    """One batch as its client saw it: what it holds and what the gateway answered."""

    tag: str
    client: int
    seq: int
    fmt: str  # json | multipart
    mode: str  # Serial | Unordered
    fail: str | None  # the kind of deliberately failing item, or None
    effects: tuple[str, ...]
    gateway: int
    answer: str = "pending"
    """committed | rolled_back | rollback_incomplete | http-<status> | lost | refused | no-outcome"""
    batch_id: str | None = None
    detail: str = ""
    seconds: float = 0.0


def own_order(client: int) -> str:
    return f"o{client:02d}"


def put_order(client: int) -> str:
    return f"p{client:02d}"


def own_account(client: int) -> str:
    return f"a{client:02d}"


def history_key(seq: int) -> str:
    return f"h{seq:05d}"


def build_batch(
    rng: random.Random, client: int, seq: int, tag: str
) -> tuple[list[Call], list[str], str | None]:
    """The calls of one batch, the effects it must have if applied, and its failing item's kind."""
    history = {"last": tag, history_key(seq): tag}
    calls = [
        Call("POST", "/orders", {"created_by": tag, "client": client}),
        Call("PATCH", f"/orders/{own_order(client)}", dict(history)),
        Call("PATCH", f"/accounts/{own_account(client)}", dict(history)),
    ]
    effects = ["order_created", "order_patched", "account_patched"]
    if rng.random() < 0.5:
        calls.append(Call("PUT", f"/accounts/n-{tag}", {"created_by": tag, "client": client}))
        effects.append("account_created")
    if rng.random() < 0.5:
        replacement = {"put_by": tag, "seq": seq, "client": client}
        calls.append(Call("PUT", f"/orders/{put_order(client)}", replacement))
        effects.append("order_put")
    if rng.random() < 0.3:
        calls.append(Call("GET", f"/orders/{own_order(client)}"))
    rng.shuffle(calls)
    fail: str | None = None
    if rng.random() < 0.2:
        fail = rng.choice(FAIL_KINDS)
        if fail == "get404":
            calls.append(Call("GET", "/accounts/999999"))
        elif fail == "fault500":
            calls.append(Call("GET", f"/orders/{own_order(client)}", headers={"X-Demo-Fail": "500"}))
        else:
            calls.append(Call("PATCH", f"/orders/nope-{tag}", {"last": tag}))
    return calls, effects, fail


def json_body(calls: Sequence[Call], mode: str) -> bytes:
    items = []
    for call in calls:
        single: dict[str, Any] = {"method": call.method, "operation": call.path}
        if call.body is not None:
            single["body"] = call.body
        if call.headers:
            single["headers"] = call.headers
        items.append({"SingleItem": single})
    return json.dumps({"Batch": {"batch_execution_type": mode, "items": items}}).encode()


def multipart_body(calls: Sequence[Call]) -> tuple[bytes, str]:
    """As tests/test_atomic_fault_matrix.py builds it: one application/http part per call."""
    boundary = "chaos-boundary-7f3a"
    chunks = []
    for position, call in enumerate(calls):
        body = b"" if call.body is None else json.dumps(call.body).encode()
        lines = [f"{call.method} {call.path} HTTP/1.1", "Host: gateway"]
        if call.body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in call.headers.items()]
        request = "\r\n".join([*lines, "", ""]).encode() + body
        head = f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <{position}>\r\n\r\n"
        chunks.append(head.encode() + request + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/mixed; boundary={boundary}"


# -- gateway processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Gateway:
    """One `python -m gateway serve` process, restartable; its logs go to files in `workdir`."""

    def __init__(self, index: int, workdir: Path, legacy_url: str, ledger_url: str, keys: bool) -> None:
        self.index = index
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.journal = workdir / f"journal-{index}.sqlite3"
        self.config = workdir / f"gateway-{index}.yaml"
        self.logs = workdir / "logs"
        data = demo_config_data(
            legacy_url, ledger_url, port=self.port, journal=str(self.journal), idempotency_keys=keys
        )
        self.config.write_text(yaml.safe_dump(deep_merge(data, OVERRIDES)))
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.generation = 0
        self.runs = 0
        self.kills = 0
        self.unexpected_exits: list[int] = []
        self.ready_seconds: list[float] = []

    async def _spawn(self, command: str) -> tuple[asyncio.subprocess.Process, Path]:
        self.runs += 1
        log = self.logs / f"gateway-{self.index}-{self.runs:03d}-{command}.log"
        with open(log, "wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "--log-json", "--log-level", "WARNING", command,
                "--config", str(self.config), cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return process, log

    async def start(self) -> None:
        """Start `serve` and wait for /readyz (start-up recovery is done before it turns ready)."""
        started = time.monotonic()
        self.process, log = await self._spawn("serve")
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < started + READY_SECONDS:
                if self.process.returncode is not None:
                    raise RuntimeError(f"gateway {self.index} exited {self.process.returncode}; see {log}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(f"{self.base}/_gateway/readyz") as response:
                        if response.status == 200:
                            self.ready_seconds.append(time.monotonic() - started)
                            self.generation += 1
                            self.ready = True
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"gateway {self.index} not ready after {READY_SECONDS} s; see {log}")

    async def kill(self) -> None:
        """SIGKILL (clients stop picking it first) and reap."""
        self.ready = False
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
            self.kills += 1

    async def stop(self) -> int | None:
        """SIGTERM and wait for the shutdown grace; SIGKILL if it takes too long."""
        self.ready = False
        if self.process is None or self.process.returncode is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            return -999

    def exited_on_its_own(self) -> bool:
        return self.ready and self.process is not None and self.process.returncode is not None

    async def recover(self) -> tuple[int, str]:
        process, log = await self._spawn("recover")
        code = await asyncio.wait_for(process.wait(), 120)
        return code, log.read_text(errors="replace")


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    gateways: list[Gateway]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[Sent] = field(default_factory=list)
    kill_log: list[tuple[float, int]] = field(default_factory=list)
    lost_without_kill: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    code: tuple[str, str] = ("", "")
    """The gateway code (see code_version) when the run started and when it ended."""
    stop_codes: list[int | None] = field(default_factory=list)
    recovered: list[tuple[int, str]] = field(default_factory=list)
    journal_counts: list[Counter[str]] = field(default_factory=list)
    untagged: list[str] = field(default_factory=list)
    traffic: float = 0.0


async def client_loop(run: Run, client: int) -> None:
    rng = random.Random(f"{run.args.seed}:{client}")
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    connector = aiohttp.TCPConnector(force_close=True)  # a killed gateway leaves no stale connection
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        seq = 0
        while not run.stop.is_set():
            ready = [g for g in run.gateways if g.ready]
            if not ready:
                await asyncio.sleep(0.05)
                continue
            seq += 1
            tag = f"s{run.args.seed}-c{client:02d}-{seq:05d}"
            calls, effects, fail = build_batch(rng, client, seq, tag)
            fmt = rng.choice(("json", "multipart"))
            mode = rng.choice(("Serial", "Unordered"))
            gateway = ready[rng.randrange(len(ready))]
            sent = Sent(tag, client, seq, fmt, mode, fail, tuple(effects), gateway.index)
            run.sent.append(sent)
            generation = gateway.generation
            await send(session, gateway, sent, calls)
            if sent.answer == "lost":
                await wait_for_restart(run, gateway, generation, sent)


async def send(session: aiohttp.ClientSession, gateway: Gateway, sent: Sent, calls: list[Call]) -> None:
    headers = {"X-Request-ID": sent.tag}
    if sent.fmt == "json":
        url, body = f"{gateway.base}/batch/v1", json_body(calls, sent.mode)
        headers |= {"Content-Type": "application/json", "X-Batch-Atomic": "true"}
    else:
        url, (body, content_type) = f"{gateway.base}/v1/api/batch", multipart_body(calls)
        headers |= {"Content-Type": content_type, "X-Batch-Execution": sent.mode}
    started = time.monotonic()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            sent.batch_id = response.headers.get("X-Batch-Id")
            if response.status != 200:
                sent.answer = f"http-{response.status}"
                sent.detail = payload[:300].decode(errors="replace")
            else:
                sent.answer = response.headers.get("X-Batch-Outcome", "no-outcome")
    except aiohttp.ClientConnectorError as exc:
        sent.answer, sent.detail = "refused", str(exc)
    except (TimeoutError, aiohttp.ClientError) as exc:
        sent.answer, sent.detail = "lost", f"{type(exc).__name__}: {exc}"
    sent.seconds = time.monotonic() - started


async def wait_for_restart(run: Run, gateway: Gateway, generation: int, sent: Sent) -> None:
    """Until the gateway that lost the answer was restarted and its recovery settled the batch."""
    ends = time.monotonic() + max(60.0, 3 * run.args.kill_every)
    while time.monotonic() < ends:
        if gateway.generation > generation and gateway.ready:
            return
        await asyncio.sleep(0.05)
    run.lost_without_kill.append(f"{sent.tag} (gateway {gateway.index}: {sent.detail})")


async def killer(run: Run) -> None:
    """Every kill_every seconds SIGKILL the next gateway and restart it; also restart one that died."""
    turn = 0
    next_kill = time.monotonic() + run.args.kill_every
    while not run.stop.is_set():
        for gateway in run.gateways:
            if gateway.exited_on_its_own():
                assert gateway.process is not None and gateway.process.returncode is not None
                gateway.unexpected_exits.append(gateway.process.returncode)
                gateway.ready = False
                await gateway.start()
        if time.monotonic() >= next_kill and run.args.kill_every > 0:
            gateway = run.gateways[turn % len(run.gateways)]
            turn += 1
            await gateway.kill()
            run.kill_log.append((time.monotonic() - run.started, gateway.index))
            await gateway.start()
            next_kill = max(next_kill + run.args.kill_every, time.monotonic())  # on a fixed beat
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.stop.wait(), 0.1)


# -- upstreams ----------------------------------------------------------------------------------


def seed_upstreams(legacy: DemoState, ledger: DemoState, clients: int) -> None:
    for n in (1, 2, 3):
        legacy.store.create({"item": f"order {n}"})
        ledger.store.create({"owner": f"owner {n}", "balance": 100 * n})
    for c in range(clients):
        legacy.store.put(own_order(c), {"owner": c})
        legacy.store.put(put_order(c), {"owner": c, "seq": 0})
        ledger.store.put(own_account(c), {"owner": c, "balance": 100})


# -- checking -----------------------------------------------------------------------------------


@dataclass
class JournalRow:
    journal: int
    batch: JournaledBatch


async def read_journals(
    gateways: list[Gateway],
) -> tuple[dict[str, JournalRow], list[Counter[str]], list[str]]:
    """tag -> journal row (by X-Request-ID), per-journal state counts, rows without a known tag."""
    by_tag: dict[str, JournalRow] = {}
    counts: list[Counter[str]] = []
    untagged: list[str] = []
    for gateway in gateways:
        journal = SqliteJournal(gateway.journal)
        await journal.open()
        states: Counter[str] = Counter()
        try:
            for summary in await journal.summaries(everything=True, limit=10**9):
                states[summary.state if summary.state in FINAL else "unfinished"] += 1
                if (summary.detail or "").startswith("recovered after restart"):
                    states["recovered_at_restart"] += 1
                if "rolled forward" in (summary.detail or ""):
                    states["rolled_forward"] += 1
                batch = await journal.batch(summary.batch_id)
                if batch is None:
                    continue
                request_id = next((v for k, v in batch.headers if k.lower() == "x-request-id"), None)
                if request_id is None:
                    untagged.append(f"{gateway.index}:{summary.batch_id}")
                    continue
                by_tag[request_id] = JournalRow(gateway.index, batch)
        finally:
            await journal.close()
        counts.append(states)
    return by_tag, counts, untagged


@dataclass
class Verdict:
    sent: Sent
    present: dict[str, bool | None]
    created_orders: int
    journal: JournalRow | None
    problems: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        seen = [v for v in self.present.values() if v is not None]
        if seen and all(seen):
            return "applied"
        if not any(seen):
            return "absent"
        return "partial"

    @property
    def journal_state(self) -> str:
        return "no journal row" if self.journal is None else self.journal.batch.state.value


def judge(
    sent: list[Sent], legacy: DemoState, ledger: DemoState, rows: dict[str, JournalRow]
) -> list[Verdict]:
    orders, accounts = legacy.store.records, ledger.store.records
    created = Counter(str(r["created_by"]) for r in orders.values() if "created_by" in r)
    verdicts = []
    for batch in sent:
        own_o = orders.get(own_order(batch.client), {})
        own_a = accounts.get(own_account(batch.client), {})
        writer = orders.get(put_order(batch.client), {})
        key = history_key(batch.seq)
        present: dict[str, bool | None] = {}
        for effect in batch.effects:
            if effect == "order_created":
                present[effect] = created[batch.tag] > 0
            elif effect == "order_patched":
                present[effect] = own_o.get(key) == batch.tag
            elif effect == "account_patched":
                present[effect] = own_a.get(key) == batch.tag
            elif effect == "account_created":
                present[effect] = f"n-{batch.tag}" in accounts
            elif effect == "order_put":
                if writer.get("put_by") == batch.tag:
                    present[effect] = True
                elif int(writer.get("seq", 0)) < batch.seq:
                    present[effect] = False
                else:
                    present[effect] = None  # overwritten by a later applied batch of this client
        verdict = Verdict(batch, present, created[batch.tag], rows.get(batch.tag))
        verdict.problems = problems_of(verdict)
        verdicts.append(verdict)
    return verdicts


def problems_of(v: Verdict) -> list[str]:
    problems = []
    state, answer = v.state, v.sent.answer
    if state == "partial":
        problems.append("partial")
    if v.created_orders > 1:
        problems.append(f"order created {v.created_orders} times")
    if answer == "committed" and state != "applied":
        problems.append(f"answered committed but {state}")
    if (answer == "rolled_back" or answer == "refused" or answer.startswith("http-")) and state != "absent":
        problems.append(f"answered {answer} but {state}")
    if v.sent.fail is not None and state == "applied":
        problems.append(f"meant to fail ({v.sent.fail}) but applied")
    journal = v.journal_state
    if journal == "committed" and state != "applied":
        problems.append(f"journal committed but {state}")
    if journal == "rolled_back" and state != "absent":
        problems.append(f"journal rolled_back but {state}")
    if journal == "no journal row" and state != "absent":
        problems.append(f"no journal row but {state}")
    if journal not in (*FINAL, "no journal row"):
        problems.append(f"journal still {journal} after recover")
    return problems


def describe(v: Verdict) -> list[str]:
    """A violation with its effects and its journal rows, for the report."""
    s = v.sent
    effects = " ".join(f"{k}={'?' if p is None else int(p)}" for k, p in v.present.items())
    lines = [
        f"  {s.tag}  {'; '.join(v.problems)}",
        f"    {s.fmt}/{s.mode} fail={s.fail} gateway={s.gateway} answer={s.answer} after {s.seconds:.2f}s"
        f" batch_id={s.batch_id} {s.detail[:160]}",
        f"    effects: {effects}",
    ]
    if v.journal is None:
        lines.append("    journal: no row")
        return lines
    b = v.journal.batch
    lines.append(f"    journal {v.journal.journal}: {b.batch_id} {b.state.value}: {(b.detail or '')[:400]}")
    for tx in b.transactions:
        lines.append(f"      tx {tx.upstream}: {tx.state} token={'yes' if tx.token else 'no'}")
    for step in b.steps:
        where = step.intent.get("where", "")
        method, path = step.intent.get("method"), step.intent.get("path")
        status = (step.outcome or {}).get("status")
        lines.append(
            f"      step {step.position} {where} {method} {path}: {step.state} status={status} seq={step.seq}"
            f" undo={step.undo_state} {(step.undo_detail or '')[:200]}"
        )
    return lines


# -- report -------------------------------------------------------------------------------------


def code_version() -> str:
    """HEAD, how many files under gateway/ differ from it, and a digest of gateway/**/*.py as on disk.

    Gateway processes import the code when they (re)start, so a tree edited during a run would
    give a run of mixed versions: the report says so.
    """
    digest = hashlib.sha256()
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=False).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "gateway"], cwd=ROOT,
                                 capture_output=True, text=True, check=False).stdout.splitlines()
    except OSError:
        head, changed = "?", []
    return f"{head or '?'} + {len(changed)} changed file(s) under gateway/, digest {digest.hexdigest()[:12]}"


def log_errors(workdir: Path) -> Counter[str]:
    """error/critical events in the gateways' logs (JSON lines), and lines that are not JSON."""
    events: Counter[str] = Counter()
    for path in sorted((workdir / "logs").glob("*-serve.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                events["non-JSON output (traceback?)"] += 1
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical", "exception"):
                events[str(entry.get("event"))] += 1
    return events


INCOMPLETE_REASONS = (
    (r"the id of a resource it may have created is unknown", "create with unknown outcome"),
    (r"token was never recorded", "transaction token never journaled"),
    (r"may or may not have landed", "commit re-sent, answer ambiguous"),
    (r"rollback on '[^']*' answered 4\d\d", "rollback re-sent, answered 4xx"),
    (r"already committed", "transaction already committed"),
)


def incomplete_reasons(details: list[str]) -> Counter[str]:
    """Batches per reason (one batch may give several)."""
    reasons: Counter[str] = Counter()
    for detail in details:
        found = [name for pattern, name in INCOMPLETE_REASONS if re.search(pattern, detail)]
        reasons.update(found or [detail[:80]])
    return reasons


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def fmt_counter(counter: Counter[str], order: Sequence[str] = ()) -> str:
    keys = [k for k in order if k in counter] + sorted(k for k in counter if k not in order)
    return ", ".join(f"{k} {counter[k]}" for k in keys) or "-"


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gateway-chaos-"))
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    keys = args.idempotency_keys == "on"
    legacy, ledger = legacy_app(), ledger_app()
    legacy_state, ledger_state = legacy[DEMO_STATE], ledger[DEMO_STATE]
    for state in (legacy_state, ledger_state):
        state.honour_idempotency_keys = keys
    seed_upstreams(legacy_state, ledger_state, args.clients)
    runners: list[web.AppRunner] = []
    legacy_runner, legacy_url = await start_site(legacy)
    runners.append(legacy_runner)
    ledger_runner, ledger_url = await start_site(ledger)
    runners.append(ledger_runner)
    gateways = [Gateway(i, workdir, legacy_url, ledger_url, keys) for i in range(args.gateways)]
    print(f"chaos: workdir {workdir}; {args.clients} clients, {args.gateways} gateway(s), kill every "
          f"{args.kill_every} s, idempotency keys {args.idempotency_keys}, seed {args.seed}, "
          f"{args.seconds} s of traffic", flush=True)
    try:
        code = code_version()
        await asyncio.gather(*(g.start() for g in gateways))
        run = Run(args, gateways, code=(code, ""))
        clients = [asyncio.create_task(client_loop(run, c)) for c in range(args.clients)]
        kills = asyncio.create_task(killer(run))
        await asyncio.sleep(args.seconds)
        run.stop.set()
        await kills  # a kill in progress finishes with its restart
        await asyncio.wait_for(asyncio.gather(*clients), CLIENT_TIMEOUT + 90)
        run.traffic = time.monotonic() - run.started
        run.stop_codes = [await g.stop() for g in gateways]
        run.recovered = [await g.recover() for g in gateways]
        run.code = (run.code[0], code_version())
        rows, run.journal_counts, run.untagged = await read_journals(gateways)
        verdicts = judge(run.sent, legacy_state, ledger_state, rows)
        print(report(run, verdicts, legacy_state, ledger_state, workdir))
        return 1 if any(v.problems for v in verdicts) else 0
    finally:
        for gateway in gateways:
            if gateway.process is not None and gateway.process.returncode is None:
                gateway.process.kill()
                await gateway.process.wait()
        for runner in runners:
            await runner.cleanup()


def report(run: Run, verdicts: list[Verdict], legacy: DemoState, ledger: DemoState, workdir: Path) -> str:
    args, sent, traffic = run.args, run.sent, run.traffic
    elapsed = time.monotonic() - run.started
    answers = Counter(s.answer for s in sent)
    shapes = Counter(f"{s.fmt}/{s.mode}" for s in sent)
    fails = Counter(s.fail or "none" for s in sent)
    states = Counter(v.state for v in verdicts)
    violations = [v for v in verdicts if v.problems]
    partial = [v for v in verdicts if v.state == "partial"]
    incomplete = [v for v in verdicts if v.journal_state == "rollback_incomplete"]
    now = time.monotonic()
    expired = sum(1 for t in ledger.transactions if ledger.expires.get(t, float("inf")) <= now)
    holding = sum(1 for view in ledger.transactions.values() if view.touched)
    reasons = incomplete_reasons([v.journal.batch.detail or "" for v in incomplete if v.journal is not None])
    errors = log_errors(workdir)
    by_answer_state = Counter(f"{v.sent.answer}->{v.state}" for v in verdicts)
    lost_journal = Counter(v.journal_state for v in verdicts if v.sent.answer == "lost")
    ready = [s for g in run.gateways for s in g.ready_seconds]
    rows: list[tuple[str, str]] = [
        ("run", f"{args.clients} clients, {args.gateways} gateway(s), kill every {args.kill_every} s, "
                f"idempotency keys {args.idempotency_keys}, seed {args.seed}"),
        ("elapsed", f"{traffic:.1f} s of traffic, {elapsed:.1f} s with shutdown, recover and check"),
        ("batches sent", f"{len(sent)} ({len(sent) / max(traffic, 1e-9):.1f}/s): {fmt_counter(shapes)}"),
        ("meant to fail", fmt_counter(fails, ("none", *FAIL_KINDS))),
        ("answered", fmt_counter(Counter({k: n for k, n in answers.items() if k not in ("lost", "refused")}),
                                 ("committed", "rolled_back", "rollback_incomplete"))),
        ("unanswered", f"lost {answers['lost']} (connection dropped mid-batch), "
                       f"refused {answers['refused']}"),
        ("lost -> journal", fmt_counter(lost_journal, FINAL)),
        ("kills", f"{len(run.kill_log)} SIGKILL + restart; unexpected exits "
                  f"{sum(len(g.unexpected_exits) for g in run.gateways)}; restart-to-ready "
                  f"{(sum(ready) / len(ready)) if ready else 0:.2f} s mean, "
                  f"{max(ready, default=0):.2f} s max"),
        ("lost, no restart", str(len(run.lost_without_kill)) + (
            f": {', '.join(run.lost_without_kill[:5])}" if run.lost_without_kill else "")),
        ("gateway log errors", fmt_counter(errors)),
        ("SIGTERM exit codes", ", ".join(str(c) for c in run.stop_codes)),
        ("gateway recover", "; ".join(
            f"journal {i}: exit {code}" + (f" ({_needs_operator(out)} need an operator)" if code == 3 else "")
            for i, (code, out) in enumerate(run.recovered))),
    ]
    for i, counts in enumerate(run.journal_counts):
        rows.append((f"journal {i} states", fmt_counter(counts, (*FINAL, "unfinished"))))
    rows += [
        ("journal rows untagged", str(len(run.untagged))),
        ("upstream check", fmt_counter(states, ("applied", "absent", "partial"))),
        ("answer -> upstreams", fmt_counter(by_answer_state)),
        ("partial batches", f"{len(partial)}" + (
            f" (journal: {fmt_counter(Counter(v.journal_state for v in partial))})" if partial else "")),
        ("rollback_incomplete", f"{len(incomplete)}" + (
            f" (reasons, a batch may give several: {fmt_counter(reasons)})" if incomplete else "")),
        ("open transactions", f"ledger {len(ledger.transactions)} ({holding} holding changes, {expired} past "
                              f"their lifetime), legacy {len(legacy.transactions)}"),
        ("records", f"orders {len(legacy.store.records)}, accounts {len(ledger.store.records)}"),
        ("violations", str(len(violations))),
        ("gateway code", run.code[0] + ("" if run.code[1] == run.code[0] else
                                        f"; CHANGED during the run, at the end: {run.code[1]}")),
        ("workdir", str(workdir)),
    ]
    out = ["", table(rows)]
    if violations:
        out += ["", f"violations ({len(violations)}; first {args.show} in detail):"]
        for v in violations[: args.show]:
            out += describe(v)
        rest = violations[args.show:]
        if rest:
            out.append("  more: " + ", ".join(f"{v.sent.tag} [{'; '.join(v.problems)}]" for v in rest))
    if incomplete:
        out += ["", "rollback_incomplete batches (tag: journal detail):"]
        for v in incomplete[: args.show]:
            detail = v.journal.batch.detail if v.journal is not None else ""
            out.append(f"  {v.sent.tag} [{v.state}, answer {v.sent.answer}]: {(detail or '')[:300]}")
    out.append("")
    out.append("RESULT: " + ("FAIL" if violations else "PASS") + f" ({len(violations)} violation(s))")
    return "\n".join(out)


def _needs_operator(output: str) -> int:
    return sum(1 for line in output.splitlines() if line.startswith("needs an operator:"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of traffic (default 60)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between SIGKILLs (0: none)")
    parser.add_argument("--idempotency-keys", choices=("on", "off"), default="on")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="journals, configs, logs (default: a new temp dir)")
    parser.add_argument("--show", type=int, default=20, help="violations shown in detail")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.gateways < 1 or args.seconds <= 0 or args.kill_every < 0:
        parser.error("--clients and --gateways must be >= 1, --seconds > 0, --kill-every >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    except RuntimeError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
