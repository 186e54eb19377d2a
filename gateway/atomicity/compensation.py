"""Compensating calls: the snapshot GET taken before a call and the undo built after it.

Pure functions of the journaled intent and outcome, so live rollback and crash recovery share them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from gateway.atomicity.plan import UndoKind, UndoSpec
from gateway.atomicity.templates import TemplateError, render_body, render_path
from gateway.atomicity.untrusted import (
    UntrustedValue,
    checked_content_type,
    checked_path,
    created_path_from_id,
    created_path_from_location,
    decoded_body,
)
from gateway.headers import inherit
from gateway.model import SubResponse
from gateway.routing import RouteTable, Target
from gateway.upstream import UpstreamCall

_NOT_COPIED = ("idempotency-key", "range", "expect", "accept-encoding", "te")
"""Besides Content-* and conditionals (If-*): they describe the forward call, not its undo."""

HeaderPairs = Sequence[Sequence[str]]


class UndoImpossible(Exception):
    """The call cannot be undone safely (e.g. its outcome is unknown and the created id too)."""


@dataclass(frozen=True, slots=True)
class CallContext:
    """What every gateway-made call of one batch needs besides its intent."""

    routes: RouteTable
    base_headers: HeaderPairs
    """The headers every call of the batch inherited (the journal keeps them once per batch)."""
    decode_cap: int
    """The most bytes a compressed upstream body may decode to (limits.max_response_bytes)."""


_NOT_JOURNALED = frozenset({"content-encoding", "content-length", "set-cookie", "authorization", "cookie"})
"""Response headers never kept: framing, and credentials an upstream hands out or echoes."""


def encode_response(response: SubResponse, *, keep_body: bool = True, cap: int) -> dict[str, Any]:
    """A response for the journal, its Content-Encoding undone (an undecodable body is noted, not kept)."""
    headers = [[k, v] for k, v in response.headers if k.lower() not in _NOT_JOURNALED]
    encoded: dict[str, Any] = {"status": response.status, "headers": headers, "body_b64": ""}
    if keep_body:
        try:
            body = decoded_body(response.headers, response.body, cap)
        except UntrustedValue as exc:
            encoded["body_error"] = str(exc)
        else:
            encoded["body_b64"] = base64.b64encode(body).decode("ascii")
    return encoded


def encode_snapshot(response: SubResponse, cap: int) -> dict[str, Any]:
    """The snapshot to journal: decoded body and a checked Content-Type; raises UntrustedValue."""
    body = decoded_body(response.headers, response.body, cap)
    content_type = checked_content_type(_find(response.headers, "Content-Type"))
    headers = [] if content_type is None else [["Content-Type", content_type]]
    return {
        "status": response.status,
        "headers": headers,
        "body_b64": base64.b64encode(body).decode("ascii"),
    }


def _body(data: dict[str, Any] | None) -> bytes:
    return b"" if data is None else base64.b64decode(data.get("body_b64", ""))


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


def _find(headers: HeaderPairs, name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name.lower():
            return str(value)
    return None


def _header(data: dict[str, Any] | None, name: str) -> str | None:
    return _find((data or {}).get("headers", []), name)


def call_headers(base: HeaderPairs, own: HeaderPairs) -> list[tuple[str, str]]:
    """A call's full headers: the batch's inherited ones overlaid with its own."""
    merged = inherit(CIMultiDict((str(k), str(v)) for k, v in base), ((str(k), str(v)) for k, v in own))
    return list(merged.items())


def gateway_headers(headers: HeaderPairs, extra: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The forward call's headers (auth etc.) for a gateway-made call, plus `extra`.

    Content-*, conditionals (If-Match ...), Range, Idempotency-Key and Accept-Encoding are left
    out: an undo guarded by the forward call's If-Match would fail with 412 for ever, and a
    snapshot must come back as plain bytes (Accept-Encoding: identity) to be restored as is.
    """
    replaced = {name.lower() for name in extra} | {"accept-encoding"}
    kept = [
        (str(k), str(v))
        for k, v in headers
        if not k.lower().startswith(("content-", "if-"))
        and k.lower() not in _NOT_COPIED
        and k.lower() not in replaced
    ]
    identity = {} if "accept-encoding" in {n.lower() for n in extra} else {"Accept-Encoding": "identity"}
    return (*kept, *identity.items(), *extra.items())


def _intent_headers(intent: dict[str, Any], ctx: CallContext) -> list[tuple[str, str]]:
    return call_headers(ctx.base_headers, intent.get("headers", []))


def snapshot_call(intent: dict[str, Any], ctx: CallContext) -> UpstreamCall | None:
    """The GET taken before a call; raises UndoImpossible when its path is not acceptable."""
    spec = UndoSpec.from_json(intent["undo"])
    if spec.snapshot_path is None:
        return None
    path = _gateway_path(spec.snapshot_path, intent, spec, "snapshot path")
    url = ctx.routes.upstream_url(intent["upstream"], Target(path, ""))
    return UpstreamCall(
        intent["upstream"], "GET", url, gateway_headers(_intent_headers(intent, ctx), {}),
        purpose="snapshot", item=intent.get("where"),
    )


def template_context(intent: dict[str, Any], outcome: dict[str, Any] | None) -> dict[str, Any]:
    spec = UndoSpec.from_json(intent["undo"])
    snapshot = intent.get("snapshot")
    context: dict[str, Any] = {
        "path": spec.path_params,
        "request": {"path": intent["path"], "body": _json_or_none(_body(intent))},
    }
    if snapshot is not None:
        context["snapshot"] = {"status": snapshot["status"], "body": _json_or_none(_body(snapshot))}
    if outcome is not None:
        headers = {k.lower(): v for k, v in outcome.get("headers", [])}
        context["response"] = {
            "status": outcome["status"],
            "headers": headers,
            "body": _json_or_none(_body(outcome)),
        }
    return context


