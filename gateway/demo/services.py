"""The demo upstream services: `legacy` (CRUD on /orders, no transactions) and `ledger` (/accounts
with transaction tokens), plus echo, streaming and fault-injection endpoints the tests drive.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

from aiohttp import web

from gateway.demo.store import Record, Store

TOKEN_HEADER = "X-Transaction-Token"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FaultRule:
    """Answer `status`, drop the connection, or delay, for calls matching method + path prefix."""

    path_prefix: str
    method: str | None = None
    status: int | None = None
    drop: str | None = None  # "before" or "after" the call takes effect
    delay_ms: int = 0
    times: int = -1  # -1: every time

    def matches(self, request: web.Request) -> bool:
        method_ok = self.method is None or self.method.upper() == request.method
        return method_ok and request.path.startswith(self.path_prefix) and self.times != 0


@dataclass
class DemoState:
    """Everything one demo service knows: its store, open transactions, call log and faults."""

    store: Store = field(default_factory=Store)
    transactions: dict[str, Store] = field(default_factory=dict)
    faults: list[FaultRule] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    honour_idempotency_keys: bool = True
    """A repeated Idempotency-Key replays the first answer (switch off with /_demo/idempotency)."""
    answers: dict[str, tuple[int, bytes, list[tuple[str, str]]]] = field(default_factory=dict)
    expires: dict[str, float] = field(default_factory=dict)
    """Transaction token -> monotonic time after which it is rolled back on its own."""
    in_flight: int = 0
    max_in_flight: int = 0


DEMO_STATE = web.AppKey("demo_state", DemoState)


def _state(request: web.Request) -> DemoState:
    return request.app[DEMO_STATE]


def _take_fault(request: web.Request) -> FaultRule | None:
    header = request.headers.get("X-Demo-Fail")
    if header is not None:
        return FaultRule(path_prefix="/", status=int(header), times=1)
    drop = request.headers.get("X-Demo-Drop")
    delay = int(request.headers.get("X-Demo-Delay", "0"))
    if drop is not None or delay:
        return FaultRule(path_prefix="/", drop=drop, delay_ms=delay, times=1)
    for rule in _state(request).faults:
        if rule.matches(request):
            rule.times -= 1 if rule.times > 0 else 0
            return rule
    return None


def _drop(request: web.Request) -> web.StreamResponse:
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionResetError("demo: connection dropped on purpose")


@web.middleware
async def demo_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Records each call, tracks calls in flight and applies fault rules."""
    if request.path.startswith("/_demo/"):
        return await handler(request)
    state = _state(request)
    state.calls.append(
        {"method": request.method, "path": request.path_qs, "headers": list(request.headers.items())}
    )
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        return await _apply_fault(request, handler)
    finally:
        state.in_flight -= 1


