"""Logging set-up: structlog JSON lines (or a console renderer on a TTY) for every component.

Call `configure_logging` once at start-up; get loggers with `structlog.get_logger()`.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(*, level: str = "INFO", json_output: bool | None = None) -> None:
    """JSON lines when stdout is not a TTY (or when asked), human-readable console output otherwise."""
    if json_output is None:
        json_output = not sys.stdout.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
