"""`gateway demo`: the two demo upstreams on loopback ports and a gateway routed to them.

The demo config is built here (not read from a file) so the ports can be chosen at start-up.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.config import GatewayConfig, parse_config
from gateway.demo.services import DEMO_STATE, TOKEN_HEADER, ledger_app, legacy_app


def demo_config_data(
    legacy_url: str, ledger_url: str, *, port: int = 8080, journal: str = "demo-journal.sqlite3",
    idempotency_keys: bool = False,
) -> dict[str, Any]:
    """The demo routing: /orders -> legacy (compensation), /accounts and /tx -> ledger (tokens);
    the batch dialects at their usual paths (OData's service root `/odata/` is the legacy service).

    `idempotency_keys` declares that both upstreams honour Idempotency-Key (the demo services do,
    unless switched off), so recovery may replay calls whose outcome a crash left unknown.
    """
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstreams": {
            "legacy": {
                "url": legacy_url, "infer_compensations": True, "idempotency_keys": idempotency_keys,
            },
            "ledger": {
                "url": ledger_url,
                "idempotency_keys": idempotency_keys,
                "transactions": {
                    "begin": {"method": "POST", "path": "/tx", "body": {"timeout": "{timeout}"}},
                    "token": {"json_field": "token"},
                    "header": TOKEN_HEADER,
                    "commit": {"method": "POST", "path": "/tx/{token}/commit"},
                    "rollback": {"method": "POST", "path": "/tx/{token}/rollback"},
                },
            },
        },
        "routes": [
            {"prefix": "/orders", "upstream": "legacy"},
            {"prefix": "/echo", "upstream": "legacy"},
            {"prefix": "/legacy", "upstream": "legacy", "strip_prefix": True},
            {"prefix": "/accounts", "upstream": "ledger"},
            {"prefix": "/ledger", "upstream": "ledger", "strip_prefix": True},
            {"prefix": "/odata", "upstream": "legacy", "strip_prefix": True},
        ],
        "batch": {
            "json": {"path": "/batch/v1", "atomic": False},
            "graph": {"path": "/v1.0/$batch"},
            "composite": {"path": "/services/data/v59.0/composite"},
            "odata": {"path": "/odata/$batch"},
        },
        "journal": {"path": journal},
    }


async def start_site(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Start an app on loopback; returns its runner and base URL (port 0 picks a free port)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, f"http://{host}:{bound}"


async def start_demo_upstreams(
    legacy_port: int = 0, ledger_port: int = 0, *, idempotency_keys: bool = True
) -> tuple[list[web.AppRunner], str, str]:
    legacy, ledger = legacy_app(), ledger_app()
    for app in (legacy, ledger):
        app[DEMO_STATE].honour_idempotency_keys = idempotency_keys
    legacy_runner, legacy_url = await start_site(legacy, port=legacy_port)
    ledger_runner, ledger_url = await start_site(ledger, port=ledger_port)
    return [legacy_runner, ledger_runner], legacy_url, ledger_url


def demo_config(
    legacy_url: str, ledger_url: str, *, port: int, journal: str, idempotency_keys: bool = True
) -> GatewayConfig:
    data = demo_config_data(
        legacy_url, ledger_url, port=port, journal=journal, idempotency_keys=idempotency_keys
    )
    return parse_config(data, "<demo>")
