"""The gateway's own endpoints (SPEC section 8): health, readiness, Prometheus metrics and OpenAPI,
under a prefix the config can move.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MakeGateway

# aiohttp 3.14 warns on the gateway's string request keys; see tests/test_proxy.py.

Client = TestClient[web.Request, web.Application]
ENDPOINTS = ("healthz", "readyz", "metrics", "openapi.json")


async def test_healthz_says_the_process_is_alive(gateway: Client) -> None:
    async with gateway.get("/_gateway/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_readyz_says_config_and_upstream_pools_are_ready(gateway: Client) -> None:
    async with gateway.get("/_gateway/readyz") as response:
        assert response.status == 200
        assert (await response.json())["ready"] is True


async def test_metrics_are_prometheus_text_counting_requests(gateway: Client) -> None:
    async with gateway.get("/orders") as response:
        assert response.status == 200
    async with gateway.get("/nowhere") as response:
        assert response.status == 404
    async with gateway.get("/_gateway/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert "gateway_http_requests" in families
    counted = {
        (sample.labels["kind"], sample.labels["route"], sample.labels["status_class"],
         sample.labels["origin"]): sample.value
        for sample in families["gateway_http_requests"].samples
        if sample.name == "gateway_http_requests_total"
    }
    assert counted[("proxy", "/orders", "2xx", "upstream")] == 1
    assert counted[("proxy", "", "4xx", "gateway")] == 1  # no route: the gateway's own 404
    assert "gateway_upstream_request_duration_seconds" in families


async def test_openapi_document_lists_batch_and_gateway_paths(gateway: Client) -> None:
    async with gateway.get("/_gateway/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        doc = await response.json()
    assert doc["openapi"].startswith("3.")
    assert {"/batch/v1", "/v1/api/batch"} <= set(doc["paths"])
    assert "post" in doc["paths"]["/batch/v1"]
    assert {f"/_gateway/{name}" for name in ENDPOINTS} <= set(doc["paths"])


async def test_a_configured_prefix_moves_every_gateway_endpoint(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway({"gateway": {"prefix": "/ops"}})
    for name in ENDPOINTS:
        async with gateway.get(f"/ops/{name}") as response:
            assert response.status == 200, name
        async with gateway.get(f"/_gateway/{name}") as response:
            assert response.status == 404, f"/_gateway/{name} is no longer the gateway's"
            assert response.content_type == "application/problem+json"
    async with gateway.get("/ops/openapi.json") as response:
        paths = set((await response.json())["paths"])
    assert {f"/ops/{name}" for name in ENDPOINTS} <= paths
    assert not any(path.startswith("/_gateway/") for path in paths)


async def test_openapi_follows_configured_batch_paths(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(
        {"batch": {"json": {"path": "/bulk/json"}, "multipart": {"path": "/bulk/mixed"}}}
    )
    async with gateway.get("/_gateway/openapi.json") as response:
        paths = set((await response.json())["paths"])
    assert {"/bulk/json", "/bulk/mixed"} <= paths
    assert not {"/batch/v1", "/v1/api/batch"} & paths


@pytest.mark.parametrize("path", [*(f"/_gateway/{name}" for name in ENDPOINTS), "/_gateway/batches/b1"])
@pytest.mark.parametrize("method", ["TRACE", "POST", "DELETE", "PUT"])
async def test_other_methods_on_the_gateway_s_endpoints_are_405_with_allow(
    gateway: Client, path: str, method: str
) -> None:
    """RFC 9110 section 15.5.6; before, TRACE and the rest fell through to the router's 404."""
    async with gateway.request(method, path) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"
        assert response.content_type == "application/problem+json"
        assert (await response.json())["status"] == 405


@pytest.mark.parametrize("path", ["/batch/v1", "/v1/api/batch"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "TRACE"])
async def test_other_methods_on_the_batch_endpoints_are_405_with_allow_post(
    gateway: Client, path: str, method: str
) -> None:
    async with gateway.request(method, path) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert response.content_type == "application/problem+json"
