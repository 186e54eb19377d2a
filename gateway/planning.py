"""Planning: every sub-request routed, validated and given its final headers, query and body.

All of it happens before the first upstream call, so a bad batch is rejected with nothing executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_plus

from multidict import CIMultiDict

from gateway.config import Route
from gateway.errors import MalformedBatch
from gateway.headers import add_forwarding, inherit, inheritable, own_headers
from gateway.model import Batch, ExecutionMode, Headers, Item, SubRequest
from gateway.routing import RouteTable, Target, parse_target
from gateway.upstream import UpstreamCall


@dataclass(frozen=True, slots=True)
class OuterRequest:
    """What a batch's sub-requests inherit from the HTTP request that carried the batch."""

    headers: CIMultiDict[str]
    raw_query: str
    client_ip: str | None
    proto: str
    host: str | None
    request_id: str
    trusted_peer: bool = False
    """The peer is a trusted proxy: its X-Forwarded-* / Forwarded are kept."""


@dataclass(frozen=True, slots=True)
class PlannedCall:
    """One sub-request ready to send: its position (depth-first, from 0) and the resolved call."""

    position: int
    request: SubRequest
    call: UpstreamCall
    upstream_path: str
    """Path on the upstream relative to its base URL: what compensation rules match."""
    scope: str = ""
    """The part of the upstream the route reaches (see RoutedTarget.scope): undo targets stay in it."""
    own_headers: Headers = ()
    """The sub-request's own headers as sent (after filtering); the rest is inherited from the batch."""
    route: Route | None = None
    """The route the call came by (graph batches map a `Location` back through it)."""

    @property
    def where(self) -> str:
        return self.request.where

    @property
    def upstream(self) -> str:
        return self.call.upstream


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    mode: ExecutionMode
    items: tuple[PlannedCall | PlannedBatch, ...]
    where: str


PlanNode = PlannedCall | PlannedBatch


@dataclass(frozen=True, slots=True)
class BatchPlan:
    root: PlanNode
    calls: tuple[PlannedCall, ...]
    base_headers: Headers = ()
    """What every sub-request inherits (outer headers plus forwarding headers), stored once."""


def merge_query(outer: str, own: str) -> str:
    """Outer query parameters first, then the sub-request's; a name the sub-request sets wins."""
    own_parts = [part for part in own.split("&") if part]
    own_names = {unquote_plus(part.split("=", 1)[0]) for part in own_parts}
    kept = [
        part
        for part in outer.split("&")
        if part and unquote_plus(part.split("=", 1)[0]) not in own_names
    ]
    return "&".join(kept + own_parts)


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""Not allowed in a field value (RFC 9110 section 5.5); aiohttp's client refuses to send them."""
CONTROL_CHARS_PATTERN = _CONTROL_CHARS.pattern
"""Public for gateway/openapi.py: what an item's header value must not contain."""


REFUSED_ITEM_METHODS = frozenset({"CONNECT", "TRACE"})
"""CONNECT would send an authority-form request line; TRACE echoes credentials back."""

REFUSED_ITEM_HEADERS = frozenset({"x-batch-atomic", "x-batch-execution", "expect"})
"""The gateway's control headers belong on the outer request; Expect would make the call wait."""

GATEWAY_OWNED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded",
                           "x-request-id"})
"""Set by the gateway on every call, as on the proxy path; an item's own values are dropped."""


def _check_item(request: SubRequest) -> None:
    if request.method.upper() in REFUSED_ITEM_METHODS:
        raise MalformedBatch(
            f"method {request.method!r} is not allowed in a batch item", where=request.where
        )
    for name, value in request.headers:
        if name.lower() in REFUSED_ITEM_HEADERS:
            raise MalformedBatch(
                f"header {name!r} is not allowed in a batch item (send control headers on the "
                "outer request; the gateway handles Expect itself)",
                where=request.where,
            )
        if _CONTROL_CHARS.search(value):
            raise MalformedBatch(
                f"header {name[:100]!r} holds a control character; "
                "only visible characters, space and tab are allowed",
                where=request.where,
            )


