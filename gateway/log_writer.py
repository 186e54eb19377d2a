"""Where log lines are written: gathered into one write per event-loop iteration, flushed at once
for a warning or worse, at exit, and whenever no event loop runs in the writing thread.

Writing every access line with its own `write` and flush was about a third of the CPU of a proxied
request under load (a system call per request); an iteration that finishes many requests now
writes their lines together. What is lost on SIGKILL is at most the info and debug lines of the
iteration running at that moment; a warning or error line is never held, and it takes every line
gathered before it along, so the order of lines is kept.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import sys
import threading
import weakref
from typing import TextIO

_WRITERS: weakref.WeakSet[LineWriter] = weakref.WeakSet()


class LineWriter:
    """A structlog logger (`logger_factory` returns it): `info` and below are gathered, `warning`
    and above written at once. `file` None writes to whatever `sys.stdout` is at that moment."""

    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        _WRITERS.add(self)

    def gathered(self, message: str) -> None:
        """Write `message` with the others of this loop iteration (at once outside a loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.at_once(message)
            return
        with self._lock:
            self._pending.append(message)
            if self._scheduled_on is loop:
                return
            self._scheduled_on = loop  # a flush scheduled on a loop that closed never runs
        loop.call_soon(self.flush)

    def at_once(self, message: str) -> None:
        """Write `message` now, after every line gathered before it."""
        with self._lock:
            self._pending.append(message)
            self._write_pending()

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        self._scheduled_on = None
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        target = self._file if self._file is not None else sys.stdout
        target.write(text)
        target.flush()

    msg = log = debug = info = gathered
    warn = warning = error = err = critical = exception = fatal = failure = at_once


@atexit.register
def flush_all() -> None:
    """Write what is still gathered (at exit; also for tests that read a log file)."""
    for writer in list(_WRITERS):
        with contextlib.suppress(ValueError, OSError):  # a closed file or pipe: nothing to do
            writer.flush()
