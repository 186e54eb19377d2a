"""The Graph (`batch.graph`) and Salesforce Composite (`batch.composite`) endpoints end to end, over
real sockets against the demo upstreams: create-then-use flows, atomic rollback checked in the
upstreams' own state, failed roots whose subtrees never reach an upstream, and bad input refused
in each dialect's error shape with nothing sent. Answers are checked against the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no types-jsonschema in the test deps
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate as validate_spec

from gateway.errors import ConfigError
from tests.conftest import MakeConfig, MakeGateway, state_of

Client = TestClient[web.Request, web.Application]
GRAPH = "/v1.0/$batch"
COMPOSITE = "/services/data/v59.0/composite"
DIALECTS = {
    "batch": {
        "graph": {"path": GRAPH, "public_origins": ["https://api.example.com"]},
        "composite": {"path": COMPOSITE},
    }
}


@pytest.fixture
async def client(make_gateway: MakeGateway) -> Client:
    return await make_gateway(DIALECTS)


def calls(server: TestServer) -> list[str]:
    return [f"{call['method']} {call['path']}" for call in state_of(server).calls]


class Contract:
    """The answers' bodies validate against the operation's schemas in the OpenAPI document."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.document: dict[str, Any] | None = None

    async def check(self, path: str, status: int, body: Any) -> None:
        if self.document is None:
            async with self.client.get("/_gateway/openapi.json") as response:
                self.document = await response.json()
        assert self.document is not None
        answer = self.document["paths"][path]["post"]["responses"][str(status)]
        jsonschema.validate(body, answer["content"]["application/json"]["schema"])


async def post(client: Client, path: str, document: Any, status: int = 200, **headers: str) -> Any:
    async with client.post(path, json=document, headers=headers) as response:
        text = await response.text()
        assert response.status == status, text
        assert response.content_type == "application/json"
        assert response.headers["X-Request-ID"]
        if status == 200:
            assert response.headers["X-Batch-Id"]
        body = json.loads(text)
    await Contract(client).check(path, status, body)
    return body


