"""Worker processes: recover once, then run N gateway processes on one port (SO_REUSEPORT).

A worker that dies is replaced once the atomic batches it left unfinished are recovered (each worker
journals under its own instance id), with a restart backoff. SIGHUP is forwarded (each worker
reloads its config); workers die with their supervisor (Linux parent-death signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

import structlog
from prometheus_client import multiprocess

from gateway.atomicity.journal import INSTANCE_VARIABLE
from gateway.atomicity.recovery import with_recovery
from gateway.config import GatewayConfig
from gateway.metrics import MULTIPROC_VARIABLE, RECOVERED_VARIABLE

log = structlog.get_logger("gateway.workers")
_POLL = 0.2
_BACKOFF_FIRST, _BACKOFF_MAX, _STABLE_AFTER = 1.0, 30.0, 60.0
_PR_SET_PDEATHSIG = 1


def _prepare_worker() -> None:
    """Runs in the child before exec: SIGTERM it when the supervisor dies, however it dies; and
    ignore SIGHUP until the worker installs its reload handler (an ignored signal stays ignored
    across exec), so a reload forwarded while a worker starts does not kill it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the worker watches its parent
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Slot:
    """One worker position: its current process, instance id and restart backoff."""

    index: int
    generation: int = 0
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = _BACKOFF_FIRST
    restart_at: float | None = None
    instance: str = field(default="")


class Supervisor:
    """Starts the workers, forwards stop and reload signals, and replaces a worker that died."""

    def __init__(self, config: GatewayConfig, command: Sequence[str]) -> None:
        self._config = config
        self._command = list(command)
        self._slots = [Slot(index) for index in range(config.listen.worker_count)]
        self._stopping = False
        self._failed = False
        self._kill_at: float | None = None
        self._metrics_dir = ""
        self._owns_metrics_dir = MULTIPROC_VARIABLE not in os.environ
        self._handover: list[str] = []
        """Recovery outcomes not yet handed to a worker (it counts them in its metrics)."""

    def run(self) -> int:
        self._metrics_dir = shared_metrics_dir()
        report = asyncio.run(with_recovery(self._config))
        self._handover = [outcome.value for outcome in report.outcomes.values()]
        if report.outcomes:
            log.warning("recovery_done", batches={k: v.value for k, v in report.outcomes.items()})
        for batch_id, reason in report.needs_operator.items():
            log.error("batch_needs_operator", batch_id=batch_id, reason=reason)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        for slot in self._slots:
            self._spawn(slot)
        log.info("workers_started", pids=[s.process.pid for s in self._slots if s.process])
        while not self._stopping or any(s.process and s.process.poll() is None for s in self._slots):
            if not self._stopping:
                self._replace_dead_workers()
            self._kill_stragglers()
            time.sleep(_POLL)
        log.info("workers_stopped", failed=self._failed)
        if self._owns_metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        return 1 if self._failed else 0

    def _spawn(self, slot: Slot) -> None:
        slot.generation += 1
        slot.instance = f"w{slot.index}.{os.getpid()}.{slot.generation}"
        env = {
            **os.environ, INSTANCE_VARIABLE: slot.instance, MULTIPROC_VARIABLE: self._metrics_dir,
            RECOVERED_VARIABLE: ",".join(self._handover),  # counted by the worker (one scrape)
        }
        self._handover = []
        slot.process = subprocess.Popen(self._command, env=env, preexec_fn=_prepare_worker)
        slot.started, slot.restart_at = time.monotonic(), None

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        if self._kill_at is None:
            self._kill_at = time.monotonic() + self._config.drain_delay + self._config.shutdown_grace + 5
        self._stopping = True
        self._signal_all(signum)

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        log.info("reload_forwarded", workers=len(self._slots))
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, signum: int) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signum)

    def _replace_dead_workers(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            process = slot.process
            if process is not None and process.poll() is not None and slot.restart_at is None:
                stable = now - slot.started > _STABLE_AFTER
                slot.backoff = _BACKOFF_FIRST if stable else min(slot.backoff * 2, _BACKOFF_MAX)
                log.error("worker_died", pid=process.pid, code=process.returncode, instance=slot.instance,
                          restart_in_s=slot.backoff)
                with contextlib.suppress(OSError):  # its live gauges leave the merged scrape
                    multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
                self._recover(slot.instance)
                slot.restart_at = time.monotonic() + slot.backoff
            if slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)
                log.info("worker_replaced", pid=slot.process.pid if slot.process else None,
                         instance=slot.instance)

    def _recover(self, instance: str) -> None:
        """Roll back (or forward) what the dead worker left unfinished; live workers' batches are
        never touched, since each batch is journaled under its worker's instance id."""
        report = asyncio.run(with_recovery(self._config, instance=instance))
        self._handover += [outcome.value for outcome in report.outcomes.values()]
        log.warning("worker_batches_recovered", instance=instance,
                    batches={k: v.value for k, v in report.outcomes.items()})
        for batch_id, reason in report.needs_operator.items():
            log.error("batch_needs_operator", batch_id=batch_id, reason=reason)

    def _kill_stragglers(self) -> None:
        """A worker still running well past the shutdown deadline is killed, not waited for."""
        if self._kill_at is not None and time.monotonic() > self._kill_at:
            for slot in self._slots:
                if slot.process is not None and slot.process.poll() is None:
                    log.error("worker_killed_after_grace", pid=slot.process.pid)
                    slot.process.kill()
                    self._failed = True


def shared_metrics_dir() -> str:
    """The directory every worker writes its metrics to (PROMETHEUS_MULTIPROC_DIR when the operator
    set it, else a fresh temporary one); emptied first, since stale files would be summed in."""
    given = os.environ.get(MULTIPROC_VARIABLE)
    directory = given or tempfile.mkdtemp(prefix="gateway-metrics-")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))
    return directory


def worker_command(config_path: str, log_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "gateway", *log_args, "serve", "--config", config_path, "--worker"]
