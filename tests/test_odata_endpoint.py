"""The OData `$batch` endpoint (`batch.odata`) end to end, over real sockets to the demo upstreams.

`legacy` (/orders, CRUD, compensation; answers a create with `Location: /orders/<id>`, which maps back
onto the gateway's `/orders` route) and `ledger` (/accounts, transaction tokens). Answers are read
with `json` and Python's `email` package; upstream state and call logs are read directly.
"""

from __future__ import annotations

import http.client
import io
import json
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import MakeConfig, MakeGateway, state_of

Client = TestClient[web.Request, web.Application]
PATH = "/$batch"
ODATA = {"batch": {"odata": {"path": PATH}}}
V4 = {"OData-Version": "4.0"}


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> Client:
    return await make_gateway(ODATA)


async def post_json(client: Client, document: Any, **headers: str) -> tuple[int, Any, Any]:
    response = await client.post(
        PATH, data=json.dumps(document), headers={"Content-Type": "application/json", **headers}
    )
    return response.status, await response.json(), response.headers


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def part(request: str, content_id: str | None = None) -> str:
    cid = f"Content-ID: {content_id}\n" if content_id is not None else ""
    return f"Content-Type: application/http\nContent-Transfer-Encoding: binary\n{cid}\n{request}"


def changeset(boundary: str, *parts: str) -> str:
    inner = "".join(f"--{boundary}\n{p}\n" for p in parts) + f"--{boundary}--"
    return f"Content-Type: multipart/mixed; boundary={boundary}\n\n{inner}"


def multipart(*parts: str) -> bytes:
    return crlf("".join(f"--batch_x\n{p}\n" for p in parts) + "--batch_x--\n")


async def post_multipart(client: Client, body: bytes, **headers: str) -> tuple[int, Message, Any]:
    response = await client.post(
        PATH, data=body, headers={"Content-Type": "multipart/mixed; boundary=batch_x", **headers}
    )
    data = await response.read()
    content_type = response.headers["Content-Type"]
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data
    )
    return response.status, message, response.headers


def http_of(message: Message) -> tuple[int, dict[str, str], bytes]:
    payload = cast(bytes, message.get_payload(decode=True))

    class Sock:
        def makefile(self, *args: object, **kwargs: object) -> io.BytesIO:
            return io.BytesIO(payload)

    response = http.client.HTTPResponse(Sock())  # type: ignore[arg-type]
    response.begin()
    return response.status, dict(response.getheaders()), response.read()


def parts_of(message: Message) -> list[Message]:
    return cast(list[Message], message.get_payload())


def upstream_calls(server: TestServer) -> list[tuple[str, str]]:
    return [(call["method"], call["path"]) for call in state_of(server).calls]


def post(path: str, body: dict[str, Any], *extra: str) -> str:
    text = json.dumps(body)
    headers = "".join(f"{h}\n" for h in extra)
    head = f"POST {path} HTTP/1.1\nContent-Type: application/json\n{headers}"
    return f"{head}Content-Length: {len(text)}\n\n{text}"


# --- OData JSON ---------------------------------------------------------------------------------


async def test_json_create_then_use_with_a_reference(gw: Client, legacy: TestServer) -> None:
    status, answer, headers = await post_json(
        gw,
        {
            "requests": [
                {"id": "1", "method": "post", "url": "orders", "body": {"item": "book"}},
                {
                    "id": "2",
                    "dependsOn": ["1"],
                    "method": "patch",
                    "url": "$1",
                    "body": {"lines": [{"sku": "b-1"}]},
                },
                {"id": "3", "dependsOn": ["1", "2"], "method": "get", "url": "$1"},
            ]
        },
    )
    assert status == 200 and headers["OData-Version"] == "4.01"
    responses = {r["id"]: r for r in answer["responses"]}
    assert [responses[i]["status"] for i in "123"] == [201, 200, 200]
    assert responses["1"]["headers"]["location"] == "/orders/1"
    assert responses["3"]["body"] == {"item": "book", "lines": [{"sku": "b-1"}], "id": "1"}
    assert state_of(legacy).store.records["1"]["lines"] == [{"sku": "b-1"}]
    assert ("PATCH", "/orders/1") in upstream_calls(legacy)


