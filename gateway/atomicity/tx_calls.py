"""Begin, commit and rollback calls built from an upstream's transaction templates, and the token.

Shared by the live TransactionSet and by recovery, which re-sends them with the same idempotency keys.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import unquote

from gateway.atomicity.compensation import HeaderPairs, gateway_headers
from gateway.atomicity.rollback import with_retries
from gateway.atomicity.templates import TemplateError, lookup, render_body, render_path
from gateway.atomicity.untrusted import MAX_TOKEN_CHARS, UntrustedValue, checked_token
from gateway.config import CallTemplate, GatewayConfig, Rollback, Transactions
from gateway.errors import UpstreamError
from gateway.model import SubResponse
from gateway.routing import RouteTable, Target
from gateway.upstream import UpstreamCall, UpstreamPool


class TransactionFailed(Exception):
    """Begin, commit or rollback did not succeed; the message says which and why.

    `status` is the upstream's answer when it gave one (404/410: it knows no such transaction).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def tx_key(batch_id: str, upstream: str, action: str = "") -> str:
    """Idempotency keys: `<batch>.tx.<upstream>` on the begin, `...commit` / `...rollback` after."""
    return f"{batch_id}.tx.{upstream}" + (f".{action}" if action else "")


def lifetime(config: GatewayConfig, upstream: str) -> int:
    """`{timeout}` in a begin template: whole seconds the upstream should keep the transaction."""
    settings = config.upstreams[upstream].transactions
    configured = settings.lifetime if settings is not None else None
    seconds = configured or config.batch.limits.batch_timeout + config.batch.rollback.deadline
    return math.ceil(seconds)


def template_call(
    upstream: str, template: CallTemplate, values: dict[str, Any], routes: RouteTable, *,
    headers: HeaderPairs, extra: dict[str, str], timeout: float, what: str,
) -> UpstreamCall:
    """Render a transaction template (path, optional `?query`, optional JSON body) into a call."""
    try:
        path, query = rendered_path(template, values, what)
        body = None if template.body is None else render_body(template.body, values)
    except (UntrustedValue, TemplateError) as exc:
        raise TransactionFailed(f"{what} on {upstream!r} not sent: {exc}") from None
    encoded = None if body is None else json.dumps(body).encode("utf-8")
    if encoded is not None:
        extra = {**extra, "Content-Type": "application/json"}
    return UpstreamCall(
        upstream, template.method, routes.upstream_url(upstream, Target(path, query)),
        gateway_headers(headers, extra), encoded, timeout=timeout, purpose=what,
        path_template=template.path.partition("?")[0],
    )


def rendered_path(template: CallTemplate, values: dict[str, Any], what: str) -> tuple[str, str]:
    """The template's path and query with its values in (each percent-encoded as one segment).

    The literal part was checked at config load; a value may hold any bytes, encoded, but the
    path must not gain dot segments or empty segments from it (also when decoded).
    """
    path, _, query = render_path(template.path, values).partition("?")
    segments = path.split("/")[1:]
    empty_inside = "" in segments[:-1]
    if not path.startswith("/") or empty_inside or any(_dot_segment(segment) for segment in segments):
        raise UntrustedValue(f"{what} path {path[:200]!r} refused: dot or empty segments")
    return path, query


def _dot_segment(segment: str) -> bool:
    return segment in (".", "..") or any(part in (".", "..") for part in unquote(segment).split("/"))


def end_problem(settings: Transactions, token: str) -> str | None:
    """Why a transaction with this token could not be committed or rolled back, or None."""
    for template, what in ((settings.commit, "commit"), (settings.rollback, "rollback")):
        try:
            rendered_path(template, {"token": token}, what)
        except UntrustedValue as exc:
            return f"the begin response's token cannot name its transaction: {exc}"
        if token_problem(token) is not None and "{token}" not in template.path:
            return "the begin response's token can travel neither in a header nor in the " + what + " path"
    return None


def begin_call(
    upstream: str, settings: Transactions, routes: RouteTable, *,
    headers: HeaderPairs, batch_id: str, seconds: int,
) -> UpstreamCall:
    return template_call(
        upstream, settings.begin, {"timeout": seconds}, routes, headers=headers,
        extra={"Idempotency-Key": tx_key(batch_id, upstream)}, timeout=settings.timeout, what="begin",
    )


def read_token(settings: Transactions, response: SubResponse) -> str:
    """The token from the begin response: a JSON field (dotted) or a header.

    Raises TransactionFailed when there is none. A token that cannot travel in a header (control
    characters, non-ASCII) is still returned, so the transaction can be rolled back by its path.
    """
    if settings.token.header is not None:
        token = dict((k.lower(), v) for k, v in response.headers).get(settings.token.header.lower())
    else:
        try:
            token = lookup(json.loads(response.body), settings.token.json_field or "")
        except (ValueError, UnicodeDecodeError, TemplateError, AttributeError, TypeError):
            token = None
    if isinstance(token, bool) or not isinstance(token, str | int) or not str(token):
        raise TransactionFailed(f"the begin response (status {response.status}) carries no usable token")
    if len(str(token)) > MAX_TOKEN_CHARS:
        raise TransactionFailed(
            f"the begin response's token is over {MAX_TOKEN_CHARS} characters; the transaction it "
            "names cannot be ended by the gateway and may stay open on the upstream"
        )
    return str(token)


def token_problem(token: str) -> str | None:
    """Why a token cannot be sent as the transaction header, or None when it can."""
    try:
        checked_token(token)
    except UntrustedValue as exc:
        return str(exc)
    return None


async def end_transaction(
    pool: UpstreamPool,
    routes: RouteTable,
    upstream: str,
    settings: Transactions,
    *,
    token: str,
    headers: HeaderPairs,
    commit: bool,
    retry: Rollback | None = None,
    batch_id: str = "",
) -> None:
    """Send commit or rollback for one token; raises TransactionFailed unless it answered 2xx.

    A rollback is retried with `retry`'s backoff, like an undo; a commit is sent once. A token that
    cannot travel in a header is sent in the path only, if the template has `{token}`. Both carry
    `Idempotency-Key: <batch>.tx.<upstream>.commit|rollback`, so re-sending one after a crash
    replays the first answer on an upstream that honours keys.
    """
    action = "commit" if commit else "rollback"
    template = settings.commit if commit else settings.rollback
    extra: dict[str, str] = {"Idempotency-Key": tx_key(batch_id, upstream, action)} if batch_id else {}
    if token_problem(token) is None:
        extra[settings.header] = token
    elif "{token}" not in template.path:
        raise TransactionFailed(
            f"{action} on {upstream!r} not sent: the token cannot travel in a header "
            "and the path template has no {token}"
        )
    call = template_call(
        upstream, template, {"token": token}, routes, headers=headers, extra=extra,
        timeout=settings.timeout, what=action,
    )

    answered: list[int] = []

    async def attempt() -> str | None:
        try:
            response = await pool.send(call)
        except UpstreamError as exc:
            return f"{action} on {upstream!r} failed: {exc.detail}"
        answered.append(response.status)
        if not 200 <= response.status < 300:
            return f"{action} on {upstream!r} answered {response.status}"
        return None

    if commit or retry is None:
        error = await attempt()
    else:
        error, tries = await with_retries(attempt, retry)
        if tries > 1:  # the same series as undo retries: both are rollback actions
            pool.metrics.child(pool.metrics.undo_retries, upstream).inc(tries - 1)
        if error is not None:
            error = f"{error} (after {tries} attempts)"
    if error is not None:
        raise TransactionFailed(error, answered[-1] if answered else None)

