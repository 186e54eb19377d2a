"""The transactions one atomic batch holds: begun lazily per upstream, committed or rolled back.

Each begin is journaled before it is sent and its token right after, so recovery can roll it back.
"""

from __future__ import annotations

import asyncio

from gateway.atomicity.compensation import HeaderPairs, call_headers
from gateway.atomicity.journal import Journal
from gateway.atomicity.tx_calls import (
    TransactionFailed,
    begin_call,
    end_problem,
    end_transaction,
    read_token,
    token_problem,
)
from gateway.config import Rollback, Transactions
from gateway.errors import BatchLost, JournalUnavailable, UpstreamError
from gateway.routing import RouteTable
from gateway.upstream import UpstreamPool

__all__ = ["TransactionFailed", "TransactionSet", "end_transaction"]


class TransactionSet:
    """The transactions one batch holds, one per transactional upstream, in the order begun."""

    def __init__(
        self, batch_id: str, pool: UpstreamPool, routes: RouteTable, journal: Journal,
        settings: dict[str, Transactions], retry: Rollback | None = None,
        base_headers: HeaderPairs = (), lifetimes: dict[str, int] | None = None,
    ) -> None:
        self._lifetimes = lifetimes or {}
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
        self.batch_lost: BatchLost | None = None
        """A shared journal fenced the batch off: no begin, commit or rollback is sent after it."""

    def header(self, upstream: str) -> str:
        return self._settings[upstream].header

    async def token(self, upstream: str, own_headers: HeaderPairs) -> str:
        """The batch's token on this upstream, beginning the transaction on first use.

        `own_headers` are the first call's own headers (the batch's inherited ones are added).
        """
        async with self._locks[upstream]:
            if upstream not in self.tokens:
                await self._begin(upstream, [list(pair) for pair in own_headers])
            token = self.tokens[upstream]
            unusable = end_problem(self._settings[upstream], token)
            if unusable is not None:  # no call may ride in a transaction that cannot be ended
                self.lost[upstream] = f"{unusable}; the transaction may be left open on {upstream!r}"
                raise TransactionFailed(unusable)
            problem = token_problem(token)
            if problem is not None:
                raise TransactionFailed(f"{problem}; the transaction is rolled back by its path")
            return token

    def _headers(self, upstream: str) -> list[tuple[str, str]]:
        return call_headers(self._base_headers, self.headers.get(upstream, []))

    async def _begin(self, upstream: str, own: list[list[str]]) -> None:
        settings = self._settings[upstream]
        self.headers[upstream] = own
        call = begin_call(
            upstream, settings, self._routes, headers=self._headers(upstream),
            batch_id=self._batch_id, seconds=self._lifetimes.get(upstream, 60),
        )
        try:
            await self._journal.tx_state(self._batch_id, upstream, "beginning", headers=own)
        except BatchLost as exc:
            self.batch_lost = self.batch_lost or exc
            raise TransactionFailed(f"begin on {upstream!r} not sent: {exc.detail}") from None
        except JournalUnavailable as exc:
            raise TransactionFailed(f"begin on {upstream!r} not sent: {exc.detail}") from None
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
        except BatchLost as exc:
            self.batch_lost = self.batch_lost or exc
        except JournalUnavailable as exc:
            self.journal_error = exc.detail

    async def end(self, upstream: str, *, commit: bool) -> str | None:
        """Commit or roll back one upstream's transaction; returns an error message or None.

        A rollback also reports a transaction that may have been opened but never identified.
        """
        if not await self._still_owned():
            return f"not {'committed' if commit else 'rolled back'} here: the batch was taken over"
        token = self.tokens.get(upstream)
        lost = None if commit else self.lost.get(upstream)
        if token is None:
            await self._note(upstream, "never_begun" if lost is None else "lost")
            return lost if not commit else f"no transaction token for {upstream!r}"
        try:
            await end_transaction(
                self._pool, self._routes, upstream, self._settings[upstream],
                token=token, headers=self._headers(upstream), commit=commit, retry=self._retry,
                batch_id=self._batch_id,
            )
        except TransactionFailed as exc:
            await self._note(upstream, _failed(commit))
            return str(exc)
        await self._note(upstream, _done(commit))
        return lost


    async def _still_owned(self) -> bool:
        """A fenced-off batch sends no commit or rollback; a journal that cannot answer does not
        stop them (nobody can take the batch over through a journal that is down)."""
        if self.batch_lost is not None:
            return False
        try:
            await self._journal.fence(self._batch_id)
        except BatchLost as exc:
            self.batch_lost = exc
            return False
        except JournalUnavailable as exc:
            self.journal_error = exc.detail
        return True


def _done(commit: bool) -> str:
    return "committed" if commit else "rolled_back"


def _failed(commit: bool) -> str:
    return "commit_failed" if commit else "rollback_failed"
