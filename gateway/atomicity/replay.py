"""Learning what a call with an unknown outcome did, by re-sending it with its idempotency key.

Only for upstreams that declare `idempotency_keys: true`: a repeated key replays the first answer.
"""

from __future__ import annotations

import base64
from typing import Any

from yarl import URL

from gateway.atomicity.compensation import CallContext, call_headers, encode_response
from gateway.atomicity.tx_calls import TransactionFailed, begin_call, read_token
from gateway.config import Transactions
from gateway.errors import UpstreamError
from gateway.routing import Target
from gateway.upstream import UpstreamCall, UpstreamPool


async def replay_forward(
    pool: UpstreamPool, ctx: CallContext, intent: dict[str, Any], key: str
) -> dict[str, Any] | None:
    """Re-send a journaled call with its key; its outcome as journaled, or None if still unknown.

    The upstream either replays the first answer (the call ran) or runs it now (it never did);
    either way the answer says what to undo.
    """
    if not intent.get("replayable"):
        return None
    url = URL(intent["url"])
    current = ctx.routes.upstream_url(intent["upstream"], Target("/", ""))
    if url.origin() != current.origin():
        return None  # the upstream moved since: do not send the call somewhere else
    headers = [
        (k, v) for k, v in call_headers(ctx.base_headers, intent.get("headers", []))
        if k.lower() != "idempotency-key"
    ]
    body = base64.b64decode(intent.get("body_b64", "")) or None
    call = UpstreamCall(intent["upstream"], intent["method"], url, (*headers, ("Idempotency-Key", key)), body,
                        purpose="replay", item=intent.get("where"))
    try:
        response = await pool.send(call)
    except UpstreamError:
        return None
    return encode_response(response, keep_body=True, cap=ctx.decode_cap)


async def replay_begin(
    pool: UpstreamPool, ctx: CallContext, upstream: str, settings: Transactions, *,
    own_headers: list[list[str]], batch_id: str, seconds: int,
) -> str | None:
    """Re-send a begin whose token was never journaled; the token, or None if still unknown."""
    try:
        call = begin_call(
            upstream, settings, ctx.routes, headers=call_headers(ctx.base_headers, own_headers),
            batch_id=batch_id, seconds=seconds,
        )
        response = await pool.send(call)
        if not 200 <= response.status < 300:
            return None
        return read_token(settings, response)
    except (UpstreamError, TransactionFailed):
        return None
