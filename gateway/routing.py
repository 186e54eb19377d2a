"""The route table: origin-form target validation and longest-prefix routing to an upstream URL.

Every URL the gateway calls is built here from a configured upstream; a client can never name a host.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote, unquote_to_bytes

from yarl import URL

from gateway.config import GatewayConfig, Route
from gateway.errors import ForbiddenTarget, RouteNotFound


@dataclass(frozen=True, slots=True)
class Target:
    """A validated origin-form target: raw (still percent-encoded) path and query string."""

    path: str
    query: str


@dataclass(frozen=True, slots=True)
class RoutedTarget:
    """Where a request goes: the upstream's name and the full URL on it."""

    upstream: str
    url: URL
    route: Route
    path: str
    """The path on the upstream, relative to its base URL (what compensation rules match)."""

    @property
    def scope(self) -> str:
        """The part of the upstream this route reaches, relative to its base URL ("" for all of it)."""
        route = self.route
        reached = "" if route.strip_prefix or route.prefix == "/" else route.prefix
        return (route.add_prefix + reached).rstrip("/")


def parse_target(target: str, where: str | None = None) -> Target:
    """Check a client-supplied target is origin-form and does not escape its route.

    Refused (400), because an upstream's own decoder could read them as something else: a
    fragment (`#`), raw non-ASCII bytes, control characters, whitespace and backslashes (also
    encoded), dot segments also when percent-encoded once or twice (`%2e`, `%252e`) or followed by
    `;parameters` (`..;x`), fullwidth dots and slashes, and overlong UTF-8 (`%c0%ae`).
    """
    if not target.startswith("/") or target.startswith("//"):
        raise ForbiddenTarget(
            f"target {target[:200]!r} must be an origin-form path starting with a single /; "
            "absolute and scheme-relative URLs are not allowed",
            where=where,
        )
    if "#" in target:
        raise ForbiddenTarget(
            f"target {target[:200]!r} carries a fragment (#); fragments are never sent to a server",
            where=where,
        )
    path, _, query = target.partition("?")
    _check_path_chars(target, where)
    if _escapes(path):
        raise ForbiddenTarget(
            f"target {target[:200]!r} contains dot segments or backslashes (also when "
            "percent-encoded, once or twice, fullwidth, overlong or with ;parameters); they could "
            "escape the route",
            where=where,
        )
    return Target(path=path, query=query)


_OVERLONG = re.compile(rb"[\xc0\xc1\xf5-\xff]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")
"""Byte patterns only overlong (or out-of-range) UTF-8 produces: %c0%ae is a disguised dot."""


def _escapes(path: str) -> bool:
    if "%" not in path:  # visible ASCII (checked first): decoding and NFKC folding change nothing
        return "\\" in path or any(seg.split(";", 1)[0] in (".", "..") for seg in path.split("/"))
    once = unquote(path)
    twice = unquote(once)
    if any(_OVERLONG.search(unquote_to_bytes(text)) for text in (path, once)):
        return True
    for text in (once, twice):
        folded = unicodedata.normalize("NFKC", text)  # fullwidth dots and slashes, two-dot leader
        if "\\" in folded or folded.count("/") != text.count("/"):
            return True
        if any(segment.split(";", 1)[0] in (".", "..") for segment in folded.split("/")):
            return True
    return False


_RAW_FORBIDDEN = re.compile(r"[^\x21-\x7e]|\\")
_DECODED_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")


def _check_path_chars(target: str, where: str | None) -> None:
    if _RAW_FORBIDDEN.search(target):
        raise ForbiddenTarget(
            f"target {target[:200]!r} contains whitespace, control characters, backslashes or "
            "raw non-ASCII bytes (percent-encode them)",
            where=where,
        )
    if "%" in target and _DECODED_FORBIDDEN.search(unquote(target)):
        raise ForbiddenTarget(
            f"target {target[:200]!r} contains percent-encoded control characters", where=where
        )


def _matches(route: Route, path: str, method: str) -> bool:
    prefix = route.prefix
    if prefix != "/" and path != prefix and not path.startswith(prefix + "/"):
        return False
    return route.methods is None or method in route.methods


class RouteTable:
    """Longest prefix wins; among equal prefixes a route listing the method beats a catch-all."""

    def __init__(self, config: GatewayConfig) -> None:
        self._upstreams = {name: URL(up.url) for name, up in config.upstreams.items()}
        self._routes = sorted(
            config.routes, key=lambda r: (len(r.prefix), r.methods is not None), reverse=True
        )

    def route(self, method: str, target: Target, where: str | None = None) -> RoutedTarget:
        for route in self._routes:
            if _matches(route, target.path, method):
                path = self._rewrite(route, target.path)
                return RoutedTarget(route.upstream, self._url(route.upstream, path, target), route, path)
        detail = f"no route for {method} {target.path[:200]!r}"
        if where is not None:
            raise ForbiddenTarget(detail, where=where)
        raise RouteNotFound(detail)

    @staticmethod
    def _rewrite(route: Route, path: str) -> str:
        if route.strip_prefix and route.prefix != "/":
            path = path[len(route.prefix) :] or "/"
        return route.add_prefix + path

    def _url(self, upstream: str, path: str, target: Target) -> URL:
        return self.upstream_url(upstream, Target(path=path, query=target.query))

    def base_path(self, upstream: str) -> str:
        """The raw path of the upstream's configured URL ("" when it is the root)."""
        return self._upstreams[upstream].raw_path.rstrip("/")

    def upstream_url(self, upstream: str, target: Target) -> URL:
        """A URL on a named upstream; also for gateway-made calls (transactions, undo, snapshot)."""
        base = self._upstreams[upstream]
        return URL.build(
            scheme=base.scheme,
            host=base.raw_host or "",
            port=base.explicit_port,
            path=(base.raw_path.rstrip("/") + target.path) or "/",
            query_string=target.query,
            encoded=True,
        )
