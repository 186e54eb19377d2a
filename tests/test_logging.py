"""Logs: one line per request and one per sub-request, with the fields operators filter on.

structlog's capture_logs records what the gateway logs while a real batch runs over a socket.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

Client = TestClient[web.Request, web.Application]


async def test_a_batch_logs_each_sub_request_and_the_request(gateway: Client) -> None:
    batch = {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": "GET", "operation": "/echo/a"}},
        {"SingleItem": {"method": "GET", "operation": "/echo/b?status=500"}},
    ]}}
    with capture_logs() as logs:
        response = await gateway.post("/batch/v1", json=batch, headers={"X-Request-ID": "req-42"})
        assert response.status == 200
        batch_id = response.headers["X-Batch-Id"]
    calls = [entry for entry in logs if entry["event"] == "subrequest"]
    assert [(c["item"], c["upstream"], c["method"], c["status"]) for c in calls] == [
        ("/Batch/items/0/SingleItem", "legacy", "GET", 200),
        ("/Batch/items/1/SingleItem", "legacy", "GET", 500),
    ]
    assert all(c["duration_ms"] >= 0 for c in calls)
    (access,) = [entry for entry in logs if entry["event"] == "request"]
    assert access["request_id"] == "req-42"
    assert access["batch_id"] == batch_id
    assert access["kind"] == "batch_json"
    assert access["status"] == 200
