"""The JSON batch endpoint (`POST /batch/v1`, seed 000) end to end, against real loopback upstreams.

SPEC sections 3, 4 (JSON) and 7: answers validate against the seed's BatchResponse schema; headers
and query are inherited as the echo upstream actually received them; Serial stops and skips, and
Unordered really overlaps calls within the per-upstream bound; every rejection is problem+json with
a pointer and costs zero upstream calls; an unreachable or slow upstream fails only its own items.
"""

from __future__ import annotations

import base64
import json
import socket
from importlib import resources
from typing import Any

import aiohttp
import jsonschema  # type: ignore[import-untyped]  # no types-jsonschema in the test deps
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from tests.conftest import MakeGateway, state_of

Client = TestClient[web.Request, web.Application]
PROBLEM_JSON = "application/problem+json"
ENDPOINT = "/batch/v1"


# --- helpers -----------------------------------------------------------------------------------


def _seed_schema() -> dict[str, Any]:
    text = resources.files("gateway.schemas").joinpath("seed_batch_openapi.json").read_text()
    document: dict[str, Any] = json.loads(text)
    return {"$ref": "#/components/schemas/BatchResponse", "components": document["components"]}


RESPONSE_SCHEMA = _seed_schema()


def single(method: str, operation: str, body: Any = None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"method": method, "operation": operation, **extra}
    if body is not None:
        item["body"] = body
    return {"SingleItem": item}


def batch(mode: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"Batch": {"batch_execution_type": mode, "items": list(items)}}