def undo_call(
    intent: dict[str, Any], outcome: dict[str, Any] | None, ctx: CallContext, key: str
) -> UpstreamCall | None:
    """The undo for a call that (maybe) took effect; None when there is nothing to undo.

    `outcome` is None when the call's outcome is unknown: only undos that are safe whether or not
    the call happened are built then; otherwise UndoImpossible. Every target derived from an
    upstream's answer is checked (see untrusted.py); one that is refused is UndoImpossible.
    """
    spec = UndoSpec.from_json(intent["undo"])
    builders = {
        UndoKind.DELETE_CREATED: _delete_created,
        UndoKind.RESTORE: _restore,
        UndoKind.RECREATE: _recreate,
        UndoKind.RULE: _rule,
    }
    try:
        planned = builders[spec.kind](intent, outcome, spec, ctx)
        if planned is None:
            return None
        method, path, body = planned
        path = _gateway_path(path, intent, spec, "undo path")
    except UntrustedValue as exc:
        raise UndoImpossible(str(exc)) from None
    url = ctx.routes.upstream_url(intent["upstream"], Target(path, ""))
    extra = {"Idempotency-Key": key}
    if body is not None and spec.kind is UndoKind.RULE:
        extra["Content-Type"] = "application/json"
    elif body is not None:
        extra["Content-Type"] = _header(intent.get("snapshot"), "Content-Type") or "application/octet-stream"
    return UpstreamCall(
        intent["upstream"], method, url, gateway_headers(_intent_headers(intent, ctx), extra), body,
        purpose="undo", item=intent.get("where"),
    )


def _gateway_path(path: str, intent: dict[str, Any], spec: UndoSpec, what: str) -> str:
    """Inferred undos stay in the forward call's route; a declared rule may name any path of the
    upstream (the operator wrote it), but never dot segments, `//` or control characters."""
    scope = "" if spec.kind is UndoKind.RULE else str(intent.get("scope", ""))
    return checked_path(path, scope=scope, what=what)


_Planned = tuple[str, str, bytes | None] | None


def _delete_created(
    intent: dict[str, Any], outcome: dict[str, Any] | None, spec: UndoSpec, ctx: CallContext
) -> _Planned:
    if outcome is None:
        raise UndoImpossible("outcome unknown and the id of a resource it may have created is unknown")
    location = _header(outcome, "Location")
    scope = str(intent.get("scope", ""))
    if location:
        path = created_path_from_location(
            location, forward_url=URL(intent["url"]), base_path=ctx.routes.base_path(intent["upstream"]),
            scope=scope, forward_path=intent["path"],
        )
        return "DELETE", path, None
    if "body_error" in outcome:
        raise UndoImpossible(f"the response names no created resource: {outcome['body_error']}")
    body = _json_or_none(_body(outcome))
    if isinstance(body, dict) and "id" in body:
        return "DELETE", created_path_from_id(body["id"], forward_path=intent["path"], scope=scope), None
    raise UndoImpossible("the response names no created resource (no Location header, no id field)")


def _snapshot(intent: dict[str, Any]) -> tuple[int, bytes]:
    snapshot = intent.get("snapshot")
    if snapshot is None:
        raise UndoImpossible("no snapshot was taken before the call")
    return int(snapshot["status"]), _body(snapshot)


def _restore(
    intent: dict[str, Any], outcome: dict[str, Any] | None, spec: UndoSpec, ctx: CallContext
) -> _Planned:
    status, body = _snapshot(intent)
    if status == 404:
        return "DELETE", intent["path"], None
    if 200 <= status < 300:
        return "PUT", intent["path"], body
    raise UndoImpossible(f"the snapshot GET answered {status}")


def _recreate(
    intent: dict[str, Any], outcome: dict[str, Any] | None, spec: UndoSpec, ctx: CallContext
) -> _Planned:
    status, body = _snapshot(intent)
    if status in (404, 410):
        return None
    if not 200 <= status < 300:
        raise UndoImpossible(f"the snapshot GET answered {status}")
    if spec.recreate_with == "POST":
        if outcome is None:
            raise UndoImpossible("outcome unknown; recreating with POST could duplicate the resource")
        return "POST", intent["path"].rstrip("/").rsplit("/", 1)[0] or "/", body
    return "PUT", intent["path"], body


def _rule(
    intent: dict[str, Any], outcome: dict[str, Any] | None, spec: UndoSpec, ctx: CallContext
) -> _Planned:
    context = template_context(intent, outcome)
    try:
        path = render_path(spec.undo_path or "/", context)
        body = None if spec.undo_body is None else render_body(spec.undo_body, context)
    except TemplateError as exc:
        raise UndoImpossible(f"compensation rule: {exc}") from None
    encoded = None if body is None else json.dumps(body).encode("utf-8")
    return spec.undo_method or "DELETE", path, encoded


def relative_path(ctx: CallContext, call: UpstreamCall) -> str:
    """A gateway-made call's path for clients: relative to the upstream's base path (internal)."""
    base = ctx.routes.base_path(call.upstream)
    path = call.url.raw_path
    return path[len(base):] or "/" if base and path.startswith(base) else path


def undo_succeeded(call: UpstreamCall, response: SubResponse) -> bool:
    """2xx; a DELETE that finds nothing (404/410) has nothing left to undo either."""
    if call.method == "DELETE" and response.status in (404, 410):
        return True
    return 200 <= response.status < 300