async def test_json_atomic_group_failing_last_leaves_every_upstream_as_it_was(
    gw: Client, legacy: TestServer, ledger: TestServer
) -> None:
    state_of(legacy).store.put("9", {"item": "kept"})
    before_legacy, before_ledger = state_of(legacy).store.snapshot(), state_of(ledger).store.snapshot()
    status, answer, _ = await post_json(
        gw,
        {
            "requests": [
                {"id": "1", "atomicityGroup": "g", "method": "post", "url": "/orders", "body": {"item": "x"}},
                {
                    "id": "2",
                    "atomicityGroup": "g",
                    "dependsOn": ["1"],
                    "method": "patch",
                    "url": "$1",
                    "body": {"lines": [1]},
                },
                {
                    "id": "3",
                    "atomicityGroup": "g",
                    "method": "post",
                    "url": "/accounts",
                    "body": {"owner": "a"},
                },
                {
                    "id": "4",
                    "atomicityGroup": "g",
                    "method": "patch",
                    "url": "/orders/9",
                    "body": {"item": "changed"},
                },
                {
                    "id": "5",
                    "atomicityGroup": "g",
                    "method": "post",
                    "url": "/orders",
                    "headers": {"X-Demo-Fail": "500"},
                    "body": {},
                },
                {"id": "6", "dependsOn": ["g"], "method": "get", "url": "/orders"},
            ]
        },
    )
    assert status == 200
    responses = {r["id"]: r for r in answer["responses"]}
    assert [responses[i]["status"] for i in "123456"] == [424, 424, 424, 424, 500, 424]
    assert all(responses[i]["atomicityGroup"] == "g" for i in "12345")
    assert responses["1"]["headers"]["x-batch-item-status"] == "rolled_back"
    assert state_of(legacy).store.snapshot() == before_legacy
    assert state_of(ledger).store.snapshot() == before_ledger
    assert not state_of(ledger).transactions
    assert ("GET", "/orders") not in upstream_calls(legacy)  # the dependent of the group was not sent


async def test_json_dependents_of_a_failure_answer_424_and_are_not_sent(
    gw: Client, legacy: TestServer
) -> None:
    status, answer, _ = await post_json(
        gw,
        {
            "requests": [
                {"id": "a", "method": "get", "url": "/orders/404"},
                {"id": "b", "dependsOn": ["a"], "method": "post", "url": "/orders", "body": {"from": "b"}},
                {"id": "c", "dependsOn": ["b"], "method": "post", "url": "/orders", "body": {"from": "c"}},
                {"id": "d", "method": "post", "url": "/orders", "body": {"from": "d"}},
            ]
        },
    )
    assert status == 200
    responses = {r["id"]: r for r in answer["responses"]}
    assert [responses[i]["status"] for i in "abcd"] == [404, 424, 424, 201]
    assert responses["b"]["body"]["error"]["code"] == "FailedDependency"
    assert [r["from"] for r in state_of(legacy).store.records.values()] == ["d"]


async def test_json_continue_on_error_false_stops_what_has_not_started(
    gw: Client, legacy: TestServer
) -> None:
    status, answer, headers = await post_json(
        gw,
        {
            "requests": [
                {"id": "a", "method": "get", "url": "/orders/404"},
                {"id": "b", "dependsOn": ["a"], "method": "get", "url": "/orders"},
            ]
        },
        Prefer="odata.continue-on-error=false",
    )
    assert status == 200 and headers["Preference-Applied"] == "continue-on-error=false"
    statuses = {r["id"]: r["status"] for r in answer["responses"]}
    assert statuses["a"] == 404 and statuses.get("b", 424) == 424
    assert ("GET", "/orders") not in upstream_calls(legacy)


