"""The access log: one JSON line per request served, with what the gateway decided about it.

Written by the app's middleware once the answer is known; a rejected request's error is on this
same line (no second line), so one request is always one line.
"""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from gateway.errors import GatewayError
from gateway.runtime import BATCH_ID, KIND, REQUEST_ID, UPSTREAM

log = structlog.get_logger("gateway.access")
REJECTION = web.RequestKey("rejection", GatewayError)
"""The error the gateway answered with (problem+json), when it did."""


def log_access(request: web.Request, response: web.StreamResponse, started: float) -> None:
    rejection = request.get(REJECTION)
    fields = {
        "request_id": request[REQUEST_ID],
        "method": request.method,
        "path": request.path,
        "kind": request.get(KIND, "proxy"),
        "upstream": request.get(UPSTREAM),
        "batch_id": request.get(BATCH_ID),
        "status": response.status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    if rejection is not None:
        fields["error"] = type(rejection).__name__
        fields["detail"] = rejection.detail
        log.warning("request", **fields)
    else:
        log.info("request", **fields)
