"""Log lines are gathered into one write per event-loop iteration, never held past a warning, and
never lost at exit (gateway/log_writer.py); the timestamp stays ISO 8601 UTC."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from datetime import UTC, datetime

from gateway.log import _utc_timestamp
from gateway.log_writer import LineWriter


class CountingFile(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


async def test_lines_of_one_loop_iteration_are_written_together() -> None:
    out = CountingFile()
    writer = LineWriter(out)
    for n in range(3):
        writer.info(f"line {n}")
    assert out.writes == []  # nothing yet: the iteration is still running
    await asyncio.sleep(0)
    assert out.writes == ["line 0\nline 1\nline 2\n"]
    writer.info("line 3")
    await asyncio.sleep(0)
    assert out.getvalue().splitlines() == ["line 0", "line 1", "line 2", "line 3"]
    assert len(out.writes) == 2


async def test_a_warning_is_written_at_once_after_the_lines_gathered_before_it() -> None:
    out = CountingFile()
    writer = LineWriter(out)
    writer.info("first")
    writer.warning("second")
    assert out.writes == ["first\nsecond\n"]
    writer.error("third")
    assert out.getvalue().splitlines() == ["first", "second", "third"]


def test_outside_an_event_loop_a_line_is_written_at_once() -> None:
    out = CountingFile()
    LineWriter(out).info("alone")
    assert out.writes == ["alone\n"]


def test_a_line_gathered_on_a_loop_that_closed_goes_out_with_the_next_loop_s_lines() -> None:
    out = CountingFile()
    writer = LineWriter(out)

    loop = asyncio.new_event_loop()
    loop.call_soon(writer.info, "from the first loop")
    loop.call_soon(loop.stop)  # stops before the flush the line scheduled can run
    loop.run_forever()
    loop.close()
    assert out.writes == []

    async def log_and_wait() -> None:
        writer.info("from the second loop")
        await asyncio.sleep(0)

    asyncio.run(log_and_wait())
    assert out.getvalue().splitlines() == ["from the first loop", "from the second loop"]


def test_gathered_lines_are_written_at_exit() -> None:
    """A process that exits in the middle of a loop iteration still writes its last lines."""
    code = (
        "import asyncio, sys\n"
        "from gateway.log import configure_logging\n"
        "import structlog\n"
        "configure_logging(level='INFO', json_output=True)\n"
        "async def main():\n"
        "    structlog.get_logger('t').info('last_words', n=1)\n"
        "    sys.exit(3)\n"
        "asyncio.new_event_loop().run_until_complete(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["last_words"]


def test_the_timestamp_is_iso_8601_utc_with_microseconds() -> None:
    before = time.time()
    stamp = _utc_timestamp(None, "", {})["timestamp"]
    after = time.time()
    assert stamp.endswith("Z") and len(stamp) == len("2026-11-23T20:13:33.123456Z")
    when = datetime.fromisoformat(stamp).timestamp()
    assert datetime.fromisoformat(stamp).tzinfo == UTC
    assert before - 1e-6 <= when <= after + 1e-6
