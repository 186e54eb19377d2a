"""The plain reverse proxy (SPEC sections 3 and 6) against real loopback upstreams.

Methods, bodies, query strings, repeated headers and statuses arrive intact; hop-by-hop headers are
dropped both ways; forwarding headers and the request id are added; redirects are not followed; an
unreachable, slow or missing upstream and a target that escapes its route each answer problem+json.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from gateway.app import create_app
from gateway.config import parse_config
from tests.conftest import MakeGateway, state_of

Client = TestClient[web.Request, web.Application]
PROBLEM_JSON = "application/problem+json"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
BODY = b"\x00\x01 binary \xff\xfe body\r\n" * 500


# --- helpers -----------------------------------------------------------------------------------


def received_headers(echo: dict[str, Any]) -> CIMultiDict[str]:
    """The headers the echo upstream saw, as a multidict (order and repeats kept)."""
    return CIMultiDict((name, value) for name, value in echo["headers"])


async def raw_exchange(client: Client, request: bytes) -> tuple[int, CIMultiDict[str], bytes]:
    """Send exact bytes to the gateway (no client-side URL normalisation) and read the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(": ")
        headers.add(name, value)
    return int(status_line.split(" ")[1]), headers, body


def raw_get(target: bytes, *headers: bytes) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: gateway.test", b"Connection: close"]
    return b"\r\n".join([*lines, *headers, b"", b""])


async def problem_of(response: ClientResponse, status: int) -> dict[str, Any]:
    """Check an error answer is RFC 9457 problem+json carrying the request id; return it."""
    assert response.status == status
    assert response.content_type == PROBLEM_JSON
    doc: dict[str, Any] = await response.json(content_type=PROBLEM_JSON)
    assert doc["status"] == status
    assert doc["title"] and doc["detail"] and doc["type"].startswith("https://")
    assert doc["request_id"] == response.headers["X-Request-ID"]
    return doc


async def assert_still_serving(gateway: Client) -> None:
    async with gateway.get("/echo/after") as response:
        assert response.status == 200
        assert (await response.json())["path"] == "/echo/after"


