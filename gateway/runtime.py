"""The gateway's runtime parts held by the aiohttp app: config, routes, upstream pool, metrics.

Kept apart from app.py so handlers can import the app keys without importing the wiring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.batch_service import BatchService
from gateway.config import GatewayConfig
from gateway.headers import TrustedProxies
from gateway.metrics import GatewayMetrics
from gateway.routing import RouteTable
from gateway.upstream import UpstreamPool

REQUEST_ID = web.RequestKey("request_id", str)
KIND = web.RequestKey("kind", str)
"""What the request is, for logs and metrics: proxy, gateway, batch_json, batch_multipart."""
UPSTREAM = web.RequestKey("upstream", str)
BATCH_ID = web.RequestKey("batch_id", str)
ROUTE = web.RequestKey("route", str)
"""The route that matched (its prefix) or the gateway endpoint's path: a bounded metrics label."""
RELAYED = web.RequestKey("relayed", bool)
"""True once an upstream's answer is being relayed: its status is the upstream's, not the gateway's."""


@dataclass
class Gateway:
    """Everything a handler needs, built once per app from the validated config."""

    config: GatewayConfig
    routes: RouteTable
    pool: UpstreamPool
    metrics: GatewayMetrics
    batches: BatchService
    extras: dict[str, Any] = field(default_factory=dict)
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    active: int = 0
    """Requests in flight on this generation (a reload retires it once they are done)."""


GATEWAY = web.AppKey("gateway", Gateway)
"""The gateway the app started with (tests and start-up); requests use `gateway_of(request)`."""


@dataclass
class GatewayRef:
    """The current generation of the gateway; a reload swaps `current`."""

    current: Gateway


GATEWAY_REF = web.AppKey("gateway_ref", GatewayRef)
PINNED = web.RequestKey("gateway_now", Gateway)
"""The generation a request started on: it finishes on that config even if a reload happens."""


def gateway_of(request: web.Request) -> Gateway:
    pinned = request.get(PINNED)
    return pinned if pinned is not None else request.app[GATEWAY_REF].current


@dataclass(frozen=True, slots=True)
class Served:
    """What a finished request was, as both the metrics and the access line name it."""

    kind: str
    route: str
    upstream: str | None
    origin: str
    """upstream: the status was relayed from the upstream; gateway: the gateway answered."""


def served(request: web.Request) -> Served:
    return Served(
        kind=request.get(KIND, "proxy"),
        route=route_label(request),
        upstream=request.get(UPSTREAM),
        origin="upstream" if request.get(RELAYED, False) else "gateway",
    )


def route_label(request: web.Request) -> str:
    """The proxy route's prefix, or the gateway endpoint's path template; "" when none matched."""
    if ROUTE in request:
        return request[ROUTE]
    if request.get(KIND, "proxy") == "proxy":
        return ""  # the catch-all matched but no configured route did
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else ""
