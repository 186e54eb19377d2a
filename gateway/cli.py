"""The `gateway` command: serve, check-config, recover, batches, healthcheck and demo.

Config errors print one line per problem (file, key path, problem) and exit 2; usage errors exit 2
with argparse's usage; anything else is one line. Never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from gateway import __version__, operator_commands
from gateway.app import create_app, reserved_route_warnings
from gateway.atomicity.journal import postgres_driver_problem
from gateway.atomicity.secrets import load_key
from gateway.config import GatewayConfig, Journal, journal_settings, load_config, problems_of
from gateway.connection_guard import ConnectionGuard
from gateway.errors import ConfigError, JournalUnavailable
from gateway.log import configure_logging
from gateway.process_memory import fix_mmap_threshold
from gateway.reload import reload_config, watch_file
from gateway.runtime import GATEWAY, GATEWAY_REF
from gateway.tls import listener_context
from gateway.tracing import tracing_for

EXIT_CONFIG = 2
log = structlog.get_logger("gateway")


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _NoConfig(Exception):
    """Neither --config nor GATEWAY_CONFIG: a usage error (exit 2)."""


def _version() -> str:
    try:
        return metadata.version("batch-gateway")
    except metadata.PackageNotFoundError:
        return __version__


def _log_level(text: str) -> str:
    level = text.upper()
    level = "WARNING" if level == "WARN" else level
    if level not in _LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(_LEVELS)} (any case)")
    return level


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return port


def _log_options(*, top: bool) -> argparse.ArgumentParser:
    """--log-level and --log-json, accepted before and after the command: the top-level parser has
    the defaults; the commands' copies default to SUPPRESS so they never overwrite a value given
    before the command."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--log-level", type=_log_level, metavar="LEVEL", default="INFO" if top else argparse.SUPPRESS,
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL, in any case (default INFO)",
    )
    options.add_argument(
        "--log-json", action="store_true", default=False if top else argparse.SUPPRESS,
        help="JSON log lines even on a TTY",
    )
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Batch reverse-proxy gateway", parents=[_log_options(top=True)],
        epilog="--config FILE may be left out when GATEWAY_CONFIG names the file.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {_version()}")
    common = [_log_options(top=False)]
    config_help = "the config file (default: $GATEWAY_CONFIG)"
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", parents=common, help="run the gateway")
    serve.add_argument("--config", help=config_help)
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    check = commands.add_parser(
        "check-config", parents=common,
        help="validate a config file (every problem, the journal's key and directory) and exit",
    )
    check.add_argument("file", nargs="?", help=config_help)
    recover = commands.add_parser(
        "recover", parents=common,
        help="roll back unfinished atomic batches and exit (3: some need an operator)",
    )
    recover.add_argument("--config", help=config_help)
    batches = commands.add_parser(
        "batches", parents=common, help="atomic batches in the journal, for operators"
    )
    batch_commands = batches.add_subparsers(dest="batches_command", required=True, metavar="COMMAND")
    listing = batch_commands.add_parser(
        "list", parents=common, help="batches needing an operator (--all: every batch)"
    )
    listing.add_argument("--all", action="store_true")
    for name, text in (("show", "one batch: its calls, undos and what is left (no secrets)"),
                       ("retry", "run the rollback of one batch again"),
                       ("resolve", "mark a batch dealt with by hand")):
        sub = batch_commands.add_parser(name, parents=common, help=text)
        sub.add_argument("batch_id")
        if name == "resolve":
            sub.add_argument("--note", required=True, help="what was done (kept in the journal)")
    for sub in (listing, *batch_commands.choices.values()):
        if not any(a.dest == "config" for a in sub._actions):
            sub.add_argument("--config", help=config_help)
    health = commands.add_parser(
        "healthcheck", parents=common,
        help="GET the running gateway's readyz (from the config's listen and gateway.prefix); "
             "exit 0 when ready, else 1",
    )
    health.add_argument("--config", help=config_help)
    demo = commands.add_parser(
        "demo", parents=common, help="run the gateway with two built-in demo upstreams"
    )
    demo.add_argument("--port", type=_port, default=8080)
    demo.add_argument("--legacy-port", type=_port, default=0)
    demo.add_argument("--ledger-port", type=_port, default=0)
    demo.add_argument("--journal", default=None, help="journal file (default: a temporary one)")
    demo.add_argument(
        "--no-idempotency-keys", action="store_true",
        help="the demo upstreams ignore Idempotency-Key and the gateway does not rely on it",
    )
    return parser