def closed_port() -> int:
    """A loopback port that was just bound and closed, so nothing listens on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- methods, bodies, queries, statuses --------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
async def test_method_path_and_binary_body_arrive_intact(gateway: Client, method: str) -> None:
    async with gateway.request(method, "/echo/some/path", data=BODY) as response:
        assert response.status == 200
        echo = await response.json()
    assert echo["method"] == method
    assert echo["path"] == "/echo/some/path"
    assert base64.b64decode(echo["body_b64"]) == BODY


async def test_crud_statuses_bodies_and_location_pass_through(gateway: Client) -> None:
    async with gateway.post("/orders", json={"item": "book", "qty": 1}) as response:
        assert response.status == 201
        location = response.headers["Location"]
        created = await response.json()
    assert location == f"/orders/{created['id']}"
    async with gateway.get(location) as response:
        assert response.status == 200
        assert (await response.json())["item"] == "book"
    async with gateway.put(location, json={"item": "pen", "qty": 2}) as response:
        assert response.status == 200
        assert (await response.json())["qty"] == 2
    async with gateway.delete(location) as response:
        assert response.status == 204
        assert await response.read() == b""
    async with gateway.get(location) as response:
        assert response.status == 404
        assert response.content_type == "application/json"


async def test_head_answers_headers_without_a_body(gateway: Client) -> None:
    async with gateway.head("/orders") as response:
        assert response.status == 200
        assert await response.read() == b""
    await assert_still_serving(gateway)


@pytest.mark.parametrize("status", [200, 201, 202, 299, 400, 404, 409, 418, 422, 500, 503])
async def test_upstream_status_is_returned_unchanged(gateway: Client, status: int) -> None:
    async with gateway.get(f"/echo?status={status}") as response:
        assert response.status == status
        assert response.content_type == "application/json"
        assert (await response.json())["path"] == "/echo"


async def test_query_string_bytes_reach_the_upstream_unchanged(gateway: Client) -> None:
    query = b"a=1&a=2&b=%20x+y&c=%2f&C=%2F&e=&flag&u=%C3%A9&semi=1;2"
    status, _, body = await raw_exchange(gateway, raw_get(b"/echo/q?" + query))
    assert status == 200
    echo = json.loads(body)
    assert echo["raw_query"] == query.decode()
    assert echo["path"] == "/echo/q"


async def test_strip_prefix_route_keeps_the_query(gateway: Client, legacy: TestServer) -> None:
    async with gateway.get("/legacy/echo/x?k=v&k=w") as response:
        echo = await response.json()
    assert (echo["path"], echo["raw_query"]) == ("/echo/x", "k=v&k=w")
    assert state_of(legacy).calls[-1]["path"] == "/echo/x?k=v&k=w"


# --- headers -----------------------------------------------------------------------------------


async def test_repeated_request_headers_arrive_in_order(gateway: Client) -> None:
    headers = [("X-Multi", "one"), ("X-Other", "o"), ("X-Multi", "two"), ("Accept", "a/b")]
    async with gateway.get("/echo", headers=headers) as response:
        seen = received_headers(await response.json())
    assert seen.getall("X-Multi") == ["one", "two"]
    assert seen["X-Other"] == "o"
    assert seen["Accept"] == "a/b"


async def _quirky_upstream(request: web.Request) -> web.Response:
    """Answers repeated end-to-end headers and every kind of hop-by-hop header."""
    response = web.Response(text="quirky body")
    for name, value in [
        ("X-Multi", "one"),
        ("X-Multi", "two"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Connection", "X-Secret-Resp"),
        ("X-Secret-Resp", "hidden"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic realm=x"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),
    ]:
        response.headers.add(name, value)
    return response


@pytest.fixture
async def quirky_gateway(
    aiohttp_server: Any, aiohttp_client: Any, tmp_path: Path
) -> tuple[Client, TestServer]:
    upstream_app = web.Application()
    upstream_app.router.add_get("/headers", _quirky_upstream)
    upstream: TestServer = await aiohttp_server(upstream_app)
    config = parse_config(
        {
            "upstreams": {"quirky": {"url": str(upstream.make_url("")).rstrip("/")}},
            "routes": [{"prefix": "/quirky", "upstream": "quirky", "strip_prefix": True}],
            "journal": {"path": str(tmp_path / "journal.sqlite3")},
        }
    )
    client: Client = await aiohttp_client(create_app(config))
    return client, upstream


RESPONSE_HOP_BY_HOP = ("X-Secret-Resp", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade")


async def test_repeated_response_headers_returned_and_hop_by_hop_dropped(
    quirky_gateway: tuple[Client, TestServer], aiohttp_client: Any
) -> None:
    gateway, upstream = quirky_gateway
    direct: Client = await aiohttp_client(upstream)
    async with direct.get("/headers") as response:
        # Control: the upstream really does send them.
        assert all(name in response.headers for name in RESPONSE_HOP_BY_HOP)
    async with gateway.get("/quirky/headers") as response:
        assert response.status == 200
        assert await response.text() == "quirky body"
        assert response.headers.getall("X-Multi") == ["one", "two"]
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        for name in RESPONSE_HOP_BY_HOP:
            assert name not in response.headers, name
        assert "X-Secret-Resp" not in response.headers.get("Connection", "")


async def test_hop_by_hop_and_connection_listed_headers_are_not_forwarded(
    gateway: Client, legacy: TestServer
) -> None:
    status, _, body = await raw_exchange(
        gateway,
        raw_get(
            b"/echo/hop",
            b"Connection: close, X-Secret",
            b"X-Secret: do-not-forward",
            b"Keep-Alive: timeout=5",
            b"TE: trailers",
            b"Trailer: X-Checksum",
            b"Upgrade: h2c",
            b"Proxy-Authorization: Basic dXNlcjpwYXNz",
            b"Proxy-Connection: keep-alive",
            b"X-End-To-End: kept",
        ),
    )
    assert status == 200
    seen = received_headers(json.loads(body))
    for name in (
        "X-Secret",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Connection",
    ):
        assert name not in seen, name
    assert "X-Secret" not in seen.get("Connection", "")
    assert seen["X-End-To-End"] == "kept"
    logged = CIMultiDict(state_of(legacy).calls[-1]["headers"])
    assert "X-Secret" not in logged and "Proxy-Authorization" not in logged


async def test_forwarding_headers_are_added(gateway: Client, legacy: TestServer) -> None:
    async with gateway.get("/echo") as response:
        seen = received_headers(await response.json())
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == f"{gateway.host}:{gateway.port}"
    assert seen["Host"] == f"{legacy.host}:{legacy.port}", "Host names the upstream, not the gateway"


async def test_x_forwarded_for_from_a_trusted_proxy_gets_the_client_appended(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway({"trusted_proxies": ["127.0.0.0/8"]})
    headers = [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.2, 10.0.0.1"),
               ("X-Forwarded-Proto", "https"), ("Forwarded", 'for=203.0.113.7;proto=https')]
    async with gateway.get("/echo", headers=headers) as response:
        seen = received_headers(await response.json())
    assert seen.getall("X-Forwarded-For") == ["203.0.113.7, 198.51.100.2, 10.0.0.1, 127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["https"]  # what the client used at the proxy
    assert seen.getall("Forwarded") == [
        f'for=203.0.113.7;proto=https, for=127.0.0.1;proto=http;host="{gateway.host}:{gateway.port}"'
    ]


async def test_forwarding_headers_from_an_untrusted_client_are_replaced(gateway: Client) -> None:
    headers = [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Host", "evil.example"),
               ("X-Forwarded-Proto", "https"), ("Forwarded", "for=10.9.9.9")]
    async with gateway.get("/echo", headers=headers) as response:
        seen = received_headers(await response.json())
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == [f"{gateway.host}:{gateway.port}"]
    assert seen.getall("Forwarded") == [f'for=127.0.0.1;proto=http;host="{gateway.host}:{gateway.port}"']


async def test_client_request_id_is_sent_upstream_and_returned(gateway: Client) -> None:
    async with gateway.get("/echo", headers={"X-Request-ID": "client-id.42"}) as response:
        assert response.headers["X-Request-ID"] == "client-id.42"
        seen = received_headers(await response.json())
    assert seen.getall("X-Request-ID") == ["client-id.42"]


async def test_request_id_is_generated_when_absent_and_unique(gateway: Client) -> None:
    ids = []
    for _ in range(2):
        async with gateway.get("/echo") as response:
            returned = response.headers["X-Request-ID"]
            seen = received_headers(await response.json())
        assert HEX_ID.match(returned)
        assert seen.getall("X-Request-ID") == [returned]
        ids.append(returned)
    assert ids[0] != ids[1]


async def test_unusable_client_request_id_is_replaced(gateway: Client) -> None:
    async with gateway.get("/echo", headers={"X-Request-ID": "has spaces; and <junk>"}) as response:
        returned = response.headers["X-Request-ID"]
        seen = received_headers(await response.json())
    assert HEX_ID.match(returned)
    assert seen.getall("X-Request-ID") == [returned]


async def test_the_upstream_call_is_a_new_span_in_the_clients_trace(gateway: Client) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = {"traceparent": traceparent, "tracestate": "vendor=abc", "baggage": "k=v"}
    async with gateway.get("/echo", headers=headers) as response:
        seen = received_headers(await response.json())
    version, trace_id, parent_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert len(parent_id) == 16 and parent_id not in ("00f067aa0ba902b7", "0" * 16)
    assert seen["tracestate"] == "vendor=abc"
    assert seen["baggage"] == "k=v"


async def test_an_invalid_traceparent_is_not_passed_on(gateway: Client) -> None:
    async with gateway.get("/echo", headers={"traceparent": "00-zz-not-a-trace"}) as response:
        seen = received_headers(await response.json())
    assert "traceparent" not in seen


async def test_upstream_redirect_is_returned_not_followed(gateway: Client, legacy: TestServer) -> None:
    async with gateway.get("/legacy/redirect", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "http://example.invalid/elsewhere"
    assert [call["path"] for call in state_of(legacy).calls] == ["/redirect"]


# --- failures: problem+json, and the gateway keeps serving ----------------------------------------


async def test_closed_upstream_port_answers_502(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway({"upstreams": {"legacy": {"url": f"http://127.0.0.1:{closed_port()}"}}})
    with structlog.testing.capture_logs() as logs:
        async with gateway.post("/orders", json={"x": 1}, headers={"X-Request-ID": "r-502"}) as r:
            doc = await problem_of(r, 502)
    assert doc["request_id"] == "r-502"
    assert "legacy" in doc["detail"]
    access = [entry for entry in logs if entry["event"] == "request"]
    assert access[-1]["request_id"] == "r-502"
    assert (access[-1]["status"], access[-1]["upstream"]) == (502, "legacy")
    async with gateway.get("/accounts") as response:
        assert response.status == 200, "other upstreams are still served"
    async with gateway.get("/_gateway/healthz") as response:
        assert response.status == 200


async def test_slow_upstream_answers_504(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway({"upstreams": {"legacy": {"timeouts": {"total": 0.3}}}})
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with gateway.get("/echo?delay_ms=1500") as response:
        doc = await problem_of(response, 504)
    assert loop.time() - started < 1.4, "the gateway gave up at the timeout, not after the upstream"
    assert "legacy" in doc["detail"]
    await assert_still_serving(gateway)


async def test_no_route_answers_404(gateway: Client, legacy: TestServer, ledger: TestServer) -> None:
    async with gateway.get("/nowhere/at/all") as response:
        doc = await problem_of(response, 404)
    assert "/nowhere/at/all" in doc["detail"]
    assert state_of(legacy).calls == [] and state_of(ledger).calls == []
    await assert_still_serving(gateway)


@pytest.mark.parametrize(
    "target",
    [
        b"/orders/../x",
        b"/orders/%2e%2e/x",
        b"/orders/%2E%2E/%2e%2E/x",
        b"/orders/./x",
        b"/orders\\..\\x",
        b"/orders/%5c..%5cx",
        b"//evil.example/orders",
        b"http://evil.example/orders",
    ],
)
async def test_target_escaping_its_route_answers_400(
    gateway: Client, legacy: TestServer, target: bytes
) -> None:
    status, headers, body = await raw_exchange(gateway, raw_get(target, b"X-Request-ID: r-400"))
    assert status == 400
    assert headers["Content-Type"] == PROBLEM_JSON
    doc = json.loads(body)
    assert (doc["status"], doc["request_id"]) == (400, "r-400")
    assert headers["X-Request-ID"] == "r-400"
    assert state_of(legacy).calls == [], "nothing reached the upstream"
    await assert_still_serving(gateway)