async def test_json_independent_requests_run_concurrently_and_a_chain_in_order(
    gw: Client, legacy: TestServer
) -> None:
    slow = {"method": "get", "url": "/echo/x?delay_ms=200"}
    status, _, _ = await post_json(gw, {"requests": [{"id": str(n), **slow} for n in range(4)]})
    assert status == 200 and state_of(legacy).max_in_flight == 4
    state_of(legacy).max_in_flight = 0
    chain = [{"id": "0", **slow}] + [{"id": str(n), "dependsOn": [str(n - 1)], **slow} for n in range(1, 4)]
    status, answer, _ = await post_json(gw, {"requests": chain})
    assert [r["status"] for r in answer["responses"]] == [200] * 4
    assert state_of(legacy).max_in_flight == 1


async def test_json_reference_without_a_location_answers_400(gw: Client, legacy: TestServer) -> None:
    status, answer, _ = await post_json(
        gw,
        {
            "requests": [
                {"id": "1", "method": "get", "url": "/echo/x"},
                {"id": "2", "dependsOn": ["1"], "method": "post", "url": "$1/lines", "body": {}},
            ]
        },
    )
    assert status == 200
    second = answer["responses"][1]
    assert second["status"] == 400 and second["body"]["error"]["code"] == "UnresolvedReference"
    assert upstream_calls(legacy) == [("GET", "/echo/x")]


@pytest.mark.parametrize(
    ("document", "where"),
    [
        (
            {
                "requests": [
                    {"id": "1", "dependsOn": ["2"], "method": "post", "url": "/orders", "body": {}},
                    {"id": "2", "method": "post", "url": "/orders", "body": {}},
                ]
            },
            "/requests/0/dependsOn/0",
        ),
        (
            {
                "requests": [
                    {"id": "1", "method": "post", "url": "/orders", "body": {}},
                    {"id": "1", "method": "post", "url": "/orders", "body": {}},
                ]
            },
            "/requests/1/id",
        ),
        (
            {
                "requests": [
                    {"id": "1", "method": "post", "url": "/orders", "body": {}},
                    {"id": "2", "method": "patch", "url": "$1", "body": {}},
                ]
            },
            "/requests/1",
        ),
        (
            {
                "requests": [
                    {"id": "1", "method": "post", "url": "/orders", "body": {}},
                    {"id": "2", "method": "get", "url": "/nowhere"},
                ]
            },
            "/requests/1",
        ),
    ],
)
async def test_json_bad_batches_answer_an_odata_error_and_send_nothing(
    gw: Client, legacy: TestServer, document: Any, where: str
) -> None:
    status, answer, headers = await post_json(gw, document)
    assert 400 <= status < 500
    assert headers["Content-Type"].startswith("application/json")
    assert set(answer) == {"error"} and answer["error"]["message"]
    assert answer["error"]["target"] == where
    assert upstream_calls(legacy) == []
    assert (await gw.get("/_gateway/healthz")).status == 200


# --- OData multipart ----------------------------------------------------------------------------


async def test_multipart_change_set_create_then_use(gw: Client, legacy: TestServer) -> None:
    body = multipart(
        changeset(
            "cs_1",
            part(post("/orders", {"item": "pen"}), "1"),
            part('PATCH $1 HTTP/1.1\nContent-Type: application/json\n\n{"lines": ["p-1"]}', "2"),
        ),
        part("GET /orders/1 HTTP/1.1\nAccept: application/json\n\n"),
    )
    status, message, headers = await post_multipart(gw, body, **V4)
    assert status == 200 and headers["OData-Version"] == "4.0"
    top = parts_of(message)
    assert len(top) == 2 and top[0].get_content_type() == "multipart/mixed"
    inner = parts_of(top[0])
    assert [p["Content-ID"] for p in inner] == ["1", "2"]
    assert [http_of(p)[0] for p in inner] == [201, 200]
    assert json.loads(http_of(top[1])[2]) == {"item": "pen", "lines": ["p-1"], "id": "1"}