@dataclass(frozen=True, slots=True)
class _Inherited:
    """What every call of a batch inherits: as a multidict (to merge an item's own headers into)
    and as items, split around the X-Request-ID so that an item with no headers of its own gets
    `before + ((X-Request-ID, <id>.<position>),) + after` without a pass over every header."""

    headers: CIMultiDict[str]
    items: Headers
    before: Headers
    request_id: tuple[str, str] | None
    after: Headers

    @classmethod
    def of(cls, base: CIMultiDict[str]) -> _Inherited:
        items = tuple(base.items())
        at = next((n for n, (name, _) in enumerate(items) if name == "X-Request-ID"), None)
        if at is None:
            return cls(base, items, items, None, ())
        return cls(base, items, items[:at], items[at], items[at + 1:])

    def for_position(self, position: int) -> Headers:
        """The inherited headers of the call at `position`: its X-Request-ID is `<id>.<position>`."""
        if self.request_id is None:
            return self.items
        name, value = self.request_id
        return (*self.before, (name, f"{value}.{position}"), *self.after)


class Planner:
    """Turns a decoded batch into a plan against the route table; raises ClientError subclasses."""

    def __init__(self, routes: RouteTable) -> None:
        self._routes = routes

    def plan(self, item: Item, outer: OuterRequest) -> BatchPlan:
        calls: list[PlannedCall] = []
        inherited = self._inherited(outer)
        root = self._node(item, inherited, outer.raw_query, calls)
        return BatchPlan(root=root, calls=tuple(calls), base_headers=inherited.items)

    def bind(self, outer: OuterRequest) -> BoundPlanner:
        """A planner for single calls of one outer request, at positions the caller chooses
        (graph batches plan calls one by one: some only once their references are resolved)."""
        return BoundPlanner(self, self._inherited(outer), outer.raw_query)

    @staticmethod
    def _inherited(outer: OuterRequest) -> _Inherited:
        base = inheritable(outer.headers)
        add_forwarding(
            base,
            client_ip=outer.client_ip,
            proto=outer.proto,
            host=outer.host,
            request_id=outer.request_id,
            trusted=outer.trusted_peer,
        )
        return _Inherited.of(base)

    def _node(
        self, item: Item, base: _Inherited, query: str, calls: list[PlannedCall]
    ) -> PlanNode:
        if isinstance(item, Batch):
            children = tuple(self._node(child, base, query, calls) for child in item.items)
            return PlannedBatch(mode=item.mode, items=children, where=item.where)
        planned = self._call(item, base, query, len(calls))
        calls.append(planned)
        return planned

    def _call(
        self, request: SubRequest, inherited: _Inherited, query: str, position: int
    ) -> PlannedCall:
        _check_item(request)
        target = parse_target(request.target, request.where)
        if query or target.query:  # (most items have neither: nothing to merge)
            target = Target(path=target.path, query=merge_query(query, target.query))
        routed = self._routes.route(request.method, target, request.where)
        own = [
            (k, v) for k, v in own_headers(request.headers) if k.lower() not in GATEWAY_OWNED
        ] if request.headers else []
        base = inherited.headers
        if own:
            merged = inherit(base, own)
            if "X-Request-ID" in base:  # <outer id>.<position>: upstream logs join to the batch
                merged["X-Request-ID"] = f"{base['X-Request-ID']}.{position}"
            headers = tuple(merged.items())
        else:  # the common case, without copying a multidict per item
            headers = inherited.for_position(position)
        call = UpstreamCall(
            upstream=routed.upstream,
            method=request.method,
            url=routed.url,
            headers=headers,
            body=request.body,
            item=request.where,
        )
        return PlannedCall(
            position=position, request=request, call=call, upstream_path=routed.path,
            scope=routed.scope, own_headers=tuple(own), route=routed.route,
        )


class BoundPlanner:
    """Plans single calls of one outer request (Planner.bind); raises ClientError subclasses."""

    def __init__(self, planner: Planner, inherited: _Inherited, query: str) -> None:
        self._planner, self._inherited, self._query = planner, inherited, query

    @property
    def base_headers(self) -> Headers:
        """What every call inherits (outer headers plus forwarding headers)."""
        return self._inherited.items

    def call(self, request: SubRequest, position: int) -> PlannedCall:
        """The call planned at `position` (its X-Request-ID is `<outer id>.<position>`)."""
        return self._planner._call(request, self._inherited, self._query, position)
