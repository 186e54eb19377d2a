"""Upstream transaction tokens: begin lazily per upstream, send the token, commit or roll back.

Each begin is journaled before it is sent and its token right after, so recovery can roll it back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from gateway.atomicity.compensation import gateway_headers
from gateway.atomicity.journal import Journal
from gateway.atomicity.rollback import with_retries
from gateway.atomicity.templates import TemplateError, lookup, render_path
from gateway.config import Rollback, Transactions
from gateway.errors import UpstreamError
from gateway.model import SubResponse
from gateway.routing import RouteTable, Target
from gateway.upstream import UpstreamCall, UpstreamPool


class TransactionFailed(Exception):
    """Begin, commit or rollback did not succeed; the message says which and why."""


def read_token(settings: Transactions, response: SubResponse) -> str:
    """The token from the begin response: a JSON field (dotted) or a header."""
    if settings.token.header is not None:
        token = dict((k.lower(), v) for k, v in response.headers).get(settings.token.header.lower())
    else:
        try:
            token = lookup(json.loads(response.body), settings.token.json_field or "")
        except (ValueError, UnicodeDecodeError, TemplateError, AttributeError):
            token = None
    if not isinstance(token, str | int) or not str(token) or any(c in str(token) for c in "\r\n\0"):
        raise TransactionFailed(f"the begin response (status {response.status}) carries no usable token")
    return str(token)


async def end_transaction(
    pool: UpstreamPool,
    routes: RouteTable,
    upstream: str,
    settings: Transactions,
    *,
    token: str,
    headers: list[list[str]],
    commit: bool,
    retry: Rollback | None = None,
) -> None:
    """Send commit or rollback for one token; raises TransactionFailed unless it answered 2xx.

    A rollback is retried with `retry`'s backoff, like an undo; a commit is sent once.
    """
    template = settings.commit if commit else settings.rollback
    path = render_path(template.path, {"token": token})
    extra = {settings.header: token}
    call = UpstreamCall(
        upstream,
        template.method,
        routes.upstream_url(upstream, Target(path, "")),
        gateway_headers({"headers": headers}, extra),
        timeout=settings.timeout,
    )
    action = "commit" if commit else "rollback"

    async def attempt() -> str | None:
        try:
            response = await pool.send(call)
        except UpstreamError as exc:
            return f"{action} on {upstream!r} failed: {exc.detail}"
        if not 200 <= response.status < 300:
            return f"{action} on {upstream!r} answered {response.status}"
        return None

    error = await (attempt() if commit or retry is None else _retried(attempt, retry))
    if error is not None:
        raise TransactionFailed(error)


async def _retried(attempt: Callable[[], Awaitable[str | None]], retry: Rollback) -> str | None:
    error, tries = await with_retries(attempt, retry)
    return None if error is None else f"{error} (after {tries} attempts)"


class TransactionSet:
    """The transactions one batch holds, one per transactional upstream, in the order begun."""

    def __init__(
        self, batch_id: str, pool: UpstreamPool, routes: RouteTable, journal: Journal,
        settings: dict[str, Transactions], retry: Rollback | None = None,
    ) -> None:
        self._batch_id = batch_id
        self._retry = retry
        self._pool = pool
        self._routes = routes
        self._journal = journal
        self._settings = settings
        self._locks: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in settings}
        self.tokens: dict[str, str] = {}
        self.headers: dict[str, list[list[str]]] = {}
        self.begun: list[str] = []

    def header(self, upstream: str) -> str:
        return self._settings[upstream].header

    async def token(self, upstream: str, call_headers: tuple[tuple[str, str], ...]) -> str:
        """The batch's token on this upstream, beginning the transaction on first use."""
        async with self._locks[upstream]:
            if upstream not in self.tokens:
                await self._begin(upstream, [list(pair) for pair in call_headers])
            return self.tokens[upstream]

    async def _begin(self, upstream: str, headers: list[list[str]]) -> None:
        settings = self._settings[upstream]
        self.headers[upstream] = headers
        await self._journal.tx_state(self._batch_id, upstream, "beginning", headers=headers)
        key = f"{self._batch_id}.tx.{upstream}"
        call = UpstreamCall(
            upstream,
            settings.begin.method,
            self._routes.upstream_url(upstream, Target(settings.begin.path, "")),
            gateway_headers({"headers": headers}, {"Idempotency-Key": key}),
            timeout=settings.timeout,
        )
        if upstream not in self.begun:  # a retried begin (the first one failed) is still one
            self.begun.append(upstream)
        try:
            response = await self._pool.send(call)
        except UpstreamError as exc:
            raise TransactionFailed(f"begin on {upstream!r} failed: {exc.detail}") from None
        if not 200 <= response.status < 300:
            raise TransactionFailed(f"begin on {upstream!r} answered {response.status}")
        self.tokens[upstream] = read_token(settings, response)
        await self._journal.tx_state(self._batch_id, upstream, "open", token=self.tokens[upstream])

    async def end(self, upstream: str, *, commit: bool) -> str | None:
        """Commit or roll back one upstream's transaction; returns an error message or None."""
        token = self.tokens.get(upstream)
        if token is None:
            await self._journal.tx_state(self._batch_id, upstream, "never_begun")
            return None if not commit else f"no transaction token for {upstream!r}"
        try:
            await end_transaction(
                self._pool, self._routes, upstream, self._settings[upstream],
                token=token, headers=self.headers[upstream], commit=commit, retry=self._retry,
            )
        except TransactionFailed as exc:
            await self._journal.tx_state(self._batch_id, upstream, _failed(commit))
            return str(exc)
        await self._journal.tx_state(self._batch_id, upstream, _done(commit))
        return None


def _done(commit: bool) -> str:
    return "committed" if commit else "rolled_back"


def _failed(commit: bool) -> str:
    return "commit_failed" if commit else "rollback_failed"

