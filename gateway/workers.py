"""Worker processes: recover once, then run N gateway processes on one port (SO_REUSEPORT).

If a worker dies unexpectedly the supervisor stops the others and exits 1, so the orchestrator
restarts the whole gateway and start-up recovery rolls back what the dead worker left unfinished.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

import structlog

from gateway.atomicity.recovery import with_recovery
from gateway.config import GatewayConfig

log = structlog.get_logger("gateway.workers")
_POLL = 0.2


class Supervisor:
    """Starts the workers, forwards stop signals, and notices a worker that died on its own."""

    def __init__(self, config: GatewayConfig, command: Sequence[str]) -> None:
        self._config = config
        self._command = list(command)
        self._workers: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self._failed = False
        self._kill_at: float | None = None

    def run(self) -> int:
        report = asyncio.run(with_recovery(self._config))
        if report.outcomes:
            log.warning("recovery_done", batches={k: v.value for k, v in report.outcomes.items()})
        for batch_id, reason in report.needs_operator.items():
            log.error("batch_needs_operator", batch_id=batch_id, reason=reason)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        self._workers = [subprocess.Popen(self._command) for _ in range(self._config.listen.workers)]
        log.info("workers_started", pids=[w.pid for w in self._workers])
        while any(worker.poll() is None for worker in self._workers):
            self._check_for_dead_workers()
            self._kill_stragglers()
            time.sleep(_POLL)
        log.info("workers_stopped", failed=self._failed)
        return 1 if self._failed else 0

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if self._kill_at is None:
            self._kill_at = time.monotonic() + self._config.shutdown_grace + 5
        self._stopping = True
        for worker in self._workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    def _check_for_dead_workers(self) -> None:
        if self._stopping:
            return
        dead = [w for w in self._workers if w.poll() is not None]
        if dead:
            log.error("worker_died", pids=[w.pid for w in dead], codes=[w.returncode for w in dead])
            self._failed = True
            self._forward(signal.SIGTERM, None)


    def _kill_stragglers(self) -> None:
        """A worker still running well past the shutdown grace is killed, not waited for."""
        if self._kill_at is not None and time.monotonic() > self._kill_at:
            for worker in self._workers:
                if worker.poll() is None:
                    log.error("worker_killed_after_grace", pid=worker.pid)
                    worker.kill()
                    self._failed = True


def worker_command(config_path: str, log_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "gateway", *log_args, "serve", "--config", config_path, "--worker"]
