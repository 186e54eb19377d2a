"""Recovery edge cases: a journaled upstream that is no longer configured; which headers an undo keeps.

The journal is a real SQLite file; the upstream pool is real (nothing is called in these cases).
"""

from __future__ import annotations

from pathlib import Path

from gateway.atomicity.compensation import gateway_headers
from gateway.atomicity.journal import SqliteJournal
from gateway.atomicity.plan import UndoKind, UndoSpec
from gateway.atomicity.recovery import Recovery
from gateway.atomicity.state import BatchState
from gateway.routing import RouteTable
from gateway.upstream import UpstreamPool
from tests.conftest import MakeConfig


async def test_a_batch_on_an_upstream_removed_from_the_config_is_kept_unfinished(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    config = make_config()
    journal = SqliteJournal(tmp_path / "old.sqlite3")
    await journal.open()
    await journal.batch_state("b1", BatchState.RUNNING)
    intent = {
        "where": "part 1", "upstream": "gone", "method": "PUT", "url": "http://127.0.0.1:1/x/1",
        "path": "/x/1", "headers": [], "body_b64": "",
        "undo": UndoSpec(kind=UndoKind.RESTORE, snapshot_path="/x/1").to_json(),
    }
    await journal.step_intent("b1", 0, intent)
    pool = UpstreamPool(config, max_response_bytes=1024)
    await pool.start()
    try:
        report = await Recovery(config, RouteTable(config), pool, journal).run()
        unfinished = await journal.unfinished()
    finally:
        await pool.close()
        await journal.close()
    assert report.outcomes == {}
    assert "'gone'" in report.needs_operator["b1"] and not report.clean
    assert [(b.batch_id, b.state) for b in unfinished] == [("b1", BatchState.RUNNING)]


def test_undo_calls_keep_credentials_but_not_conditionals_framing_or_encoding() -> None:
    headers_in = [
        ["Authorization", "Bearer t"], ["If-Match", '"v1"'], ["If-None-Match", "*"],
        ["Content-Type", "text/plain"], ["Idempotency-Key", "b.0"], ["Range", "bytes=0-1"],
        ["traceparent", "00-abc-def-01"], ["Accept-Encoding", "gzip, br"],
    ]
    headers = gateway_headers(headers_in, {"Idempotency-Key": "b.0.undo"})
    assert headers == (
        ("Authorization", "Bearer t"),
        ("traceparent", "00-abc-def-01"),
        ("Accept-Encoding", "identity"),
        ("Idempotency-Key", "b.0.undo"),
    )
