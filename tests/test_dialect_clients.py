"""Real clients against the gateway on loopback: msgraph-core's BatchRequestBuilder (Graph JSON
batching) and simple-salesforce's `restful("composite", ...)` (Salesforce Composite).

msgraph-core: an HttpxRequestAdapter with anonymous auth whose base URL is the gateway's
`http://127.0.0.1:<port>/v1.0`; it posts to `<base>/$batch` and sends every request's `url` absolute
(`http://127.0.0.1:<port>/v1.0/orders`), which the gateway accepts on its own origin and strips. It
reads answer bodies as base64 bytes, so JSON bodies come back as None: ids, statuses and headers
are what is asserted. msgraph-core 1.5 needs `Deprecated` (imported, not declared) and
microsoft-kiota-serialization-json (to write the batch): both are in the [test] extra.

simple-salesforce: builds `https://<instance>/services/data/v<version>/` itself (the scheme is fixed),
so the gateway serves TLS here (a trustme CA the client's requests.Session trusts) and
`instance_url` is `https://127.0.0.1:<port>`; `batch.composite.path` is the path it requests. Its
calls are synchronous (requests), so they run in a thread while the gateway serves in the loop.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import trustme
from aiohttp.test_utils import TestServer
from kiota_abstractions.api_error import APIError
from kiota_abstractions.authentication import AnonymousAuthenticationProvider
from kiota_abstractions.method import Method
from kiota_abstractions.request_information import RequestInformation
from kiota_http.httpx_request_adapter import HttpxRequestAdapter
from kiota_serialization_json.json_parse_node_factory import JsonParseNodeFactory
from kiota_serialization_json.json_serialization_writer_factory import JsonSerializationWriterFactory
from msgraph_core.requests.batch_request_builder import BatchRequestBuilder  # type: ignore[import-untyped]
from msgraph_core.requests.batch_request_content import BatchRequestContent  # type: ignore[import-untyped]
from msgraph_core.requests.batch_request_item import BatchRequestItem  # type: ignore[import-untyped]
from msgraph_core.requests.batch_response_content import BatchResponseContent  # type: ignore[import-untyped]
from simple_salesforce.api import Salesforce
from simple_salesforce.exceptions import SalesforceMalformedRequest

from gateway.app import create_app
from tests.conftest import MakeConfig, state_of

GRAPH = "/v1.0/$batch"
COMPOSITE = "/services/data/v59.0/composite"
DIALECTS = {"batch": {"graph": {"path": GRAPH}, "composite": {"path": COMPOSITE}}}


# --- msgraph-core ----------------------------------------------------------------------------------


@pytest.fixture
async def graph_base(aiohttp_server: Any, make_config: MakeConfig) -> str:
    server: TestServer = await aiohttp_server(create_app(make_config(DIALECTS)))
    return f"http://127.0.0.1:{server.port}/v1.0"


def _adapter(base: str, http_client: httpx.AsyncClient) -> HttpxRequestAdapter:
    adapter = HttpxRequestAdapter(
        AnonymousAuthenticationProvider(),
        parse_node_factory=JsonParseNodeFactory(),
        serialization_writer_factory=JsonSerializationWriterFactory(),
        http_client=http_client,
    )
    adapter.base_url = base
    return adapter


def _item(
    base: str,
    method: Method,
    path: str,
    item_id: str,
    body: Any = None,
    depends_on: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> BatchRequestItem:
    info = RequestInformation()
    info.http_method = method
    info.url = base + path
    for name, value in (headers or {}).items():
        info.headers.try_add(name, value)
    if body is not None:
        info.headers.try_add("Content-Type", "application/json")
        info.content = json.dumps(body).encode()
    return BatchRequestItem(info, id=item_id, depends_on=depends_on or [])


async def _post(base: str, *items: BatchRequestItem) -> BatchResponseContent:
    content = BatchRequestContent()
    for item in items:
        content.add_request(item.id, item)
    async with httpx.AsyncClient() as http_client:  # closed here: the adapter never closes its own
        answer = await BatchRequestBuilder(_adapter(base, http_client)).post(content)
    assert isinstance(answer, BatchResponseContent)
    return answer


async def test_msgraph_core_create_then_use(graph_base: str, legacy: TestServer) -> None:
    answer = await _post(
        graph_base,
        _item(graph_base, Method.POST, "/orders", "order", {"item": "pen"}),
        _item(graph_base, Method.GET, "/orders/1", "read", depends_on=["order"]),
        _item(graph_base, Method.GET, "/orders", "all", depends_on=["read"]),
    )
    assert answer.get_response_status_codes() == {"order": 201, "read": 200, "all": 200}
    order = answer.get_response_by_id("order")
    assert order is not None and order.headers is not None
    assert order.headers["Location"] == "/orders/1"
    assert order.headers["Content-Type"].startswith("application/json")
    assert [f"{c['method']} {c['path']}" for c in state_of(legacy).calls] == [
        "POST /orders",
        "GET /orders/1",
        "GET /orders",
    ]
    assert state_of(legacy).store.records == {"1": {"item": "pen", "id": "1"}}


async def test_msgraph_core_a_failed_root_gives_424_to_its_dependents(
    graph_base: str, legacy: TestServer
) -> None:
    answer = await _post(
        graph_base,
        _item(graph_base, Method.POST, "/orders", "1", {"item": "x"}, headers={"X-Demo-Fail": "500"}),
        _item(graph_base, Method.GET, "/orders/1", "2", depends_on=["1"]),
        _item(graph_base, Method.GET, "/orders", "3"),
    )
    assert answer.get_response_status_codes() == {"1": 500, "2": 424, "3": 200}
    assert [c["path"] for c in state_of(legacy).calls] == ["/orders", "/orders"]


async def test_msgraph_core_sees_a_refused_batch_as_an_api_error(graph_base: str, legacy: TestServer) -> None:
    with pytest.raises(APIError) as caught:
        await _post(
            graph_base,
            _item(graph_base, Method.GET, "/orders", "a"),
            _item(graph_base, Method.GET, "/orders", "A"),
        )  # ids are unique case-insensitively
    assert caught.value.response_status_code == 400
    foreign = _item(graph_base, Method.GET, "/orders", "x")
    foreign.url = "https://graph.microsoft.com/v1.0/me"
    with pytest.raises(APIError) as caught:
        await _post(graph_base, foreign)
    assert caught.value.response_status_code == 400
    assert state_of(legacy).calls == []


# --- simple-salesforce -----------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def salesforce(
    aiohttp_server: Any, make_config: MakeConfig, ca: trustme.CA, tmp_path: Path
) -> AsyncIterator[Salesforce]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server: TestServer = await aiohttp_server(create_app(make_config(DIALECTS)), ssl=context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    session = requests.Session()
    session.verify = str(ca_file)
    session.trust_env = False  # REQUESTS_CA_BUNDLE and proxies from the environment would override it
    session.headers["Connection"] = "close"  # no TLS connection outlives its call (and the test)
    yield Salesforce(
        instance_url=f"https://127.0.0.1:{server.port}",
        session_id="00Dxx!token",
        version="59.0",
        session=session,
    )
    session.close()  # its pooled TLS connection, else a ResourceWarning in a later test
    await asyncio.sleep(0.1)  # and the gateway's side of it sees the close while the loop runs


async def _composite(sf: Salesforce, document: dict[str, Any]) -> Any:
    return await asyncio.to_thread(sf.restful, "composite", method="POST", json=document)


async def test_simple_salesforce_composite_create_then_use(
    salesforce: Salesforce, legacy: TestServer, ledger: TestServer
) -> None:
    assert salesforce.base_url.endswith(f"{COMPOSITE.removesuffix('composite')}")
    answer = await _composite(
        salesforce,
        {
            "allOrNone": True,
            "compositeRequest": [
                {
                    "method": "POST",
                    "url": "/services/data/v59.0/orders",
                    "referenceId": "refOrder",
                    "body": {"item": "pen"},
                },
                {
                    "method": "POST",
                    "url": "/services/data/v59.0/accounts",
                    "referenceId": "refAccount",
                    "body": {"owner": "ann", "OrderId": "@{refOrder.id}"},
                },
                {
                    "method": "GET",
                    "url": "/services/data/v59.0/orders/@{refOrder.id}",
                    "referenceId": "refCheck",
                },
            ],
        },
    )
    responses = answer["compositeResponse"]
    assert [(r["referenceId"], r["httpStatusCode"]) for r in responses] == [
        ("refOrder", 201),
        ("refAccount", 201),
        ("refCheck", 200),
    ]
    assert responses[1]["body"] == {"owner": "ann", "OrderId": "1", "id": "1"}
    assert responses[0]["httpHeaders"]["Location"] == "/orders/1"
    forwarded = state_of(legacy).calls[0]["headers"]
    assert ("Authorization", "Bearer 00Dxx!token") in forwarded  # the session travels to each call
    assert list(state_of(ledger).store.records) == ["1"]


async def test_simple_salesforce_all_or_none_rollback(
    salesforce: Salesforce, legacy: TestServer, ledger: TestServer
) -> None:
    answer = await _composite(
        salesforce,
        {
            "allOrNone": True,
            "compositeRequest": [
                {
                    "method": "POST",
                    "url": "/services/data/v59.0/orders",
                    "referenceId": "o",
                    "body": {"item": "pen"},
                },
                {
                    "method": "POST",
                    "url": "/services/data/v59.0/accounts",
                    "referenceId": "a",
                    "body": {"o": "@{o.id}"},
                },
                {"method": "GET", "url": "/services/data/v59.0/orders/999", "referenceId": "bad"},
            ],
        },
    )
    responses = answer["compositeResponse"]
    assert [r["httpStatusCode"] for r in responses] == [400, 400, 404]
    assert [r["body"][0].get("errorCode") for r in responses[:2]] == ["PROCESSING_HALTED"] * 2
    assert state_of(legacy).store.records == {} and state_of(ledger).store.records == {}


async def test_simple_salesforce_sees_a_refused_request_as_malformed(
    salesforce: Salesforce, legacy: TestServer
) -> None:
    with pytest.raises(SalesforceMalformedRequest) as caught:
        await _composite(
            salesforce,
            {
                "compositeRequest": [
                    {
                        "method": "GET",
                        "url": "/services/data/v59.0/orders/@{later.id}",
                        "referenceId": "first",
                    },
                    {"method": "GET", "url": "/services/data/v59.0/orders", "referenceId": "later"},
                ]
            },
        )
    assert caught.value.status == 400
    content: Any = caught.value.content
    assert content[0]["errorCode"] == "MALFORMED_BATCH" and content[0]["fields"] == [
        "/compositeRequest/0/url"
    ]
    assert state_of(legacy).calls == []