async def test_multipart_failed_change_set_is_one_error_part_and_rolls_everything_back(
    gw: Client, legacy: TestServer, ledger: TestServer
) -> None:
    before_legacy, before_ledger = state_of(legacy).store.snapshot(), state_of(ledger).store.snapshot()
    body = multipart(
        changeset(
            "cs_1",
            part(post("/orders", {"item": "pen"}), "1"),
            part('PATCH $1 HTTP/1.1\nContent-Type: application/json\n\n{"lines": ["p-1"]}', "2"),
            part(post("/accounts", {"owner": "o"}), "3"),
            part(post("/orders", {"item": "boom"}, "X-Demo-Fail: 409"), "4"),
        ),
        part("GET /orders HTTP/1.1\n\n"),
    )
    status, message, headers = await post_multipart(gw, body, **V4)
    assert status == 200 and headers["X-Batch-Outcome"] == "rolled_back"
    top = parts_of(message)
    assert len(top) == 1  # processing stopped at the failed change set: the GET is not answered
    error_part = top[0]
    assert error_part.get_content_type() == "application/http"
    assert error_part["Content-ID"] == "4" and error_part["X-Batch-Outcome"] == "rolled_back"
    code, _, payload = http_of(error_part)
    assert code == 409 and "error" in json.loads(payload)
    assert state_of(legacy).store.snapshot() == before_legacy
    assert state_of(ledger).store.snapshot() == before_ledger
    assert ("GET", "/orders") not in upstream_calls(legacy)