async def _replaying(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Idempotency-Key: the first answer to a key is kept and returned again for a repeat."""
    state, key = _state(request), request.headers.get("Idempotency-Key")
    if key is None or not state.honour_idempotency_keys:
        return await handler(request)
    if key in state.answers:
        status, body, headers = state.answers[key]
        return web.Response(status=status, body=body, headers=headers)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    if isinstance(response, web.Response) and response.status < 500:
        headers = [(k, v) for k, v in response.headers.items() if k.lower() in ("location", "content-type")]
        state.answers[key] = (response.status, bytes(response.body or b""), headers)  # type: ignore[arg-type]
    return response


async def _apply_fault(request: web.Request, handler: Handler) -> web.StreamResponse:
    _expire_transactions(_state(request))
    rule = _take_fault(request)
    if rule is None:
        return await _replaying(request, handler)
    if rule.delay_ms:
        await asyncio.sleep(rule.delay_ms / 1000)
    if rule.drop == "before":
        return _drop(request)
    if rule.status is not None:
        return web.json_response({"error": "injected fault"}, status=rule.status)
    response = await _replaying(request, handler)
    if rule.drop == "after":
        return _drop(request)
    return response


async def _json_body(request: web.Request) -> Record:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text='{"error": "body must be JSON"}') from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}')
    return data


def _store_for(request: web.Request) -> Store:
    state = _state(request)
    token = request.headers.get(TOKEN_HEADER)
    if token is None:
        return state.store
    view = state.transactions.get(token)
    if view is None:
        raise web.HTTPConflict(text=json.dumps({"error": f"unknown transaction {token!r}"}))
    return view


def crud_routes(collection: str) -> list[web.RouteDef]:
    """POST/GET on /<collection>, GET/PUT/PATCH/DELETE on /<collection>/{id}."""

    async def create(request: web.Request) -> web.Response:
        record = _store_for(request).create(await _json_body(request))
        return _record_response(collection, record, 201)

    async def listing(request: web.Request) -> web.Response:
        records = _store_for(request).records
        return web.json_response(sorted(records.values(), key=lambda r: r["id"]))

    async def read(request: web.Request) -> web.Response:
        record = _store_for(request).records.get(request.match_info["id"])
        if record is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(record)

    async def replace(request: web.Request) -> web.Response:
        store, key = _store_for(request), request.match_info["id"]
        existed = key in store.records
        record = store.put(key, await _json_body(request))
        return _record_response(collection, record, 200 if existed else 201)

    async def patch(request: web.Request) -> web.Response:
        store, key = _store_for(request), request.match_info["id"]
        if key not in store.records:
            return web.json_response({"error": "not found"}, status=404)
        record = store.put(key, {**store.records[key], **await _json_body(request)})
        return web.json_response(record)

    async def delete(request: web.Request) -> web.Response:
        if _store_for(request).delete(request.match_info["id"]) is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(status=204)

    item = f"/{collection}/{{id}}"
    return [
        web.post(f"/{collection}", create),
        web.get(f"/{collection}", listing),
        web.get(item, read),
        web.put(item, replace),
        web.patch(item, patch),
        web.delete(item, delete),
    ]


def _record_response(collection: str, record: Record, status: int) -> web.Response:
    response = web.json_response(record, status=status)
    if status == 201:
        response.headers["Location"] = f"/{collection}/{record['id']}"
    return response


def _expire_transactions(state: DemoState) -> None:
    now = time.monotonic()
    for token in [t for t, ends in state.expires.items() if ends <= now]:
        state.transactions.pop(token, None)
        del state.expires[token]


def transaction_routes() -> list[web.RouteDef]:
    """POST /tx -> {"token"}; POST /tx/{token}/commit and /rollback."""

    async def begin(request: web.Request) -> web.Response:
        """`{"timeout": seconds}` in the body or `?timeout=` (optional): rolled back after that."""
        state = _state(request)
        token = secrets.token_hex(8)
        state.transactions[token] = state.store.fork()
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            body = {}
        timeout = body.get("timeout") if isinstance(body, dict) else None
        timeout = request.query.get("timeout", timeout)
        if isinstance(timeout, int | float | str) and str(timeout).replace(".", "", 1).isdigit():
            state.expires[token] = time.monotonic() + float(timeout)
        return web.json_response({"token": token}, status=201, headers={TOKEN_HEADER: token})

    async def finish(request: web.Request) -> web.Response:
        state = _state(request)
        view = state.transactions.pop(request.match_info["token"], None)
        if view is None:
            return web.json_response({"error": "unknown transaction"}, status=404)
        committed = request.match_info["action"] == "commit"
        if committed:
            state.store.merge(view)
        return web.json_response({"status": "committed" if committed else "rolled back"})

    return [web.post("/tx", begin), web.post("/tx/{token}/{action:commit|rollback}", finish)]


def utility_routes() -> list[web.RouteDef]:
    """Echo, streaming download/upload, a redirect, and the /_demo control endpoints."""
    return [
        web.route("*", "/echo{tail:.*}", _echo),
        web.get("/bytes/{n:[0-9]+}", _download),
        web.post("/upload", _upload),
        web.get("/redirect", _redirect),
        web.get("/_demo/state", _dump_state),
        web.get("/_demo/calls", _dump_calls),
        web.post("/_demo/faults", _add_fault),
        web.post("/_demo/idempotency", _set_idempotency),
        web.post("/_demo/reset", _reset),
    ]


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    await asyncio.sleep(float(request.query.get("delay_ms", "0")) / 1000)
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query_string": request.query_string,
            "raw_query": request.rel_url.raw_query_string,
            "headers": list(request.headers.items()),
            "body_b64": base64.b64encode(body).decode(),
        },
        status=int(request.query.get("status", "200")),
    )


async def _download(request: web.Request) -> web.StreamResponse:
    remaining = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = remaining
    await response.prepare(request)
    chunk = bytes(range(256)) * 256
    while remaining > 0:
        await response.write(chunk[: min(len(chunk), remaining)])
        remaining -= len(chunk)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    digest, size = hashlib.sha256(), 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"bytes": size, "sha256": digest.hexdigest()})


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("http://example.invalid/elsewhere")


async def _dump_state(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response(
        {"records": state.store.snapshot(), "open_transactions": sorted(state.transactions)}
    )


async def _dump_calls(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response({"calls": state.calls, "max_in_flight": state.max_in_flight})


async def _add_fault(request: web.Request) -> web.Response:
    _state(request).faults.append(FaultRule(**await request.json()))
    return web.json_response({"faults": len(_state(request).faults)})


async def _set_idempotency(request: web.Request) -> web.Response:
    """`{"honour": false}` makes the service ignore Idempotency-Key (each call runs again)."""
    _state(request).honour_idempotency_keys = bool((await request.json()).get("honour", True))
    return web.json_response({"honour": _state(request).honour_idempotency_keys})


async def _reset(request: web.Request) -> web.Response:
    state, fresh = _state(request), DemoState()
    for name in fields(DemoState):
        setattr(state, name.name, getattr(fresh, name.name))
    return web.json_response({"reset": True})


def legacy_app() -> web.Application:
    """The legacy CRUD service: /orders, no transactions."""
    app = web.Application(middlewares=[demo_middleware], client_max_size=1024**3)
    app[DEMO_STATE] = DemoState()
    app.add_routes(crud_routes("orders") + utility_routes())
    return app


def ledger_app() -> web.Application:
    """The transactional service: /accounts, with POST /tx tokens."""
    app = web.Application(middlewares=[demo_middleware], client_max_size=1024**3)
    app[DEMO_STATE] = DemoState()
    app.add_routes(crud_routes("accounts") + transaction_routes() + utility_routes())
    return app
