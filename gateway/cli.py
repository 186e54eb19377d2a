"""The `gateway` command: serve, check-config, recover, batches and demo.

Config errors print one message (file, key path, problem) and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import structlog
from aiohttp import web

from gateway import operator_commands
from gateway.app import create_app
from gateway.atomicity.secrets import load_key
from gateway.config import GatewayConfig, load_config
from gateway.connection_guard import ConnectionGuard
from gateway.errors import ConfigError, JournalUnavailable
from gateway.log import configure_logging
from gateway.runtime import GATEWAY

EXIT_CONFIG = 2
log = structlog.get_logger("gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Batch reverse-proxy gateway")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true", help="JSON log lines even on a TTY")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True)
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    recover = commands.add_parser(
        "recover", help="roll back unfinished atomic batches and exit (3: some need an operator)"
    )
    recover.add_argument("--config", required=True)
    batches = commands.add_parser("batches", help="atomic batches in the journal, for operators")
    batch_commands = batches.add_subparsers(dest="batches_command", required=True)
    listing = batch_commands.add_parser("list", help="batches needing an operator (--all: every batch)")
    listing.add_argument("--all", action="store_true")
    for name, text in (("show", "one batch: its calls, undos and what is left (no secrets)"),
                       ("retry", "run the rollback of one batch again"),
                       ("resolve", "mark a batch dealt with by hand")):
        sub = batch_commands.add_parser(name, help=text)
        sub.add_argument("batch_id")
        if name == "resolve":
            sub.add_argument("--note", required=True, help="what was done (kept in the journal)")
    for sub in (listing, *batch_commands.choices.values()):
        if not any(a.dest == "config" for a in sub._actions):
            sub.add_argument("--config", required=True)
    demo = commands.add_parser("demo", help="run the gateway with two built-in demo upstreams")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--legacy-port", type=int, default=0)
    demo.add_argument("--ledger-port", type=int, default=0)
    demo.add_argument("--journal", default=None, help="journal file (default: a temporary one)")
    demo.add_argument(
        "--no-idempotency-keys", action="store_true",
        help="the demo upstreams ignore Idempotency-Key and the gateway does not rely on it",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(level=args.log_level, json_output=True if args.log_json else None)
    try:
        if args.command == "check-config":
            checked = load_config(args.file)
            load_key(checked.journal.key_env, checked.journal.key_file, args.file)
            print(f"{args.file}: OK")
            return 0
        if args.command == "demo":
            asyncio.run(_demo(args))
            return 0
        config = load_config(args.config)
        load_key(config.journal.key_env, config.journal.key_file, args.config)  # names the file
        if args.command == "recover":
            return asyncio.run(operator_commands.recover(config))
        if args.command == "batches":
            return asyncio.run(_batches(config, args))
        if args.worker:
            asyncio.run(serve(config, recover=False, reuse_port=True))
            return 0
        if config.listen.workers > 1:
            return _supervise(config, args)
        asyncio.run(serve(config))
        return 0
    except ConfigError as exc:
        print(f"gateway: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except JournalUnavailable as exc:
        print(f"gateway: journal unavailable: {exc.detail}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
        return 1


async def _wait_for_stop() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(config: GatewayConfig, *, recover: bool = True, reuse_port: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let in-flight requests finish."""
    app = create_app(config, recover=recover)
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=config.shutdown_grace,
        keepalive_timeout=config.listen.keepalive_timeout,
    )
    await runner.setup()
    assert runner.server is not None
    listen = config.listen
    metrics = app[GATEWAY].metrics
    guard = ConnectionGuard(
        listen.header_timeout, listen.max_connections, listen.backlog,
        on_protocol_error=lambda status: metrics.requests.labels("protocol_error", str(status)).inc(),
    )
    guard.install(runner.server)
    site = web.TCPSite(
        runner, config.listen.host, config.listen.port, reuse_port=reuse_port or None,
        backlog=guard.backlog,
    )
    await site.start()
    log.info("listening", host=config.listen.host, port=config.listen.port,
             max_connections=guard.max_connections, backlog=guard.backlog)
    try:
        await _wait_for_stop()
        log.info("stopping", grace_seconds=config.shutdown_grace)
    finally:
        await runner.cleanup()
    log.info("stopped")


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

    keys = not args.no_idempotency_keys
    runners, legacy_url, ledger_url = await start_demo_upstreams(
        args.legacy_port, args.ledger_port, idempotency_keys=keys
    )
    journal = args.journal or str(Path(tempfile.mkdtemp(prefix="gateway-demo-")) / "journal.sqlite3")
    config = demo_config(legacy_url, ledger_url, port=args.port, journal=journal, idempotency_keys=keys)
    log.info("demo_upstreams", legacy=legacy_url, ledger=ledger_url, journal=journal)
    try:
        await serve(config)
    finally:
        for runner in runners:
            await runner.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
