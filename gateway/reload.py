"""Reloading the config in a running process (SIGHUP, or a changed file when watched).

A valid new file becomes a new gateway generation at once; requests and batches in flight finish on
the one they started with; unchanged upstreams keep their pools. An invalid file changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import structlog
from aiohttp import web

from gateway.atomicity.secrets import load_key
from gateway.batch_service import BatchService
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.headers import TrustedProxies
from gateway.health import UpstreamHealth, health_of
from gateway.routing import RouteTable
from gateway.runtime import GATEWAY_REF, Gateway

log = structlog.get_logger("gateway.reload")

RESTART_ONLY = ("listen", "journal", "tracing")
"""Sections a reload cannot change (the socket, the journal file, the span exporter): a restart is
needed."""


async def reload_config(app: web.Application, path: str) -> bool:
    """Load, validate and switch to the config at `path`; False (and nothing changed) if it fails."""
    ref = app[GATEWAY_REF]
    old = ref.current
    try:
        config = load_config(path)
        load_key(config.journal.key_env, config.journal.key_file, path)
        fixed = [key for key in RESTART_ONLY if getattr(config, key) != getattr(old.config, key)]
        if fixed:
            raise ConfigError(path, fixed[0], "changed, but it can only change with a restart")
    except ConfigError as exc:
        old.metrics.reloads.labels("failed").inc()
        log.error("reload_failed", detail=str(exc), hint="the running config stays in force")
        return False
    new = await _next_generation(old, config)
    ref.current = new
    old.metrics.reloads.labels("ok").inc()
    kept = sorted(n for n in config.upstreams if n in old.config.upstreams
                  and old.config.upstreams[n] == config.upstreams[n])
    log.info("config_reloaded", path=path, upstreams_kept=kept)
    task = asyncio.create_task(_retire(old, new))
    new.extras.setdefault("retiring", set()).add(task)
    task.add_done_callback(new.extras["retiring"].discard)
    return True


async def _next_generation(old: Gateway, config: GatewayConfig) -> Gateway:
    routes = RouteTable(config)
    health = UpstreamHealth(config, old.metrics, previous=health_of(old))  # state kept where unchanged
    pool = old.pool.reconfigured(
        config, on_outcome=health.record
    )
    await pool.start()
    pool.publish_limits()
    old.extras.setdefault("pools", [old.pool]).append(pool)  # every generation's, closed at shutdown
    batches = BatchService(config, routes, pool, old.metrics, journal=old.batches.journal)
    batches.adopt(old.batches)
    await health_of(old).stop()
    health.start(pool, routes)
    return Gateway(
        config=config, routes=routes, pool=pool, metrics=old.metrics, batches=batches,
        extras={**old.extras, "health": health}, trusted_proxies=TrustedProxies(config.trusted_proxies),
    )


async def _retire(old: Gateway, new: Gateway) -> None:
    """Close what only the old generation used, once its requests are done (or after the grace)."""
    ends = time.monotonic() + old.config.shutdown_grace
    while old.active and time.monotonic() < ends:
        await asyncio.sleep(0.1)
    await old.pool.close_unshared(new.pool)


async def watch_file(app: web.Application, path: str, every: float = 2.0) -> None:
    """Reload when the file's modification time or size changes (`reload.watch: true`)."""
    def stamp() -> tuple[float, int] | None:
        with contextlib.suppress(OSError):
            info = os.stat(path)
            return info.st_mtime, info.st_size
        return None

    last = stamp()
    while True:
        await asyncio.sleep(every)
        now = stamp()
        if now is not None and now != last:
            last = now
            await reload_config(app, path)