async def post_headers(
    client: Client, path: str, document: Any, **headers: str
) -> tuple[Any, dict[str, str]]:
    async with client.post(path, json=document, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json(), dict(response.headers)


# --- Microsoft Graph -----------------------------------------------------------------------------


async def test_graph_create_then_use_with_depends_on(client: Client, legacy: TestServer) -> None:
    body = await post(
        client,
        GRAPH,
        {
            "requests": [
                {"id": "order", "method": "POST", "url": "/orders", "body": {"item": "pen"}},
                {
                    "id": "read",
                    "method": "GET",
                    "url": "https://api.example.com/v1.0/orders/1",
                    "dependsOn": ["order"],
                },
                {
                    "id": "all",
                    "method": "GET",
                    "url": f"http://{client.host}:{client.port}/v1.0/orders",
                    "depends_on": ["READ"],
                },
            ]
        },
    )
    answers = {a["id"]: a for a in body["responses"]}
    assert [a["id"] for a in body["responses"]] == ["order", "read", "all"]
    assert answers["order"]["status"] == 201 and answers["order"]["headers"]["Location"] == "/orders/1"
    assert answers["read"]["body"] == {"item": "pen", "id": "1"}
    assert answers["all"]["body"] == [{"item": "pen", "id": "1"}]
    assert calls(legacy) == ["POST /orders", "GET /orders/1", "GET /orders"]


async def test_graph_a_failed_root_answers_424_for_its_subtree_which_is_never_sent(
    client: Client, legacy: TestServer, ledger: TestServer
) -> None:
    body = await post(
        client,
        GRAPH,
        {
            "requests": [
                {
                    "id": "1",
                    "method": "POST",
                    "url": "/orders",
                    "body": {"item": "x"},
                    "headers": {"X-Demo-Fail": "500"},
                },
                {"id": "2", "method": "GET", "url": "/orders/1", "dependsOn": ["1"]},
                {"id": "3", "method": "POST", "url": "/accounts", "body": {"owner": "a"}, "dependsOn": ["2"]},
                {"id": "4", "method": "GET", "url": "/accounts"},
            ]
        },
    )
    statuses = {a["id"]: a["status"] for a in body["responses"]}
    assert statuses == {"1": 500, "2": 424, "3": 424, "4": 200}
    assert body["responses"][1]["body"]["error"]["code"] == "failed-dependency"
    assert calls(legacy) == ["POST /orders"]
    assert calls(ledger) == ["GET /accounts"]


async def test_graph_atomic_failure_in_the_last_call_leaves_every_upstream_as_it_was(
    client: Client, legacy: TestServer, ledger: TestServer
) -> None:
    body, headers = await post_headers(
        client,
        GRAPH,
        {
            "requests": [
                {"id": "1", "method": "POST", "url": "/orders", "body": {"item": "ink"}},
                {"id": "2", "method": "POST", "url": "/accounts", "body": {"owner": "ann"}},
                {"id": "3", "method": "GET", "url": "/orders/999"},  # 404: the last call fails
            ]
        },
        **{"X-Batch-Atomic": "true"},
    )
    assert headers["X-Batch-Outcome"] == "rolled_back"
    assert [a["status"] for a in body["responses"]] == [424, 424, 404]
    assert body["responses"][0]["headers"]["X-Batch-Item-Status"] == "rolled_back"
    assert state_of(legacy).store.records == {}
    assert state_of(ledger).store.records == {} and state_of(ledger).transactions == {}
    assert "DELETE /orders/1" in calls(legacy)  # the order was created, then compensated


async def test_graph_atomic_success_commits(client: Client, legacy: TestServer, ledger: TestServer) -> None:
    body, headers = await post_headers(
        client,
        GRAPH,
        {
            "requests": [
                {"id": "1", "method": "POST", "url": "/orders", "body": {"item": "ink"}},
                {
                    "id": "2",
                    "method": "POST",
                    "url": "/accounts",
                    "body": {"owner": "ann"},
                    "dependsOn": ["1"],
                },
            ]
        },
        **{"X-Batch-Atomic": "yes"},
    )
    assert headers["X-Batch-Outcome"] == "committed"
    assert [a["status"] for a in body["responses"]] == [201, 201]
    assert list(state_of(legacy).store.records) == ["1"] and list(state_of(ledger).store.records) == ["1"]


async def test_graph_independent_requests_run_concurrently_and_a_chain_in_order(
    client: Client, legacy: TestServer
) -> None:
    delayed = {"X-Demo-Delay": "150"}
    await post(
        client,
        GRAPH,
        {
            "requests": [
                {"id": str(n), "method": "GET", "url": f"/orders?n={n}", "headers": delayed} for n in range(3)
            ]
        },
    )
    assert state_of(legacy).max_in_flight == 3
    state_of(legacy).max_in_flight = 0
    state_of(legacy).calls.clear()
    await post(
        client,
        GRAPH,
        {
            "requests": [
                {"id": "a", "method": "GET", "url": "/orders?n=a", "headers": delayed},
                {"id": "b", "method": "GET", "url": "/orders?n=b", "headers": delayed, "dependsOn": ["a"]},
                {"id": "c", "method": "GET", "url": "/orders?n=c", "dependsOn": ["b"]},
            ]
        },
    )
    assert state_of(legacy).max_in_flight == 1
    assert calls(legacy) == ["GET /orders?n=a", "GET /orders?n=b", "GET /orders?n=c"]


@pytest.mark.parametrize(
    ("document", "status", "code", "where"),
    [
        (
            {
                "requests": [
                    {"id": "a", "method": "GET", "url": "/orders"},
                    {"id": "A", "method": "GET", "url": "/orders"},
                ]
            },
            400,
            "malformed-batch",
            "/requests/1/id",
        ),
        (
            {
                "requests": [
                    {"id": "a", "method": "GET", "url": "/orders", "dependsOn": ["b"]},
                    {"id": "b", "method": "GET", "url": "/orders"},
                ]
            },
            400,
            "malformed-batch",
            "/requests/0/dependsOn/0",
        ),
        (
            {"requests": [{"id": "a", "method": "GET", "url": "https://graph.microsoft.com/v1.0/me"}]},
            400,
            "bad-target",
            "/requests/0/url",
        ),
        (
            {
                "requests": [
                    {"id": "a", "method": "GET", "url": "/nowhere"},
                    {"id": "b", "method": "POST", "url": "/orders"},
                ]
            },
            400,
            "bad-target",
            None,
        ),
        (
            {"requests": [{"id": str(n), "method": "GET", "url": "/orders"} for n in range(21)]},
            413,
            "too-large",
            "/requests/20",
        ),
        ({"requests": "all"}, 400, "malformed-batch", "/requests"),
    ],
)
async def test_graph_bad_input_is_refused_in_graph_s_error_shape_and_nothing_is_sent(
    client: Client,
    legacy: TestServer,
    ledger: TestServer,
    document: Any,
    status: int,
    code: str,
    where: str | None,
) -> None:
    body = await post(client, GRAPH, document, status)
    error = body["error"]
    assert error["code"] == code and error["message"]
    assert error["innerError"]["type"] == f"https://batch-gateway.dev/problems/{code}"
    assert error["innerError"]["request-id"]
    if where is not None:
        assert error["innerError"]["where"] == where
    assert calls(legacy) == [] and calls(ledger) == []


async def test_graph_wrong_media_type_method_and_atomic_header(client: Client, legacy: TestServer) -> None:
    async with client.post(
        GRAPH, data=b'{"requests": []}', headers={"Content-Type": "text/plain"}
    ) as response:
        assert response.status == 415
        assert (await response.json())["error"]["code"] == "unsupported-media-type"
    async with client.get(GRAPH) as response:
        assert (response.status, response.headers["Allow"]) == (405, "POST")
        assert (await response.json())["error"]["code"] == "method-not-allowed"
    body = await post(
        client,
        GRAPH,
        {"requests": [{"id": "1", "method": "GET", "url": "/orders"}]},
        400,
        **{"X-Batch-Atomic": "maybe"},
    )
    assert body["error"]["innerError"]["where"] == "X-Batch-Atomic"
    assert calls(legacy) == []


async def test_graph_atomic_batch_that_cannot_be_undone_is_422_and_sends_nothing(
    client: Client, legacy: TestServer
) -> None:
    body = await post(
        client,
        GRAPH,
        {"requests": [{"id": "1", "method": "FROB", "url": "/orders"}]},
        422,
        **{"X-Batch-Atomic": "true"},
    )
    assert body["error"]["code"] == "uncompensable"
    assert calls(legacy) == []


# --- Salesforce Composite ------------------------------------------------------------------------


async def test_composite_create_then_use_with_references(
    client: Client, legacy: TestServer, ledger: TestServer
) -> None:
    body = await post(
        client,
        COMPOSITE,
        {
            "compositeRequest": [
                {
                    "method": "POST",
                    "url": "/services/data/v59.0/orders",
                    "referenceId": "order",
                    "body": {"item": "pen"},
                },
                {
                    "method": "POST",
                    "url": "/accounts",
                    "referenceId": "account",
                    "body": {"owner": "ann", "order": "@{order.id}", "note": "for order @{order.id}"},
                },
                {
                    "method": "PATCH",
                    "url": "/services/data/v59.0/orders/@{order.id}",
                    "referenceId": "link",
                    "body": {"account": "@{account.id}"},
                },
                {"method": "GET", "url": "/orders/@{order.ID}", "referenceId": "check"},
            ]
        },
    )
    answers = body["compositeResponse"]
    assert [a["referenceId"] for a in answers] == ["order", "account", "link", "check"]
    assert [a["httpStatusCode"] for a in answers] == [201, 201, 200, 200]
    assert answers[0]["httpHeaders"]["Location"] == "/orders/1"
    assert answers[1]["body"] == {"owner": "ann", "order": "1", "note": "for order 1", "id": "1"}
    assert answers[3]["body"] == {"item": "pen", "id": "1", "account": "1"}
    assert calls(legacy) == ["POST /orders", "PATCH /orders/1", "GET /orders/1"]


async def test_composite_all_or_none_create_then_use_commits(
    client: Client, legacy: TestServer, ledger: TestServer
) -> None:
    body, headers = await post_headers(
        client,
        COMPOSITE,
        {
            "allOrNone": True,
            "compositeRequest": [
                {"method": "POST", "url": "/orders", "referenceId": "order", "body": {"item": "pen"}},
                {
                    "method": "POST",
                    "url": "/accounts",
                    "referenceId": "account",
                    "body": {"order": "@{order.id}"},
                },
                {
                    "method": "PATCH",
                    "url": "/orders/@{order.id}",
                    "referenceId": "link",
                    "body": {"account": "@{account.id}"},
                },
            ],
        },
    )
    assert headers["X-Batch-Outcome"] == "committed"
    assert [a["httpStatusCode"] for a in body["compositeResponse"]] == [201, 201, 200]
    assert state_of(legacy).store.records == {"1": {"item": "pen", "id": "1", "account": "1"}}
    assert state_of(ledger).store.records == {"1": {"order": "1", "id": "1"}}


async def test_composite_all_or_none_rolls_back_and_halts_the_others(
    client: Client, legacy: TestServer, ledger: TestServer
) -> None:
    body, headers = await post_headers(
        client,
        COMPOSITE,
        {
            "allOrNone": True,
            "compositeRequest": [
                {"method": "POST", "url": "/orders", "referenceId": "order", "body": {"item": "pen"}},
                {
                    "method": "POST",
                    "url": "/accounts",
                    "referenceId": "account",
                    "body": {"order": "@{order.id}"},
                },
                {"method": "GET", "url": "/orders/999", "referenceId": "bad"},
            ],
        },
    )
    assert headers["X-Batch-Outcome"] == "rolled_back"
    answers = body["compositeResponse"]
    assert [a["httpStatusCode"] for a in answers] == [400, 400, 404]
    assert answers[0]["body"][0]["errorCode"] == "PROCESSING_HALTED"
    assert answers[1]["body"][0]["errorCode"] == "PROCESSING_HALTED"
    assert answers[2]["body"] == {"error": "not found"}
    assert state_of(legacy).store.records == {}
    assert state_of(ledger).store.records == {} and state_of(ledger).transactions == {}


async def test_composite_references_cannot_amplify_a_body_or_url_past_the_limits(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    """A 300 KB answer referred to 30 times would make a 12 MB body (and as one URL segment, a
    400 KB request line): each such subrequest is halted, nothing of it is sent, and the limit is
    named. It used to be sent whole, whatever the references added up to."""
    client = await make_gateway({**DIALECTS, "batch": {**DIALECTS["batch"],
                                                       "limits": {"max_body_bytes": 1024 * 1024}}})
    big = {"method": "POST", "url": "/echo/big", "referenceId": "big", "body": {"pad": "x" * 300_000}}
    body = await post(client, COMPOSITE, {"compositeRequest": [
        big,
        {"method": "POST", "url": "/echo/copies", "referenceId": "copies",
         "body": {"copies": ["@{big.body_b64}"] * 30}},
        {"method": "GET", "url": "/echo/@{big.body_b64}", "referenceId": "long"},
        {"method": "POST", "url": "/echo/one", "referenceId": "one", "body": {"copy": "@{big.body_b64}"}},
    ]})
    answers = body["compositeResponse"]
    assert [a["httpStatusCode"] for a in answers] == [200, 400, 400, 200]
    assert "limits.max_body_bytes" in answers[1]["body"][0]["message"]
    assert "8192" in answers[2]["body"][0]["message"]
    assert [c.split("?")[0] for c in calls(legacy)] == ["POST /echo/big", "POST /echo/one"]


async def test_composite_a_failed_reference_halts_its_dependents_only(
    client: Client, legacy: TestServer, ledger: TestServer
) -> None:
    body = await post(
        client,
        COMPOSITE,
        {
            "compositeRequest": [
                {
                    "method": "POST",
                    "url": "/orders",
                    "referenceId": "order",
                    "body": {"item": "pen"},
                    "httpHeaders": {"X-Demo-Fail": "503"},
                },
                {"method": "GET", "url": "/orders/@{order.id}", "referenceId": "read"},
                {"method": "POST", "url": "/accounts", "referenceId": "acct", "body": {"of": "@{read.id}"}},
                {"method": "GET", "url": "/accounts", "referenceId": "other"},
                {"method": "GET", "url": "/accounts/@{other.missing}", "referenceId": "unresolved"},
            ]
        },
    )
    answers = body["compositeResponse"]
    assert [a["httpStatusCode"] for a in answers] == [503, 400, 400, 200, 400]
    for halted in (answers[1], answers[2], answers[4]):
        assert halted["body"][0]["errorCode"] == "PROCESSING_HALTED"
    assert "other.missing" in answers[4]["body"][0]["message"]
    assert calls(legacy) == ["POST /orders"]
    assert calls(ledger) == ["GET /accounts"]


@pytest.mark.parametrize(
    ("document", "status", "code"),
    [
        (
            {"compositeRequest": [{"method": "GET", "url": "/orders/@{nobody.id}", "referenceId": "a"}]},
            400,
            "MALFORMED_BATCH",
        ),
        (
            {
                "compositeRequest": [
                    {"method": "GET", "url": "/orders/@{b.id}", "referenceId": "a"},
                    {"method": "GET", "url": "/orders", "referenceId": "b"},
                ]
            },
            400,
            "MALFORMED_BATCH",
        ),
        (
            {
                "compositeRequest": [
                    {"method": "GET", "url": "/orders", "referenceId": "a"},
                    {"method": "GET", "url": "/orders", "referenceId": "a"},
                ]
            },
            400,
            "MALFORMED_BATCH",
        ),
        (
            {"compositeRequest": [{"method": "GET", "url": "https://evil.example/x", "referenceId": "a"}]},
            400,
            "BAD_TARGET",
        ),
        (
            {
                "compositeRequest": [
                    {"method": "GET", "url": "/orders", "referenceId": f"r{n}"} for n in range(26)
                ]
            },
            413,
            "TOO_LARGE",
        ),
        (
            {
                "compositeRequest": [
                    {"method": "POST", "url": "/orders", "referenceId": "a", "body": {}},
                    {"method": "GET", "url": "/nowhere", "referenceId": "b"},
                ]
            },
            400,
            "BAD_TARGET",
        ),
    ],
)
async def test_composite_bad_input_is_refused_in_salesforce_s_error_shape_and_nothing_is_sent(
    client: Client, legacy: TestServer, ledger: TestServer, document: Any, status: int, code: str
) -> None:
    body = await post(client, COMPOSITE, document, status)
    assert isinstance(body, list) and body[0]["errorCode"] == code and body[0]["message"]
    assert calls(legacy) == [] and calls(ledger) == []


async def test_composite_method_and_media_type(client: Client) -> None:
    async with client.put(COMPOSITE, json={}) as response:
        assert (response.status, response.headers["Allow"]) == (405, "POST")
        assert (await response.json())[0]["errorCode"] == "METHOD_NOT_ALLOWED"
    async with client.post(COMPOSITE, data=b"{}") as response:
        assert response.status == 415
        assert (await response.json())[0]["errorCode"] == "UNSUPPORTED_MEDIA_TYPE"


# --- config --------------------------------------------------------------------------------------


OFF = {"batch": {"graph": None, "composite": None, "odata": None}}
"""The demo config serves every dialect; without their keys (null here) none is served."""


async def test_the_dialects_are_off_unless_configured(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(OFF)
    async with gateway.post(GRAPH, json={"requests": []}) as response:
        assert response.status == 404  # no route: the proxy answers
    document = await (await gateway.get("/_gateway/openapi.json")).json()
    assert GRAPH not in document["paths"] and COMPOSITE not in document["paths"]


async def test_the_endpoint_limit_is_configurable(make_gateway: MakeGateway, legacy: TestServer) -> None:
    client = await make_gateway({"batch": {"graph": {"path": "/$batch", "max_items": 2}}})
    body = await post(
        client,
        "/$batch",
        {"requests": [{"id": str(n), "method": "GET", "url": "/orders"} for n in range(3)]},
        413,
    )
    assert body["error"]["code"] == "too-large"
    body = await post(
        client,
        "/$batch",
        {
            "requests": [
                {"id": str(n), "method": "GET", "url": f"http://{client.host}:{client.port}/orders"}
                for n in range(2)
            ]
        },
    )
    assert [a["status"] for a in body["responses"]] == [200, 200]


def test_config_keys_are_strict_and_checked(make_config: MakeConfig) -> None:
    config = make_config(DIALECTS)
    assert config.batch.graph is not None and config.batch.composite is not None
    assert (config.batch.graph.atomic, config.batch.graph.max_items) == (False, 20)
    assert (config.batch.composite.atomic, config.batch.composite.max_items) == (False, 25)
    assert make_config(OFF).batch.graph is None and make_config(OFF).batch.composite is None
    bad = [
        ({"graph": {"path": GRAPH, "max_item": 3}}, "batch.graph.max_item"),
        ({"graph": {"path": GRAPH, "max_items": 0}}, "batch.graph.max_items"),
        (
            {"graph": {"path": GRAPH, "public_origins": ["https://gw.example/api"]}},
            "batch.graph.public_origins",
        ),
        ({"composite": {"path": "composite"}}, "batch.composite.path"),
        ({"composite": {"path": None}}, "batch.composite.path"),  # (the demo config gives a path)
    ]
    for batch, key in bad:
        with pytest.raises(ConfigError) as caught:
            make_config({"batch": batch})
        assert key in str(caught.value), caught.value
    with pytest.raises(ConfigError, match=r"batch\.graph\.path"):
        make_config({"batch": {"graph": {"path": "/orders"}}})  # the route /orders would be shadowed


async def test_the_openapi_document_describes_exactly_the_configured_endpoints(client: Client) -> None:
    async with client.get("/_gateway/openapi.json") as response:
        document = await response.json()
    validate_spec(document)
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in client.app.router.routes()
        if route.method in ("GET", "POST")
        and route.resource is not None
        and not route.resource.canonical.startswith("/{tail")
    }
    assert documented == routed
    assert {(GRAPH, "post"), (COMPOSITE, "post")} <= documented


def test_two_batch_endpoints_on_one_path_are_a_config_error(make_config: MakeConfig) -> None:
    for clash in (
        {"graph": {"path": "/batch/v1"}},  # the JSON endpoint's default path
        {"graph": {"path": "/b"}, "composite": {"path": "/b"}},
        {"composite": {"path": "/v1/api/batch"}},  # the multipart endpoint's default path
    ):
        with pytest.raises(ConfigError, match=r"path .* too"):
            make_config({"batch": clash})


async def test_a_running_dialect_batch_is_in_flight_under_its_own_kind(
    client: Client, legacy: TestServer
) -> None:
    """The in-flight gauge is labelled before the handler runs: a Graph batch is not 'proxy'."""
    document = {"requests": [{"id": "slow", "method": "GET", "url": "/echo/x?delay_ms=600"}]}
    running = asyncio.ensure_future(client.post(GRAPH, json=document))
    text = ""
    for _ in range(50):
        await asyncio.sleep(0.02)
        async with client.get("/_gateway/metrics") as response:
            text = await response.text()
        if 'gateway_http_requests_in_flight{kind="batch_graph"} 1.0' in text:
            break
    response = await running
    assert response.status == 200
    assert 'gateway_http_requests_in_flight{kind="batch_graph"} 1.0' in text


@pytest.mark.parametrize("value", ["..", "..%2Fadmin", "%2e%2e"])
async def test_a_composite_reference_from_an_upstream_answer_cannot_climb_out_of_its_route(
    client: Client, legacy: TestServer, value: str
) -> None:
    """An upstream's answer is untrusted: a referenced value that would make a dot segment is
    refused when the resolved call is planned, so that call is halted and never sent."""
    body = await post(client, COMPOSITE, {"compositeRequest": [
        {"method": "GET", "url": f"/echo/x?{value}", "referenceId": "a"},
        {"method": "GET", "url": "/orders/@{a.raw_query}", "referenceId": "b"},
    ]})
    first, second = body["compositeResponse"]
    assert first["httpStatusCode"] == 200 and first["body"]["raw_query"] == value
    assert second["httpStatusCode"] == 400
    assert second["body"][0]["errorCode"] == "PROCESSING_HALTED"
    assert not [call for call in calls(legacy) if call.startswith("GET /orders")]