async def post_batch(
    client: Client, document: Any, *, headers: Any = None, query: str = ""
) -> dict[str, Any]:
    """POST a batch that must be processed (200, application/json, valid against the seed)."""
    async with client.post(f"{ENDPOINT}{query}", json=document, headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        answer: dict[str, Any] = await response.json()
    jsonschema.validate(answer, RESPONSE_SCHEMA)
    return answer


async def problem_of(response: ClientResponse, statuses: tuple[int, ...]) -> dict[str, Any]:
    """An RFC 9457 rejection: one of `statuses`, problem+json, carrying the request id."""
    assert response.status in statuses, await response.text()
    assert response.content_type == PROBLEM_JSON
    doc: dict[str, Any] = await response.json(content_type=PROBLEM_JSON)
    assert doc["status"] == response.status
    assert doc["title"] and doc["detail"] and doc["type"].startswith("https://")
    assert doc["request_id"] == response.headers["X-Request-ID"]
    return doc


def items_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = answer["Batch"]["items"]
    return items


def result(node: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = node["SingleItem"]["Result"]
    return found


def echo_headers(node: dict[str, Any]) -> CIMultiDict[str]:
    """The headers the echo upstream received for one item, order and repeats kept."""
    echo = result(node)["body"]
    return CIMultiDict((name, value) for name, value in echo["headers"])


def closed_port() -> int:
    """A loopback port that was just bound and closed, so nothing listens on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def call_paths(server: TestServer) -> list[str]:
    return [call["path"] for call in state_of(server).calls]


# --- the answer's shape: the seed's BatchResponse ---------------------------------------------


async def test_single_item_answers_a_single_result(gateway: Client) -> None:
    answer = await post_batch(gateway, single("GET", "/echo/one"))
    assert set(answer) == {"SingleItem", "batch_id"}
    found = result(answer)
    assert found["status"] == 200
    assert found["body_encoding"] == "json"
    assert found["body"]["path"] == "/echo/one"


async def test_flat_batch_mirrors_the_request_position_for_position(
    gateway: Client, legacy: TestServer
) -> None:
    document = batch(
        "Serial",
        single("POST", "/orders", {"item": "book"}),
        single("GET", "/echo/two"),
        single("GET", "/orders"),
    )
    items = items_of(await post_batch(gateway, document))
    assert [result(node)["status"] for node in items] == [201, 200, 200]
    created = result(items[0])["body"]
    assert created["item"] == "book"
    assert result(items[0])["headers"]["location"] == f"/orders/{created['id']}"
    assert result(items[1])["body"]["path"] == "/echo/two"
    assert result(items[2])["body"] == [created]
    assert state_of(legacy).store.records == {created["id"]: created}


async def test_nested_and_mixed_mode_batches_keep_their_shape(gateway: Client) -> None:
    document = batch(
        "Serial",
        single("GET", "/echo/a"),
        batch(
            "Unordered",
            single("GET", "/echo/b1"),
            batch("Serial", single("GET", "/echo/c1"), single("GET", "/echo/c2")),
            single("GET", "/accounts"),
        ),
        batch("Serial"),
        single("GET", "/echo/d"),
    )
    items = items_of(await post_batch(gateway, document))
    assert len(items) == 4
    inner = items_of(items[1])
    assert [result(node)["body"]["path"] for node in (items[0], inner[0], items[3])] == [
        "/echo/a",
        "/echo/b1",
        "/echo/d",
    ]
    assert [result(node)["body"]["path"] for node in items_of(inner[1])] == ["/echo/c1", "/echo/c2"]
    accounts = result(inner[2])
    assert (accounts["status"], accounts["body"], accounts["body_encoding"]) == (200, [], "json")
    assert items[2] == {"Batch": {"items": []}}


async def test_binary_and_empty_bodies_say_their_encoding(gateway: Client) -> None:
    document = batch(
        "Unordered",
        single("GET", "/echo/x?status=204"),
        single("GET", "/legacy/bytes/300"),
        single("DELETE", "/orders/404"),
    )
    items = items_of(await post_batch(gateway, document))
    no_content, binary, missing = (result(node) for node in items)
    assert (no_content["status"], no_content["body"], no_content["body_encoding"]) == (
        204,
        None,
        "empty",
    )
    assert binary["body_encoding"] == "base64"
    assert base64.b64decode(binary["body"]) == bytes(range(256)) + bytes(range(44))
    assert (missing["status"], missing["body"]) == (404, {"error": "not found"})


# --- header inheritance, as the upstream received it -------------------------------------------


OUTER_HEADERS = [
    ("Authorization", "Bearer outer"),
    ("X-Multi", "outer-1"),
    ("X-Multi", "outer-2"),
    ("X-Replaced", "outer-a"),
    ("X-Replaced", "outer-b"),
    ("Content-Language", "fr"),
    ("Connection", "keep-alive, X-Secret"),
    ("X-Secret", "connection-listed"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Proxy-Authorization", "Basic c2VjcmV0"),
    ("X-Batch-Atomic", "false"),
    ("X-Batch-Execution", "Serial"),
    ("X-Request-ID", "req-json-headers-1"),
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]


async def test_outer_headers_reach_every_item_and_an_item_header_replaces_all_outer_values(
    gateway: Client,
) -> None:
    document = batch(
        "Serial",
        single("GET", "/echo/inherits"),
        single(
            "POST",
            "/echo/overrides",
            {"k": "v"},
            headers={"x-replaced": "item", "Authorization": "Bearer item", "X-Own": ["1", "2"]},
        ),
        single("GET", "/echo/inherits-again"),
    )
    items = items_of(await post_batch(gateway, document, headers=OUTER_HEADERS))
    first, second, third = (echo_headers(node) for node in items)
    for seen in (first, third):
        assert seen.getall("Authorization") == ["Bearer outer"]
        assert seen.getall("X-Multi") == ["outer-1", "outer-2"]
        assert seen.getall("X-Replaced") == ["outer-a", "outer-b"]
        assert "X-Own" not in seen
    assert second.getall("Authorization") == ["Bearer item"]
    assert second.getall("X-Replaced") == ["item"]
    assert second.getall("X-Own") == ["1", "2"]
    assert second.getall("X-Multi") == ["outer-1", "outer-2"]
    parent_ids = set()
    for position, seen in enumerate((first, second, third)):
        assert seen["X-Request-ID"] == f"req-json-headers-1.{position}"  # joins upstream logs to the batch
        assert seen["X-Forwarded-For"] == "127.0.0.1"
        assert seen["X-Forwarded-Proto"] == "http"
        version, trace_id, parent_id, flags = seen["traceparent"].split("-")
        _, outer_trace, outer_parent, outer_flags = OUTER_HEADERS[-1][1].split("-")
        assert (version, trace_id, flags) == ("00", outer_trace, outer_flags)  # the client's trace
        assert parent_id != outer_parent
        parent_ids.add(parent_id)
    assert len(parent_ids) == 3  # each call its own span id


HIDDEN = (
    "X-Secret", "Keep-Alive", "TE", "Trailer", "Proxy-Authorization", "X-Batch-Atomic",
    "X-Batch-Execution", "Content-Language",
)


async def test_the_hidden_headers_do_go_over_the_wire(legacy: TestServer) -> None:
    """Control: the client really sends what the gateway must not forward (see the next test)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(legacy.make_url("/echo/control"), headers=OUTER_HEADERS) as response,
    ):
        echo = await response.json()
    seen = CIMultiDict((name, value) for name, value in echo["headers"])
    for name in HIDDEN:
        assert name in seen, name
    assert "X-Secret" in seen["Connection"]


async def test_hop_by_hop_control_and_content_headers_never_reach_an_item(gateway: Client) -> None:
    document = batch(
        "Serial", single("GET", "/echo/no-body"), single("PUT", "/echo/body", {"n": 1})
    )
    items = items_of(await post_batch(gateway, document, headers=OUTER_HEADERS))
    outer_length = len(json.dumps(document).encode())
    no_body, with_body = (echo_headers(node) for node in items)
    for seen in (no_body, with_body):
        for name in (*HIDDEN, "Transfer-Encoding"):
            assert name not in seen, name
        assert "x-secret" not in seen.get("Connection", "").lower()
    assert "Content-Type" not in no_body
    assert no_body.get("Content-Length", "0") == "0"
    assert with_body.getall("Content-Type") == ["application/json"]
    assert with_body.getall("Content-Length") == [str(len(b'{"n":1}'))]
    assert str(outer_length) != with_body["Content-Length"]
    assert base64.b64decode(result(items[1])["body"]["body_b64"]) == b'{"n":1}'


async def test_an_outer_content_type_is_not_inherited_even_by_a_bodyless_item(
    gateway: Client,
) -> None:
    body = json.dumps(single("DELETE", "/echo/x")).encode()
    headers = {"Content-Type": "application/vnd.batch+json; charset=utf-8"}
    async with gateway.post(ENDPOINT, data=body, headers=headers) as response:
        assert response.status == 200
        answer = await response.json()
    seen = CIMultiDict((name, value) for name, value in result(answer)["body"]["headers"])
    assert "Content-Type" not in seen


async def test_outer_query_applies_to_every_item_and_an_items_own_parameter_wins(
    gateway: Client, legacy: TestServer
) -> None:
    document = batch(
        "Unordered",
        single("GET", "/echo/plain"),
        single("GET", "/echo/own?shared=item&extra=1"),
        single("GET", "/legacy/echo/stripped?tenant=mine"),
    )
    items = items_of(
        await post_batch(gateway, document, query="?tenant=t1&shared=outer&shared=outer2")
    )
    queries = [result(node)["body"]["raw_query"] for node in items]
    assert queries[0] == "tenant=t1&shared=outer&shared=outer2"
    assert queries[1] == "tenant=t1&shared=item&extra=1"
    assert queries[2] == "shared=outer&shared=outer2&tenant=mine"
    assert sorted(call_paths(legacy)) == sorted(
        [
            "/echo/plain?tenant=t1&shared=outer&shared=outer2",
            "/echo/own?tenant=t1&shared=item&extra=1",
            "/echo/stripped?shared=outer&shared=outer2&tenant=mine",
        ]
    )


async def test_a_generated_request_id_is_derived_per_item(gateway: Client) -> None:
    document = batch("Unordered", single("GET", "/accounts"), single("GET", "/echo/1"))
    async with gateway.post(ENDPOINT, json=document) as response:
        request_id = response.headers["X-Request-ID"]
        answer = await response.json()
    assert echo_headers(items_of(answer)[1])["X-Request-ID"] == f"{request_id}.1"
    assert len(request_id) == 32


# --- Serial and Unordered ----------------------------------------------------------------------


async def test_serial_stops_at_the_first_failure_and_never_calls_the_rest(
    gateway: Client, legacy: TestServer, ledger: TestServer
) -> None:
    document = batch(
        "Serial",
        single("GET", "/echo/a"),
        single("GET", "/echo/b?status=500"),
        single("GET", "/echo/c"),
        batch("Unordered", single("POST", "/orders", {"x": 1}), single("GET", "/accounts")),
        single("POST", "/orders", {"x": 2}),
    )
    items = items_of(await post_batch(gateway, document))
    assert result(items[0])["status"] == 200
    assert result(items[1])["status"] == 500
    reasons = [items[2]["SingleItem"]["Skipped"]["reason"], items[4]["SingleItem"]["Skipped"]["reason"]]
    reasons += [node["SingleItem"]["Skipped"]["reason"] for node in items_of(items[3])]
    for reason in reasons:
        assert "/Batch/items/1/SingleItem" in reason
        assert "500" in reason
    assert call_paths(legacy) == ["/echo/a", "/echo/b?status=500"]
    assert state_of(ledger).calls == []
    assert state_of(legacy).store.records == {}


async def test_a_failed_nested_batch_stops_its_serial_parent(
    gateway: Client, legacy: TestServer
) -> None:
    document = batch(
        "Serial",
        batch("Unordered", single("GET", "/echo/n1"), single("GET", "/echo/n2?status=404")),
        single("GET", "/echo/after"),
    )
    items = items_of(await post_batch(gateway, document))
    nested = items_of(items[0])
    assert [result(node)["status"] for node in nested] == [200, 404]
    assert "/Batch/items/0/Batch" in items[1]["SingleItem"]["Skipped"]["reason"]
    assert sorted(call_paths(legacy)) == ["/echo/n1", "/echo/n2?status=404"]


async def test_unordered_gives_every_item_a_result_even_after_failures(
    gateway: Client, legacy: TestServer
) -> None:
    document = batch(
        "Unordered",
        single("GET", "/echo/1?status=500"),
        single("GET", "/echo/2"),
        single("GET", "/orders/nope"),
        single("GET", "/echo/4"),
    )
    items = items_of(await post_batch(gateway, document))
    assert [result(node)["status"] for node in items] == [500, 200, 404, 200]
    assert len(state_of(legacy).calls) == 4


async def test_unordered_runs_concurrently_within_the_upstream_bound(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    gateway = await make_gateway({"upstreams": {"legacy": {"concurrency": 3}}})
    document = batch("Unordered", *(single("GET", f"/echo/{i}?delay_ms=200") for i in range(10)))
    items = items_of(await post_batch(gateway, document))
    assert [result(node)["body"]["path"] for node in items] == [f"/echo/{i}" for i in range(10)]
    assert 1 < state_of(legacy).max_in_flight <= 3
    assert len(state_of(legacy).calls) == 10


async def test_serial_never_has_two_calls_in_flight(gateway: Client, legacy: TestServer) -> None:
    document = batch("Serial", *(single("GET", f"/echo/{i}?delay_ms=50") for i in range(5)))
    await post_batch(gateway, document)
    assert state_of(legacy).max_in_flight == 1
    assert call_paths(legacy) == [f"/echo/{i}?delay_ms=50" for i in range(5)]


async def test_a_nested_batch_runs_as_one_unit_in_its_parents_order(
    gateway: Client, legacy: TestServer
) -> None:
    nested = batch("Unordered", *(single("GET", f"/echo/n{i}?delay_ms=150") for i in range(3)))
    document = batch(
        "Serial", single("GET", "/echo/before"), nested, single("GET", "/echo/after")
    )
    await post_batch(gateway, document)
    paths = call_paths(legacy)
    assert paths[0] == "/echo/before"
    assert sorted(paths[1:4]) == [f"/echo/n{i}?delay_ms=150" for i in range(3)]
    assert paths[4] == "/echo/after"
    # the nested calls overlapped each other, and `after` waited for all three to finish
    assert state_of(legacy).max_in_flight == 3


# --- rejections: 4xx problem+json with a pointer, and zero upstream calls ----------------------


OK_ITEM = single("GET", "/echo/fine")


def second_item(item: dict[str, Any]) -> dict[str, Any]:
    """A batch whose first item is fine, so an executed-anyway call would show in the log."""
    return batch("Serial", OK_ITEM, item)


BAD_TARGETS = [
    pytest.param("http://evil/x", id="absolute-url"),
    pytest.param("https://127.0.0.1:1/orders", id="absolute-https"),
    pytest.param("//host/x", id="scheme-relative"),
    pytest.param("/orders/../x", id="dot-dot"),
    pytest.param("/orders/./x", id="dot"),
    pytest.param("/orders/%2e%2e/x", id="encoded-dot-dot"),
    pytest.param("/orders/%2E%2E/%2e%2E/admin", id="encoded-dot-dot-upper"),
    pytest.param("/orders\\..\\x", id="backslash"),
    pytest.param("/orders/%5c..%5cx", id="encoded-backslash"),
    pytest.param("/nowhere/x", id="no-route"),
    pytest.param("orders/1", id="relative"),
    pytest.param("/echo/a b", id="space"),
]


@pytest.mark.parametrize("operation", BAD_TARGETS)
async def test_a_bad_target_rejects_the_whole_batch_before_any_call(
    gateway: Client, legacy: TestServer, ledger: TestServer, operation: str
) -> None:
    async with gateway.post(ENDPOINT, json=second_item(single("GET", operation))) as response:
        doc = await problem_of(response, (400,))
    assert doc["pointer"] == "/Batch/items/1/SingleItem"
    assert state_of(legacy).calls == [] and state_of(ledger).calls == []


MALFORMED = [
    pytest.param(b'{"Batch": {"batch_execution_type": "Serial", "items": [', 400, "/", id="bad-json"),
    pytest.param(b"", 400, "/", id="empty"),
    pytest.param(b"[]", 400, "/", id="array"),
    pytest.param(
        json.dumps(second_item(single("GET", "/echo/x", bogus=1))).encode(),
        400,
        "/Batch/items/1/SingleItem/bogus",
        id="unknown-key",
    ),
    pytest.param(
        json.dumps(second_item({"SingleItem": {"operation": "/echo/x"}})).encode(),
        400,
        "/Batch/items/1/SingleItem/method",
        id="missing-method",
    ),
    pytest.param(
        json.dumps(second_item(batch("Sometimes", OK_ITEM))).encode(),
        400,
        "/Batch/items/1/Batch/batch_execution_type",
        id="unknown-mode",
    ),
    pytest.param(
        json.dumps(second_item(single("GET", "/echo/x", headers={"Content-Length": "5"}))).encode(),
        400,
        "/Batch/items/1/SingleItem/headers/Content-Length",
        id="framing-header",
    ),
    pytest.param(
        json.dumps(second_item(single("GET", "/echo/x", headers={"X-A": "a\u0001b"}))).encode(),
        400,
        "/Batch/items/1/SingleItem",
        id="control-char-in-header",
    ),
    pytest.param(
        json.dumps(second_item(single("GET", "/echo/x", headers={"X-A": ["ok", "del\u007f"]}))).encode(),
        400,
        "/Batch/items/1/SingleItem",
        id="del-in-header",
    ),
    pytest.param(
        b'{"Batch": {"batch_execution_type": "Serial", "items": [], "items": []}}',
        400,
        "/Batch",
        id="duplicate-key",
    ),
]


@pytest.mark.parametrize(("body", "status", "pointer"), MALFORMED)
async def test_a_malformed_batch_is_rejected_with_a_pointer_before_any_call(
    gateway: Client, legacy: TestServer, body: bytes, status: int, pointer: str
) -> None:
    headers = {"Content-Type": "application/json"}
    async with gateway.post(ENDPOINT, data=body, headers=headers) as response:
        doc = await problem_of(response, (status,))
    assert doc["pointer"] == pointer
    assert state_of(legacy).calls == []


def nested(depth: int) -> dict[str, Any]:
    node = single("GET", "/echo/deep")
    for _ in range(depth):
        node = batch("Serial", OK_ITEM, node)
    return node


async def test_nesting_deeper_than_max_depth_is_rejected(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    gateway = await make_gateway({"batch": {"limits": {"max_depth": 3}}})
    await post_batch(gateway, nested(3))
    state_of(legacy).calls.clear()
    async with gateway.post(ENDPOINT, json=nested(4)) as response:
        doc = await problem_of(response, (400,))
    assert doc["pointer"] == "/Batch/items/1/Batch/items/1/Batch/items/1/Batch"
    assert "3" in doc["detail"]
    assert state_of(legacy).calls == []


async def test_more_items_than_max_items_is_rejected(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    gateway = await make_gateway({"batch": {"limits": {"max_items": 3}}})
    three = batch("Serial", OK_ITEM, batch("Unordered", OK_ITEM, OK_ITEM))
    await post_batch(gateway, three)
    state_of(legacy).calls.clear()
    four = batch("Serial", OK_ITEM, batch("Unordered", OK_ITEM, OK_ITEM, OK_ITEM))
    async with gateway.post(ENDPOINT, json=four) as response:
        doc = await problem_of(response, (413,))
    assert doc["pointer"] == "/Batch/items/1/Batch/items/2/SingleItem"
    assert "Maximum number of items is 3" in doc["detail"]
    assert state_of(legacy).calls == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_max_body_bytes_is_rejected(
    make_gateway: MakeGateway, legacy: TestServer, chunked: bool
) -> None:
    gateway = await make_gateway({"batch": {"limits": {"max_body_bytes": 2048}}})
    document = second_item(single("POST", "/echo/big", {"pad": "x" * 3000}))
    body = json.dumps(document).encode()

    async def chunks() -> Any:
        yield body

    data: Any = chunks() if chunked else body
    headers = {"Content-Type": "application/json"}
    async with gateway.post(ENDPOINT, data=data, headers=headers) as response:
        doc = await problem_of(response, (413,))
    assert doc["pointer"] == "/"
    assert "2048" in doc["detail"]
    assert state_of(legacy).calls == []


async def test_a_non_json_content_type_is_rejected(gateway: Client, legacy: TestServer) -> None:
    body = json.dumps(OK_ITEM).encode()
    async with gateway.post(ENDPOINT, data=body, headers={"Content-Type": "text/plain"}) as response:
        await problem_of(response, (415,))
    assert state_of(legacy).calls == []


# --- upstream down or slow: per-item 502/504, the others still answer --------------------------


async def test_an_unreachable_upstream_fails_only_its_own_items_with_502(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    gateway = await make_gateway(
        {
            "upstreams": {"dead": {"url": f"http://127.0.0.1:{closed_port()}"}},
            "routes": [
                {"prefix": "/orders", "upstream": "legacy"},
                {"prefix": "/echo", "upstream": "legacy"},
                {"prefix": "/accounts", "upstream": "ledger"},
                {"prefix": "/dead", "upstream": "dead"},
            ],
        }
    )
    document = batch(
        "Unordered",
        single("GET", "/echo/ok"),
        single("POST", "/dead/x", {"a": 1}),
        single("GET", "/accounts"),
    )
    items = items_of(await post_batch(gateway, document))
    ok, dead, accounts = (result(node) for node in items)
    assert ok["status"] == 200 and accounts["status"] == 200
    assert dead["status"] == 502
    assert dead["gateway_error"] is True
    assert "dead" in dead["body"]["error"]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"upstreams": {"legacy": {"timeouts": {"total": 0.3}}}}, id="upstream-total"),
        pytest.param({"batch": {"limits": {"call_timeout": 0.3}}}, id="call-timeout"),
    ],
)
async def test_a_slow_upstream_fails_only_its_own_items_with_504(
    make_gateway: MakeGateway, overrides: dict[str, Any]
) -> None:
    gateway = await make_gateway(overrides)
    document = batch(
        "Unordered",
        single("GET", "/echo/slow?delay_ms=1000"),
        single("GET", "/echo/fast"),
        single("GET", "/accounts"),
    )
    items = items_of(await post_batch(gateway, document))
    slow, fast, accounts = (result(node) for node in items)
    assert slow["status"] == 504
    assert slow["gateway_error"] is True
    assert fast["status"] == 200 and accounts["status"] == 200


async def test_a_slow_item_stops_a_serial_batch_like_any_failure(
    make_gateway: MakeGateway, legacy: TestServer
) -> None:
    gateway = await make_gateway({"batch": {"limits": {"call_timeout": 0.3}}})
    document = batch(
        "Serial", single("GET", "/echo/slow?delay_ms=1000"), single("GET", "/echo/never")
    )
    items = items_of(await post_batch(gateway, document))
    assert result(items[0])["status"] == 504
    assert "/Batch/items/0/SingleItem" in items[1]["SingleItem"]["Skipped"]["reason"]
    assert call_paths(legacy) == ["/echo/slow?delay_ms=1000"]