async def test_multipart_stops_at_the_first_error_unless_continue_on_error(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    gw = await make_gateway(ODATA)
    body = multipart(part("GET /orders/404 HTTP/1.1\n\n"), part(post("/orders", {"n": 1})))
    _, message, _ = await post_multipart(gw, body, **V4)
    assert [http_of(p)[0] for p in parts_of(message)] == [404]
    assert ("POST", "/orders") not in upstream_calls(legacy)
    _, message, headers = await post_multipart(gw, body, Prefer="odata.continue-on-error", **V4)
    assert [http_of(p)[0] for p in parts_of(message)] == [404, 201]
    assert headers["Preference-Applied"] == "continue-on-error"


async def test_multipart_reference_to_a_failed_request_answers_424(gw: Client, legacy: TestServer) -> None:
    body = multipart(
        part("POST /orders HTTP/1.1\nX-Demo-Fail: 500\nContent-Type: application/json\n\n{}", "1"),
        part('PATCH $1 HTTP/1.1\nContent-Type: application/json\n\n{"a": 1}', "2"),
        part("GET /orders HTTP/1.1\n\n", "3"),
    )
    _, message, _ = await post_multipart(gw, body, Prefer="continue-on-error", **V4)
    answers = parts_of(message)
    assert [p["Content-ID"] for p in answers] == ["1", "2", "3"]
    assert [http_of(p)[0] for p in answers] == [500, 424, 200]
    assert not any(method == "PATCH" for method, _ in upstream_calls(legacy))


async def test_multipart_v2_answers_202_and_needs_no_content_id(gw: Client, legacy: TestServer) -> None:
    body = multipart(
        changeset("changeset_1", part(post("orders", {"item": "v2"}))),
        part("GET orders HTTP/1.1\nAccept: application/json\n\n"),
    )
    status, message, headers = await post_multipart(
        gw, body, DataServiceVersion="2.0", MaxDataServiceVersion="2.0"
    )
    assert status == 202 and headers["DataServiceVersion"] == "2.0"
    top = parts_of(message)
    assert http_of(parts_of(top[0])[0])[0] == 201
    assert json.loads(http_of(top[1])[2]) == [{"item": "v2", "id": "1"}]


async def test_multipart_absolute_urls_only_on_the_gateways_own_origin(
    gw: Client, legacy: TestServer
) -> None:
    own = str(gw.make_url("/orders"))
    status, message, _ = await post_multipart(gw, multipart(part(f"GET {own} HTTP/1.1\n\n")), **V4)
    assert status == 200 and http_of(parts_of(message)[0])[0] == 200
    response = await gw.post(
        PATH,
        data=multipart(part(f"GET {legacy.make_url('/orders')} HTTP/1.1\n\n")),
        headers={"Content-Type": "multipart/mixed; boundary=batch_x", **V4},
    )
    assert response.status == 400
    assert (await response.json())["error"]["target"] == "part 1"
    assert upstream_calls(legacy) == [("GET", "/orders")]


@pytest.mark.parametrize(
    "body",
    [
        multipart(changeset("cs", part(post("/orders", {"n": 1})))),  # V4 change set without Content-ID
        multipart(
            part(post("/orders", {"n": 1})),
            changeset("cs", changeset("in", part("GET /x HTTP/1.1\n\n", "1"))),
        ),
        multipart(part(post("/orders", {"n": 1})), "Content-Type: text/plain\n\nhello"),
        multipart(part(post("/orders", {"n": 1})), part("PATCH $9 HTTP/1.1\n\n{}", "2")),
        multipart(part(post("/orders", {"n": 1})), part("NOT A REQUEST\n\n")),
    ],
)
async def test_multipart_bad_batches_answer_an_odata_error_and_send_nothing(
    gw: Client, legacy: TestServer, body: bytes
) -> None:
    response = await gw.post(
        PATH, data=body, headers={"Content-Type": "multipart/mixed; boundary=batch_x", **V4}
    )
    assert 400 <= response.status < 500
    error = (await response.json())["error"]
    assert error["code"] and error["message"] and error["target"].startswith("part")
    assert upstream_calls(legacy) == []


# --- the endpoint itself ------------------------------------------------------------------------


async def test_absolute_urls_on_a_public_origin(make_gateway: MakeGateway, legacy: TestServer) -> None:
    gw = await make_gateway(
        {"batch": {"odata": {"path": PATH, "public_origins": ["https://api.example.com"]}}}
    )
    status, answer, _ = await post_json(
        gw, {"requests": [{"id": "1", "method": "get", "url": "https://api.example.com/orders?x=1"}]}
    )
    assert status == 200 and answer["responses"][0]["status"] == 200
    assert upstream_calls(legacy) == [("GET", "/orders?x=1")]


async def test_content_type_and_method_are_checked(gw: Client) -> None:
    response = await gw.post(PATH, data=b"x", headers={"Content-Type": "text/plain"})
    assert response.status == 415 and (await response.json())["error"]["target"] == "Content-Type"
    response = await gw.get(PATH)
    assert response.status == 405 and response.headers["Allow"] == "POST"
    assert "error" in await response.json()


async def test_batch_level_headers_are_not_inherited(gw: Client, legacy: TestServer) -> None:
    status, _, _ = await post_json(
        gw,
        {"requests": [{"id": "1", "method": "get", "url": "/echo/x"}]},
        Prefer="continue-on-error",
        Accept="application/json",
        **{"OData-MaxVersion": "4.01", "X-Tenant": "t1"},
    )
    assert status == 200
    sent = {name.lower() for name, _ in state_of(legacy).calls[0]["headers"]}
    assert "x-tenant" in sent
    assert not sent & {"prefer", "odata-maxversion"}


async def test_relative_urls_resolve_against_the_service_root(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    gw = await make_gateway({"batch": {"odata": {"path": "/legacy/$batch"}}})
    response = await gw.post(
        "/legacy/$batch",
        data=json.dumps({"requests": [{"id": "1", "method": "post", "url": "orders", "body": {"n": 1}}]}),
        headers={"Content-Type": "application/json"},
    )
    answer = await response.json()
    assert answer["responses"][0]["status"] == 201
    assert upstream_calls(legacy) == [("POST", "/orders")]


async def test_absent_config_means_no_endpoint(gateway: Client) -> None:
    response = await gateway.post(PATH, data=b"{}", headers={"Content-Type": "application/json"})
    assert response.status == 404
    assert response.headers["Content-Type"].startswith("application/problem+json")


async def test_atomic_false_refuses_change_sets(make_gateway: MakeGateway, legacy: TestServer) -> None:
    gw = await make_gateway({"batch": {"odata": {"path": PATH, "atomic": False}}})
    status, answer, _ = await post_json(
        gw,
        {
            "requests": [
                {"id": "1", "atomicityGroup": "g", "method": "post", "url": "/orders", "body": {}},
            ]
        },
    )
    assert status == 400 and "batch.odata.atomic" in answer["error"]["message"]
    assert upstream_calls(legacy) == []


async def test_max_items(make_gateway: MakeGateway, legacy: TestServer) -> None:
    gw = await make_gateway({"batch": {"odata": {"path": PATH, "max_items": 2}}})
    status, answer, _ = await post_json(
        gw, {"requests": [{"id": str(n), "method": "get", "url": "/orders"} for n in range(3)]}
    )
    assert status == 413 and answer["error"]["target"] == "/requests/2"
    assert upstream_calls(legacy) == []


def test_openapi_documents_the_endpoint(make_config: MakeConfig) -> None:
    from openapi_spec_validator import validate as validate_spec

    from gateway.openapi import build_document

    document = build_document(make_config(ODATA))
    validate_spec(document)
    operation = document["paths"][PATH]["post"]
    assert operation["operationId"] == "ODataBatch"
    assert set(operation["requestBody"]["content"]) == {"application/json", "multipart/mixed"}
    assert PATH not in build_document(make_config())["paths"]


async def test_openapi_lists_exactly_the_routes(gw: Client) -> None:
    async with gw.get("/_gateway/openapi.json") as response:
        documented = {
            (path, method) for path, item in (await response.json())["paths"].items() for method in item
        }
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in gw.app.router.routes()
        if route.method in ("GET", "POST")
        and route.resource is not None
        and not route.resource.canonical.startswith("/{tail")
    }
    assert documented == routed


async def test_several_atomic_groups_each_name_the_batch_id_a_lookup_takes(gw: Client) -> None:
    """Two atomicity groups are journaled as `<batch id>.1` and `.2`; the answer's X-Batch-Groups
    says which is which, and each looks up with the sender's credentials (the batch id itself does
    not: no one journal record holds the whole batch)."""
    auth = {"Authorization": "Bearer owner"}
    status, answer, headers = await post_json(gw, {"requests": [
        {"id": "1", "method": "post", "url": "/orders", "body": {"item": "a"}, "atomicityGroup": "orders"},
        {"id": "2", "method": "post", "url": "/accounts", "body": {"owner": "b"}, "atomicityGroup": "money"},
    ]}, **auth)
    assert status == 200 and [r["status"] for r in answer["responses"]] == [201, 201], answer
    batch_id = headers["X-Batch-Id"]
    assert headers["X-Batch-Groups"] == f"orders={batch_id}.1, money={batch_id}.2"
    for group_id in (f"{batch_id}.1", f"{batch_id}.2"):
        async with gw.get(f"/_gateway/batches/{group_id}", headers=auth) as response:
            assert response.status == 200
            assert (await response.json())["state"] == "committed"
    async with gw.get(f"/_gateway/batches/{batch_id}", headers=auth) as response:
        assert response.status == 404
    status, _, headers = await post_json(gw, {"requests": [
        {"id": "1", "method": "post", "url": "/orders", "body": {"item": "c"}, "atomicityGroup": "one"},
    ]}, **auth)
    assert status == 200 and "X-Batch-Groups" not in headers  # one group: journaled under the batch id
