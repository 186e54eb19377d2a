"""Header rules: hop-by-hop removal (RFC 9110 section 7.6.1), batch inheritance and forwarding headers.

Pure functions over multidicts; used by the proxy, the planner and the multipart codec's twin rules.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable
from http import HTTPStatus

from multidict import CIMultiDict, MultiMapping

HOP_BY_HOP = frozenset(
    name.lower()
    for name in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)


def connection_listed(headers: MultiMapping[str]) -> set[str]:
    """Header names that the Connection header marks hop-by-hop."""
    return listed_in_connection(headers.items())


def listed_in_connection(pairs: Iterable[tuple[str, str]]) -> set[str]:
    """Header names that the Connection header(s) among plain header pairs mark hop-by-hop."""
    return {
        token.strip().lower()
        for name, value in pairs if name.lower() == "connection"
        for token in value.split(",") if token.strip()
    }


def without_hop_by_hop(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Header pairs minus hop-by-hop ones and those their Connection lists: the one rule every
    format and the proxy apply to what an upstream answered."""
    pairs = list(pairs)
    listed = listed_in_connection(pairs)
    return [(k, v) for k, v in pairs if not is_hop_by_hop(k, listed)]


_REASON = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def safe_reason(status: int, reason: str | None) -> str:
    """The upstream's reason phrase if RFC 9112 allows it (HTAB, SP, VCHAR, obs-text), else the
    standard phrase for the status (or none)."""
    if reason is not None and len(reason) <= 256 and _REASON.fullmatch(reason):
        return reason
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def is_hop_by_hop(name: str, listed: set[str]) -> bool:
    lower = name.lower()
    return lower in HOP_BY_HOP or lower.startswith("proxy-") or lower in listed


def end_to_end(headers: MultiMapping[str], *, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers (incl. Connection-listed ones) and without `drop`.

    (The rule of `is_hop_by_hop`, inlined: it runs twice for every proxied request.)
    """
    pairs = [(k, v, k.lower()) for k, v in headers.items()]
    listed = {name.lower() for name in drop}
    for _, value, lower in pairs:
        if lower == "connection":
            listed.update(token.strip().lower() for token in value.split(",") if token.strip())
    return CIMultiDict([
        (k, v) for k, v, lower in pairs
        if lower not in HOP_BY_HOP and lower not in listed and not lower.startswith("proxy-")
    ])


def inheritable(outer: MultiMapping[str]) -> CIMultiDict[str]:
    """The outer batch headers every sub-request inherits: no Content-*, hop-by-hop, Host, Expect."""
    listed = connection_listed(outer)
    return CIMultiDict(
        (k, v)
        for k, v in outer.items()
        if not is_hop_by_hop(k, listed)
        and not k.lower().startswith("content-")
        and k.lower() not in ("host", "expect")
    )


def own_headers(own: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A sub-request's own headers as sent: without hop-by-hop headers (and those its own
    `Connection` lists), Host and its framing (Content-Length, Transfer-Encoding), since the
    client session frames the body it sends."""
    pairs = list(own)
    listed = listed_in_connection(pairs)
    return [
        (k, v)
        for k, v in pairs
        if not is_hop_by_hop(k, listed) and k.lower() not in ("host", "content-length")
    ]


def inherit(base: CIMultiDict[str], own: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """Outer headers overlaid with a sub-request's own: a name it sets replaces all outer values."""
    own = own_headers(own)
    merged = base.copy()
    for name in {k.lower() for k, _ in own}:
        merged.popall(name, None)
    for name, value in own:
        merged.add(name, value)
    return merged


def new_request_id() -> str:
    return secrets.token_hex(16)


FORWARDING = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded")
REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:/+=-]{1,128}$"
"""A client's X-Request-ID is kept when it matches this (app.py), else replaced by a new one."""


class TrustedProxies:
    """The peers (CIDRs from `trusted_proxies`) whose X-Forwarded-* and Forwarded are believed."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._networks = [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]

    def trusts(self, peer: str | None) -> bool:
        if peer is None or not self._networks:
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        return any(address in network for network in self._networks)


def add_forwarding(
    headers: CIMultiDict[str], *, client_ip: str | None, proto: str, host: str | None,
    request_id: str, trusted: bool = False,
) -> None:
    """Record the hop the gateway saw, in X-Forwarded-* and RFC 7239 Forwarded, and X-Request-ID.

    From a peer that is not a trusted proxy, incoming forwarding headers are dropped first (a
    client could claim any address); from a trusted one they are kept and the hop appended, and
    its X-Forwarded-Proto/-Host (what the client really used) win over the gateway's view.
    """
    if not trusted:
        for name in FORWARDING:
            headers.popall(name, None)
    prior = ", ".join(headers.getall("X-Forwarded-For", []))
    if client_ip:
        headers["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    headers.setdefault("X-Forwarded-Proto", proto)
    if host:
        headers.setdefault("X-Forwarded-Host", host)
    element = forwarded_element(client_ip, proto, host)
    prior_forwarded = ", ".join(headers.getall("Forwarded", []))
    headers["Forwarded"] = f"{prior_forwarded}, {element}" if prior_forwarded else element
    headers[REQUEST_ID_HEADER] = request_id


def forwarded_element(client_ip: str | None, proto: str, host: str | None) -> str:
    """One RFC 7239 element: for (IPv6 bracketed and quoted), proto, host (quoted)."""
    parts = []
    if client_ip:
        node = f'"[{client_ip}]"' if ":" in client_ip else client_ip
        parts.append(f"for={node}")
    parts.append(f"proto={proto}")
    if host:
        parts.append('host="' + host.replace("\\", "").replace('"', "") + '"')
    return ";".join(parts)