def _config_path(given: str | None) -> str:
    path = given or os.environ.get("GATEWAY_CONFIG")
    if not path:
        raise _NoConfig("no config file: give --config FILE (check-config: FILE) or set GATEWAY_CONFIG")
    return path


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a path from argv may hold bytes that are not UTF-8
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse printed (2)
        return _exit_code(exc)
    configure_logging(level=args.log_level, json_output=True if args.log_json else None)
    try:
        if args.command == "check-config":
            return check_config(_config_path(args.file))
        if args.command == "demo":
            fix_mmap_threshold()
            with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
                runner.run(_demo(args))
            return 0
        args.config = _config_path(args.config)
        if args.command == "healthcheck":
            return healthcheck(args.config)
        config = load_config(args.config)
        load_key(config.journal.key_env, config.journal.key_file, args.config)  # names the file
        if config.journal.url is not None and (driver := postgres_driver_problem()) is not None:
            raise ConfigError(args.config, "journal.url", driver)
        if args.command == "recover":
            return asyncio.run(operator_commands.recover(config))
        if args.command == "batches":
            return asyncio.run(_batches(config, args))
        if args.worker:
            run_on_loop(config, serve(config, recover=False, reuse_port=True, config_path=args.config))
            return 0
        if config.listen.worker_count > 1:
            return _supervise(config, args)
        run_on_loop(config, serve(config, config_path=args.config))
        return 0
    except _NoConfig as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        for problem in problems_of(exc):
            print(f"gateway: invalid config: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except JournalUnavailable as exc:
        print(f"gateway: journal unavailable: {exc.detail}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback for any input: one line (the debug log has it)
        log.debug("command_failed", exc_info=True)
        print(f"gateway: failed: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


_CUT_OFF = 0.3
"""Seconds before the shutdown deadline at which requests still in flight are cancelled."""


def run_on_loop(config: GatewayConfig, main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on the configured event loop (`listen.loop`); uvloop when asked and installed."""
    fix_mmap_threshold()
    factory = loop_factory(config.listen.loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def loop_factory(setting: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for `uvloop`, and for `auto` when it is importable; None: asyncio's default."""
    if setting == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if setting == "uvloop":
            raise ConfigError(
                "<config>", "listen.loop", "uvloop is not installed (pip install uvloop)"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def serve(
    config: GatewayConfig, *, recover: bool = True, reuse_port: bool = False,
    config_path: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads `config_path`.

    Shutdown: /readyz fails at once, the listener stays open for `drain_delay`, then the whole
    shutdown (in-flight requests, atomic batches, closing pools and journal) ends within
    `shutdown_grace`: one deadline, not one per stage.
    """
    stop = asyncio.Event()  # handlers first: a SIGTERM during start-up stops cleanly
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("reload_ignored", detail="still starting"))
    app = create_app(config, recover=recover)
    gateway = app[GATEWAY]
    runner = web.AppRunner(  # the graceful wait is ours (below); aiohttp only cuts what is left
        app, access_log=None, shutdown_timeout=_CUT_OFF,
        keepalive_timeout=config.listen.keepalive_timeout,
    )
    await runner.setup()
    assert runner.server is not None
    listen = config.listen
    metrics = gateway.metrics
    guard = ConnectionGuard(
        listen.header_timeout, listen.max_connections, listen.backlog,
        on_protocol_error=metrics.protocol_error,
        on_limit=lambda key: metrics.limits_hit.labels(key).inc(),
    )
    guard.install(runner.server)
    tls = listener_context(config)
    site = web.TCPSite(
        runner, config.listen.host, config.listen.port, reuse_port=reuse_port or None,
        backlog=guard.backlog, ssl_context=tls,
    )
    await site.start()
    log.info("listening", host=config.listen.host, port=config.listen.port,
             max_connections=guard.max_connections, backlog=guard.backlog,
             loop=type(asyncio.get_running_loop()).__module__.split(".")[0])
    tasks: set[asyncio.Task[Any]] = set()

    def on_hangup() -> None:
        if config_path is None:
            log.warning("reload_unavailable", detail="no config file to reload (the demo)")
            return
        task = asyncio.create_task(_reload(app, config_path, tls))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if config.watch_config and config_path is not None:
        tasks.add(asyncio.create_task(watch_file(app, config_path)))
    watcher = asyncio.create_task(_stop_when_orphaned(stop)) if not recover else None
    try:
        await stop.wait()
        gateway = app[GATEWAY_REF].current  # after reloads: the newest generation
        gateway.extras["stopping"] = True
        log.info("stopping", drain_delay_seconds=config.drain_delay, grace_seconds=config.shutdown_grace)
        if config.drain_delay:
            await asyncio.sleep(config.drain_delay)
        deadline = time.monotonic() + config.shutdown_grace
        gateway.batches.shutdown.deadline = deadline
        await site.stop()  # no new connections; requests in flight go on
        while guard.busy() and time.monotonic() < deadline - _CUT_OFF:
            await asyncio.sleep(0.05)
    finally:
        for task in (watcher, *tasks):
            if task is not None:
                task.cancel()
        await runner.cleanup()
    log.info("stopped")


async def _reload(app: web.Application, path: str, tls: ssl.SSLContext | None) -> None:
    """Reload the config; on success also load the listener's (renewed) certificate and key."""
    if await reload_config(app, path) and tls is not None:
        listen_tls = app[GATEWAY_REF].current.config.listen.tls
        if listen_tls is not None:
            try:
                tls.load_cert_chain(listen_tls.cert_file, listen_tls.key_file)
                log.info("listener_certificate_reloaded", cert_file=listen_tls.cert_file)
            except (OSError, ssl.SSLError) as exc:
                log.error("listener_certificate_reload_failed", detail=str(exc))


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker stops when its supervisor is gone (where the parent-death signal is not there)."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.error("supervisor_gone", parent=parent)
    stop.set()


def _supervise(config: GatewayConfig, args: argparse.Namespace) -> int:
    from gateway.workers import Supervisor, worker_command

    log_args = ["--log-level", args.log_level] + (["--log-json"] if args.log_json else [])
    return Supervisor(config, worker_command(args.config, log_args)).run()


async def _batches(config: GatewayConfig, args: argparse.Namespace) -> int:
    command = args.batches_command
    if command == "list":
        return await operator_commands.list_batches(config, everything=args.all)
    if command == "show":
        return await operator_commands.show(config, args.batch_id)
    if command == "retry":
        return await operator_commands.retry(config, args.batch_id)
    return await operator_commands.resolve(config, args.batch_id, args.note)


async def _demo(args: argparse.Namespace) -> None:
    from gateway.demo.launcher import demo_config, start_demo_upstreams

    created = None if args.journal else tempfile.mkdtemp(prefix="gateway-demo-")
    journal = args.journal if created is None else str(Path(created) / "journal.sqlite3")
    try:
        keys = not args.no_idempotency_keys
        runners, legacy_url, ledger_url = await start_demo_upstreams(
            args.legacy_port, args.ledger_port, idempotency_keys=keys
        )
        config = demo_config(legacy_url, ledger_url, port=args.port, journal=journal, idempotency_keys=keys)
        log.info("demo_upstreams", legacy=legacy_url, ledger=ledger_url, journal=journal)
        try:
            await serve(config)
        finally:
            for runner in runners:
                await runner.cleanup()
    finally:
        if created is not None:  # only the directory this run made, never a --journal's
            shutil.rmtree(created, ignore_errors=True)


# --- check-config ------------------------------------------------------------------------------


def check_config(path: str) -> int:
    """Every problem of the file, one line each on stderr (exit 2); else its start-up warnings
    and `FILE: OK` on stdout (exit 0). Also checks what `serve` needs beyond the file: the journal
    key and a journal location this user can write (nothing is created)."""
    problems: list[ConfigError] = []
    config: GatewayConfig | None = None
    try:
        config = load_config(path)
    except ConfigError as exc:
        problems.extend(problems_of(exc))
    journal = config.journal if config is not None else journal_settings(path)
    if journal is not None:
        problems.extend(_journal_problems(journal, path))
    if config is not None and config.tracing.enabled:
        try:  # the otel extra installed, OTEL_TRACES_EXPORTER known: what `serve` will need
            tracing_for(config).shutdown()
        except ConfigError as exc:
            problems.append(exc)
    if problems or config is None:
        for problem in problems:
            print(f"gateway: invalid config: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    for text in reserved_route_warnings(config):
        print(f"{path}: warning: {text}")
    print(f"{path}: OK")
    return 0


def _journal_problems(journal: Journal, config_file: str) -> list[ConfigError]:
    problems = []
    try:
        load_key(journal.key_env, journal.key_file, config_file)
    except ConfigError as exc:
        problems.append(exc)
    if journal.url is not None:  # PostgreSQL: the driver must be installed (the server is not contacted)
        driver = postgres_driver_problem()
        if driver is not None:
            problems.append(ConfigError(config_file, "journal.url", driver))
        return problems
    location = journal_location_problem(journal.path)
    if location is not None:
        problems.append(ConfigError(config_file, "journal.path", location))
    return problems


def journal_location_problem(journal_path: str) -> str | None:
    """Why this user could not open the journal there (the file, or its directory: SQLite creates
    -wal and -shm files next to it, and `serve` creates missing directories), or None."""
    if journal_path == ":memory:":
        return None
    target = Path(journal_path).absolute()
    directory = target.parent
    if os.path.isdir(target):
        return f"{target} is a directory; name the journal file"
    if os.path.exists(target) and not os.access(target, os.R_OK | os.W_OK):
        return f"{target} is not readable and writable by this user (uid {os.getuid()})"
    existing = directory
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        return f"cannot create the directory {directory}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == directory:
            return (f"the directory {directory} is not writable by this user (uid {os.getuid()}); "
                    "the journal and its -wal and -shm files are created there")
        return f"cannot create the directory {directory}: {existing} is not writable by this user"
    return None


# --- healthcheck -------------------------------------------------------------------------------

HEALTHCHECK_TIMEOUT = 3.0


def healthcheck(config_path: str) -> int:
    """GET the readyz of the gateway this config describes: exit 0 on 200, else 1 (also for an
    invalid config: 2 means something else to Docker's HEALTHCHECK). One line on stdout."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"unhealthy: invalid config: {exc}")
        return 1
    url = readyz_url(config)
    if url is None:
        print("unhealthy: listen.port is 0 (a random port): nothing to check")
        return 1
    context = ssl.create_default_context()
    context.check_hostname = False  # our own listener on loopback: readiness, not its identity
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(  # no proxy from the environment
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=HEALTHCHECK_TIMEOUT) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"unhealthy: {url}: {' '.join(str(reason).split()) or type(exc).__name__}")
        return 1
    if status == 200:
        print(f"ready: {url}")
        return 0
    print(f"not ready: {url} answered {status}")
    return 1


def readyz_url(config: GatewayConfig) -> str | None:
    """Where the gateway answers readyz: a wildcard listen address is checked on 127.0.0.1."""
    listen = config.listen
    if listen.port == 0:
        return None
    host = "127.0.0.1" if listen.host in ("", "0.0.0.0", "::") else listen.host
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if listen.tls is not None else "http"
    return f"{scheme}://{host}:{listen.port}{config.gateway.prefix}/readyz"


if __name__ == "__main__":
    raise SystemExit(main())
