"""Compensating calls: the snapshot GET taken before a call and the undo built after it.

Pure functions of the journaled intent and outcome, so live rollback and crash recovery share them.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from yarl import URL

from gateway.atomicity.plan import UndoKind, UndoSpec
from gateway.atomicity.templates import TemplateError, render_body, render_path
from gateway.model import SubResponse
from gateway.routing import RouteTable, Target
from gateway.upstream import UpstreamCall

_NOT_COPIED = ("idempotency-key", "range", "expect")
"""Besides Content-* and conditionals (If-*): they describe the forward call, not its undo."""


class UndoImpossible(Exception):
    """The call cannot be undone safely (e.g. its outcome is unknown and the created id too)."""


def encode_response(response: SubResponse) -> dict[str, Any]:
    return {
        "status": response.status,
        "headers": [list(pair) for pair in response.headers],
        "body_b64": base64.b64encode(response.body).decode("ascii"),
    }


def _body(data: dict[str, Any] | None) -> bytes:
    return b"" if data is None else base64.b64decode(data.get("body_b64", ""))


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None


def _header(data: dict[str, Any] | None, name: str) -> str | None:
    for key, value in (data or {}).get("headers", []):
        if key.lower() == name.lower():
            return str(value)
    return None


def gateway_headers(intent: dict[str, Any], extra: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The forward call's headers (auth etc.) for a gateway-made call, plus `extra`.

    Content-*, conditionals (If-Match ...), Range and Idempotency-Key are left out: an undo
    guarded by the forward call's If-Match would fail with 412 for ever.
    """
    replaced = {name.lower() for name in extra}
    kept = [
        (k, v)
        for k, v in intent["headers"]
        if not k.lower().startswith(("content-", "if-"))
        and k.lower() not in _NOT_COPIED
        and k.lower() not in replaced
    ]
    return (*((k, v) for k, v in kept), *extra.items())


def snapshot_call(intent: dict[str, Any], routes: RouteTable) -> UpstreamCall | None:
    spec = UndoSpec.from_json(intent["undo"])
    if spec.snapshot_path is None:
        return None
    url = routes.upstream_url(intent["upstream"], Target(spec.snapshot_path, ""))
    return UpstreamCall(intent["upstream"], "GET", url, gateway_headers(intent, {}))


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
    intent: dict[str, Any], outcome: dict[str, Any] | None, routes: RouteTable, key: str
) -> UpstreamCall | None:
    """The undo for a call that (maybe) took effect; None when there is nothing to undo.

    `outcome` is None when the call's outcome is unknown: only undos that are safe whether or not
    the call happened are built then; otherwise UndoImpossible.
    """
    spec = UndoSpec.from_json(intent["undo"])
    builders = {
        UndoKind.DELETE_CREATED: _delete_created,
        UndoKind.RESTORE: _restore,
        UndoKind.RECREATE: _recreate,
        UndoKind.RULE: _rule,
    }
    planned = builders[spec.kind](intent, outcome, spec)
    if planned is None:
        return None
    method, path_or_url, body = planned
    url = path_or_url if isinstance(path_or_url, URL) else routes.upstream_url(
        intent["upstream"], Target(path_or_url, "")
    )
    extra = {"Idempotency-Key": key}
    if body is not None and spec.kind is UndoKind.RULE:
        extra["Content-Type"] = "application/json"
    elif body is not None:
        extra["Content-Type"] = _header(intent.get("snapshot"), "Content-Type") or "application/json"
    return UpstreamCall(intent["upstream"], method, url, gateway_headers(intent, extra), body)


_Planned = tuple[str, "str | URL", bytes | None] | None


def _delete_created(intent: dict[str, Any], outcome: dict[str, Any] | None, spec: UndoSpec) -> _Planned:
    if outcome is None:
        raise UndoImpossible("outcome unknown and the id of a resource it may have created is unknown")
    location = _header(outcome, "Location")
    if location:
        target = URL(intent["url"]).join(URL(location))
        if target.origin() != URL(intent["url"]).origin():
            raise UndoImpossible(f"Location {location!r} points outside the upstream")
        return "DELETE", target.with_query(None).with_fragment(None), None
    body = _json_or_none(_body(outcome))
    if isinstance(body, dict) and isinstance(body.get("id"), str | int):
        return "DELETE", intent["path"].rstrip("/") + "/" + str(body["id"]), None
    raise UndoImpossible("the response names no created resource (no Location header, no id field)")


def _snapshot(intent: dict[str, Any]) -> tuple[int, bytes]:
    snapshot = intent.get("snapshot")
    if snapshot is None:
        raise UndoImpossible("no snapshot was taken before the call")
    return int(snapshot["status"]), _body(snapshot)


def _restore(intent: dict[str, Any], outcome: dict[str, Any] | None, spec: UndoSpec) -> _Planned:
    status, body = _snapshot(intent)
    if status == 404:
        return "DELETE", intent["path"], None
    if 200 <= status < 300:
        return "PUT", intent["path"], body
    raise UndoImpossible(f"the snapshot GET answered {status}")


def _recreate(intent: dict[str, Any], outcome: dict[str, Any] | None, spec: UndoSpec) -> _Planned:
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


def _rule(intent: dict[str, Any], outcome: dict[str, Any] | None, spec: UndoSpec) -> _Planned:
    context = template_context(intent, outcome)
    try:
        path = render_path(spec.undo_path or "/", context)
        body = None if spec.undo_body is None else render_body(spec.undo_body, context)
    except TemplateError as exc:
        raise UndoImpossible(f"compensation rule: {exc}") from None
    encoded = None if body is None else json.dumps(body).encode("utf-8")
    return spec.undo_method or "DELETE", path, encoded


def undo_succeeded(call: UpstreamCall, response: SubResponse) -> bool:
    """2xx; a DELETE that finds nothing (404/410) has nothing left to undo either."""
    if call.method == "DELETE" and response.status in (404, 410):
        return True
    return 200 <= response.status < 300
