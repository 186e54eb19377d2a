"""Logging set-up: structlog JSON lines (or a console renderer on a TTY) for every component.

Call `configure_logging` once at start-up; get loggers with `structlog.get_logger()`.

The stdlib `logging` root (aiohttp.server, aiohttp.web, asyncio, `warnings`, any library) is
rendered by the same processors through a structlog `ProcessorFormatter` and written to the same
stdout, by the same LineWriter (gateway/log_writer.py, one write per loop iteration; warnings and
worse at once): one line per record, JSON when structlog's own lines are JSON, with an
exception as an `exception` field (one JSON string), never as raw multi-line text on stderr.
Uncaught exceptions in threads and "unraisable" ones (finalizers) are logged the same way.
aiohttp.access stays quiet: the gateway writes its own access line (gateway/access_log.py).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

import orjson
import structlog

from gateway.log_writer import LineWriter

_QUIET = ("aiohttp.access",)
"""Loggers held at WARNING whatever the level: the gateway writes its own access line."""


class StructlogHandler(logging.Handler):
    """A stdlib handler writing through the same LineWriter as structlog's own lines (so a stdlib
    line never interleaves with one of them, and keeps its place in order)."""

    def __init__(self, file: TextIO | None = None, writer: LineWriter | None = None) -> None:
        super().__init__()
        self._writer = writer or LineWriter(file)  # file None: whatever sys.stdout is when it writes

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if record.levelno >= logging.WARNING:
                self._writer.at_once(line)
            else:
                self._writer.gathered(line)
        except Exception:
            self.handleError(record)


class _Second:
    """The ISO text of the current UTC second, made once per second (TimeStamper's datetime took
    about 2 us of every line)."""

    second = -1
    text = ""


def _utc_timestamp(_logger: Any, _name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """`timestamp`: ISO 8601 UTC with microseconds, e.g. 2026-11-23T20:13:33.123456Z."""
    now = time.time()
    second = int(now)
    if second != _Second.second:
        _Second.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _Second.second = second
    event["timestamp"] = f"{_Second.text}.{int((now - second) * 1e6):06d}Z"
    return event


def _renderer(json_output: bool) -> structlog.types.Processor:
    return structlog.processors.JSONRenderer(_dumps) if json_output else structlog.dev.ConsoleRenderer()


_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _dumps(event: Any, **_: Any) -> str:
    """One JSON line, as `json.dumps` writes it but compact, with orjson (about 5x faster on an
    access line). Lines stay ASCII (`\\u` escapes, as before: safe on any stdout encoding), so a
    line orjson renders with other characters, or a value it cannot encode (an int over 64
    bits), goes through `json`. Other objects are shown by their repr, as structlog's default."""
    try:
        line = orjson.dumps(event, default=repr, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        line = ""
    return line if line.isascii() and line else json.dumps(event, default=repr)


def configure_logging(
    *, level: str = "INFO", json_output: bool | None = None, file: TextIO | None = None,
) -> None:
    """JSON lines when stdout is not a TTY (or when asked), human-readable console output otherwise.

    `level` applies to structlog's loggers and to the stdlib root alike. `file` is for tests;
    by default the lines go to whatever `sys.stdout` is when they are written. Calling it again
    replaces the previous set-up (no handler is added twice).
    """
    target = file if file is not None else sys.stdout
    if json_output is None:
        json_output = not target.isatty()
    numeric = logging.getLevelName(level)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _utc_timestamp,
    ]
    # ConsoleRenderer shows exc_info itself (multi-line is fine on a terminal); JSON gets one
    # `exception` string field, the traceback's newlines escaped.
    exceptions: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info] if json_output else []
    )
    writer = LineWriter(file)
    structlog.configure(
        processors=[*shared, *exceptions, _renderer(json_output)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
    handler = StructlogHandler(writer=writer)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exceptions,
            _renderer(json_output),
        ],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, StructlogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric))
    logging.captureWarnings(True)
    _route_uncaught_exceptions()


def _route_uncaught_exceptions() -> None:
    """Exceptions Python would print to stderr itself (a thread's, an unraisable one) become log
    lines. Only hooks still at Python's defaults are replaced (a test runner's are kept)."""
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = _thread_failed
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _unraisable


_log = structlog.get_logger("gateway")


def _exc_info(
    exc: BaseException | None, tb: TracebackType | None,
) -> tuple[type[BaseException], BaseException, TracebackType | None] | None:
    return (type(exc), exc, tb) if exc is not None else None


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    _log.error("thread_failed", thread=args.thread.name if args.thread is not None else None,
               exc_info=_exc_info(args.exc_value, args.exc_traceback))


def _unraisable(args: Any) -> None:  # sys.UnraisableHookArgs: not importable for typing
    try:
        where = repr(args.object)
    except Exception:
        where = f"<{type(args.object).__name__} object>"
    _log.error("exception_ignored", detail=args.err_msg or "Exception ignored in", object=where,
               exc_info=_exc_info(args.exc_value, args.exc_traceback))
