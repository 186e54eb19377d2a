"""Upstream transaction tokens: begin lazily per upstream, send the token, commit or roll back.

Each begin is journaled before it is sent and its token right after, so recovery can roll it back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from gateway.atomicity.compensation import HeaderPairs, call_headers, gateway_headers
from gateway.atomicity.journal import Journal
from gateway.atomicity.rollback import with_retries
from gateway.atomicity.templates import TemplateError, lookup, render_path
from gateway.atomicity.untrusted import (
    MAX_TOKEN_CHARS,
    UntrustedValue,
    checked_path,
    checked_token,
    header_safe,
)
from gateway.config import Rollback, Transactions
from gateway.errors import JournalUnavailable, UpstreamError
from gateway.model import SubResponse
from gateway.routing import RouteTable, Target
from gateway.upstream import UpstreamCall, UpstreamPool


class TransactionFailed(Exception):
    """Begin, commit or rollback did not succeed; the message says which and why."""


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
) -> None:
    """Send commit or rollback for one token; raises TransactionFailed unless it answered 2xx.

    A rollback is retried with `retry`'s backoff, like an undo; a commit is sent once. A token that
    cannot travel in a header is sent in the path only, if the template has `{token}`.
    """
    action = "commit" if commit else "rollback"
    template = settings.commit if commit else settings.rollback
    try:
        path = checked_path(render_path(template.path, {"token": token}), scope="", what=f"{action} path")
    except UntrustedValue as exc:
        raise TransactionFailed(f"{action} on {upstream!r} not sent: {exc}") from None
    extra: dict[str, str] = {}
    if header_safe(token):
        extra[settings.header] = token
    elif "{token}" not in template.path:
        raise TransactionFailed(
            f"{action} on {upstream!r} not sent: the token cannot travel in a header "
            "and the path template has no {token}"
        )
    call = UpstreamCall(
        upstream,
        template.method,
        routes.upstream_url(upstream, Target(path, "")),
        gateway_headers(headers, extra),
        timeout=settings.timeout,
    )

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
        base_headers: HeaderPairs = (),
    ) -> None:
        self._batch_id = batch_id
        self._base_headers = base_headers
        self._retry = retry
        self._pool = pool
        self._routes = routes
        self._journal = journal
        self._settings = settings
        self._locks: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in settings}
        self.tokens: dict[str, str] = {}
        self.headers: dict[str, list[list[str]]] = {}
        self.begun: list[str] = []
        self.lost: dict[str, str] = {}
        """Upstreams where a transaction may be open whose token the gateway never got."""
        self.journal_error: str | None = None

    def header(self, upstream: str) -> str:
        return self._settings[upstream].header

    async def token(self, upstream: str, own_headers: HeaderPairs) -> str:
        """The batch's token on this upstream, beginning the transaction on first use.

        `own_headers` are the first call's own headers (the batch's inherited ones are added).
        """
        async with self._locks[upstream]:
            if upstream not in self.tokens:
                await self._begin(upstream, [list(pair) for pair in own_headers])
            problem = token_problem(self.tokens[upstream])
            if problem is not None:
                raise TransactionFailed(f"{problem}; the transaction is rolled back by its path")
            return self.tokens[upstream]

    def _headers(self, upstream: str) -> list[tuple[str, str]]:
        return call_headers(self._base_headers, self.headers.get(upstream, []))

    async def _begin(self, upstream: str, own: list[list[str]]) -> None:
        settings = self._settings[upstream]
        self.headers[upstream] = own
        try:
            await self._journal.tx_state(self._batch_id, upstream, "beginning", headers=own)
        except JournalUnavailable as exc:
            raise TransactionFailed(f"begin on {upstream!r} not sent: {exc.detail}") from None
        key = f"{self._batch_id}.tx.{upstream}"
        call = UpstreamCall(
            upstream,
            settings.begin.method,
            self._routes.upstream_url(upstream, Target(settings.begin.path, "")),
            gateway_headers(self._headers(upstream), {"Idempotency-Key": key}),
            timeout=settings.timeout,
        )
        if upstream not in self.begun:  # a retried begin (the first one failed) is still one
            self.begun.append(upstream)
        try:
            response = await self._pool.send(call)
        except UpstreamError as exc:
            if exc.maybe_executed:
                self.lost[upstream] = (
                    f"a begin on {upstream!r} may have opened a transaction whose token never "
                    f"arrived ({exc.detail})"
                )
            raise TransactionFailed(f"begin on {upstream!r} failed: {exc.detail}") from None
        if not 200 <= response.status < 300:
            raise TransactionFailed(f"begin on {upstream!r} answered {response.status}")
        try:
            self.tokens[upstream] = read_token(settings, response)
        except TransactionFailed as exc:
            self.lost[upstream] = f"{exc}; a transaction may be left open on {upstream!r}"
            raise
        await self._note(upstream, "open", token=self.tokens[upstream])

    async def _note(self, upstream: str, state: str, token: str | None = None) -> None:
        """Journal a transaction's state; a journal that cannot be written is remembered, not raised
        (what the batch holds is known in memory, and the coordinator reports the journal failure)."""
        try:
            await self._journal.tx_state(self._batch_id, upstream, state, token=token)
        except JournalUnavailable as exc:
            self.journal_error = exc.detail

    async def end(self, upstream: str, *, commit: bool) -> str | None:
        """Commit or roll back one upstream's transaction; returns an error message or None.

        A rollback also reports a transaction that may have been opened but never identified.
        """
        token = self.tokens.get(upstream)
        lost = None if commit else self.lost.get(upstream)
        if token is None:
            await self._note(upstream, "never_begun" if lost is None else "lost")
            return lost if not commit else f"no transaction token for {upstream!r}"
        try:
            await end_transaction(
                self._pool, self._routes, upstream, self._settings[upstream],
                token=token, headers=self._headers(upstream), commit=commit, retry=self._retry,
            )
        except TransactionFailed as exc:
            await self._note(upstream, _failed(commit))
            return str(exc)
        await self._note(upstream, _done(commit))
        return lost


def _done(commit: bool) -> str:
    return "committed" if commit else "rolled_back"


def _failed(commit: bool) -> str:
    return "commit_failed" if commit else "rollback_failed"
