"""Protocol edges on the proxy path (issue 11): what is forwarded is exactly what was meant.

Every case runs the gateway in front of a real loopback upstream that records what it receives (an
aiohttp app that never inflates a body, or a raw asyncio TCP server for answers aiohttp could not
send), and talks to the gateway over a real socket, in raw bytes where a client library would
normalise the request.

1. Encoded request bodies. A proxied body with `Content-Encoding: gzip` or `deflate`, fixed length,
   chunked or streamed, reaches the upstream byte for byte with its Content-Encoding (the gateway
   never inflates it). A batch body may be gzip or deflate (also multi-member gzip): it is
   decoded, capped at `batch.limits.max_body_bytes` after decoding (a zip bomb is 413), and runs;
   any other coding, on any Content-Encoding line, is 415, a corrupt one 400; none of those
   reaches an upstream.
3. Forwarding headers. From a peer outside `trusted_proxies` a client's `X-Forwarded-For/-Host/
   -Proto` and `Forwarded` are replaced by what the gateway saw (RFC 7239 `Forwarded: for=...;
   proto=...;host="..."`); from a trusted proxy they are kept and the hop appended, on the proxy and
   on every call of a JSON batch. An entry of `trusted_proxies` that is no address or CIDR is a
   config error naming the key and the value.
5. Methods. `TRACE` is 405 problem+json on a route that does not list it, and `CONNECT` (origin-
   or authority-form, also under a catch-all route) is refused; neither reaches an upstream. A route
   that lists `TRACE` proxies it.
6. Upstream status lines. A reason phrase with a control character is replaced by the standard
   phrase (the status is relayed, not turned into an error); a status outside 100-599 is 502 naming
   the upstream, and so is a 101 no request asked for. The same holds per JSON batch item, and a
   multipart answer's part never carries the control character.
9. HTTP versions. HTTP/0.9 (`GET /path` with no version, or `HTTP/0.9`) is 400 problem+json
   `bad-http`, and so is anything but HTTP/1.0 and 1.1; nothing is forwarded.
10. Requests aiohttp itself cannot parse (Content-Length with chunked, invalid header lines),
    against `gateway serve`: 400 problem+json with an X-Request-ID, exactly one JSON
    `protocol_error` log line carrying that id (no traceback; a burst is rate-limited, never one
    line per request), and each counted in
    `gateway_requests_total{kind="protocol_error",status="400"}`.
11. Error details leak no internals: an unreachable upstream, or one that drops the connection, is
    named (`'legacy'`) with a stable reason, never its address, port, errno or exception class (the
    address is logged); undo and snapshot details of an atomic batch show paths relative to the
    upstream's base path.

Bugs these tests found, now fixed: multi-member gzip bodies were read only to their first member;
only the first Content-Encoding line was checked; a route could not list TRACE; an upstream's 101
was relayed as a final answer; a request line claiming HTTP/2.0 was served.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import random
import re
import socket
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from structlog.testing import capture_logs

from gateway.config import parse_config
from gateway.demo.launcher import demo_config_data
from gateway.errors import ConfigError
from tests.conftest import MakeGateway, deep_merge
from tests.test_streaming import free_port, spawn, stop, wait_until_up

Client = TestClient[web.Request, web.Application]
PROBLEM_JSON = "application/problem+json"
JSON_BATCH = "/batch/v1"
MULTIPART_BATCH = "/v1/api/batch"
NON_ATOMIC = {"X-Batch-Atomic": "false"}


# --- a recording upstream: exactly what arrived ------------------------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Recorder:
    """A real aiohttp upstream that records every request as received, body never inflated."""

    server: TestServer
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def recorder(aiohttp_server: Any) -> Recorder:
    seen: list[Seen] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body))
        return web.json_response({"method": request.method, "path": request.raw_path})

    # auto_decompress off: the upstream sees the bytes on the wire, not what aiohttp inflates them to
    app = web.Application(handler_args={"auto_decompress": False}, client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return Recorder(await aiohttp_server(app), seen)


async def gateway_to(
    make_gateway: MakeGateway, legacy_url: str, overrides: dict[str, Any] | None = None
) -> Client:
    """The demo gateway with the `legacy` upstream (/echo, /orders, /legacy) at `legacy_url`."""
    return await make_gateway(deep_merge({"upstreams": {"legacy": {"url": legacy_url}}}, overrides or {}))


# --- talking to the gateway ----------------------------------------------------------------------


@dataclass(frozen=True)
class RawAnswer:
    status_line: bytes
    headers: CIMultiDict[str]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    def problem(self) -> dict[str, Any]:
        """The body as RFC 9457 problem+json carrying the request id of the answer."""
        assert self.headers.get("Content-Type", "").startswith(PROBLEM_JSON), self.headers
        doc: dict[str, Any] = json.loads(self.body)
        assert doc["status"] == self.status
        assert doc["request_id"] == self.headers["X-Request-ID"]
        return doc


async def raw_exchange(host: str, port: int, request: bytes) -> RawAnswer:
    """Send exact bytes, read until the gateway closes (requests say `Connection: close`)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers.add(name.strip(), value.strip())
    if headers.get("Transfer-Encoding") == "chunked":
        body = dechunk(body)
    return RawAnswer(status_line, headers, body)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


async def raw_to(client: Client, request: bytes) -> RawAnswer:
    assert client.host and client.port
    return await raw_exchange(client.host, client.port, request)


async def problem_of(response: ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM_JSON
    doc: dict[str, Any] = await response.json(content_type=PROBLEM_JSON)
    assert doc["status"] == status
    assert doc["request_id"] == response.headers["X-Request-ID"]
    return doc


def single(method: str, operation: str, body: Any = None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"method": method, "operation": operation, **extra}
    if body is not None:
        item["body"] = body
    return {"SingleItem": item}


def batch(*items: dict[str, Any], mode: str = "Serial") -> dict[str, Any]:
    return {"Batch": {"batch_execution_type": mode, "items": list(items)}}


def results(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [node["SingleItem"]["Result"] for node in answer["Batch"]["items"]]


async def post_json_batch(
    client: Client, document: Any, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with client.post(JSON_BATCH, json=document, headers={**NON_ATOMIC, **(headers or {})}) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
    return answer


BOUNDARY = "edge-b0undary"


def multipart_body(*requests: bytes) -> bytes:
    parts = [
        f"--{BOUNDARY}\r\nContent-Type: application/http\r\n\r\n".encode() + request + b"\r\n"
        for request in requests
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def multipart_parts(answer: bytes, content_type: str) -> list[bytes]:
    """The embedded HTTP responses of a multipart/mixed answer, raw."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    assert boundary is not None, content_type
    delimiter = b"--" + boundary.group(1).encode()
    parts = []
    for chunk in answer.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, http = chunk.partition(b"\r\n\r\n")  # after the MIME part headers
        parts.append(http)
    return parts


async def post_multipart(client: Client, *requests: bytes) -> list[bytes]:
    headers = {
        "Content-Type": f"multipart/mixed; boundary={BOUNDARY}", "X-Batch-Execution": "Unordered",
        **NON_ATOMIC,
    }
    async with client.post(MULTIPART_BATCH, data=multipart_body(*requests), headers=headers) as response:
        assert response.status == 200, await response.text()
        return multipart_parts(await response.read(), response.headers["Content-Type"])


def closed_port() -> int:
    """A loopback port that was just bound and closed, so nothing listens on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# === Finding 1: encoded request bodies ===========================================================


PAYLOAD = json.dumps({"order": "x" * 2000, "n": list(range(300))}).encode()


def deflate(data: bytes) -> bytes:
    return zlib.compress(data)


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        pytest.param("gzip", gzip.compress(PAYLOAD), id="gzip"),
        pytest.param("deflate", deflate(PAYLOAD), id="deflate"),
        # over proxy.buffer_bytes (1 MiB): the streamed path, not the buffered one
        pytest.param("gzip", gzip.compress(random.Random(11).randbytes(1536 * 1024)), id="gzip-streamed"),
    ],
)
async def test_an_encoded_proxied_body_reaches_the_upstream_byte_for_byte(
    make_gateway: MakeGateway, recorder: Recorder, coding: str, body: bytes
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    headers = {"Content-Encoding": coding, "Content-Type": "application/json"}
    async with gateway.post("/echo/upload", data=io.BytesIO(body), headers=headers) as response:
        assert response.status == 200, await response.text()
    [seen] = recorder.seen
    assert seen.body == body, "the upstream got other bytes than the client sent"
    assert seen.headers.getall("Content-Encoding") == [coding]


async def test_a_chunked_gzip_proxied_body_reaches_the_upstream_byte_for_byte(
    make_gateway: MakeGateway, recorder: Recorder
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    body = gzip.compress(PAYLOAD)
    pieces = [body[i : i + 700] for i in range(0, len(body), 700)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    head = (
        b"POST /echo/upload HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    answer = await raw_to(gateway, head + chunked)
    assert answer.status == 200, answer
    [seen] = recorder.seen
    assert seen.body == body
    assert seen.headers.getall("Content-Encoding") == ["gzip"]


@pytest.mark.parametrize(
    ("coding", "encode"), [("gzip", gzip.compress), ("deflate", deflate)], ids=["gzip", "deflate"]
)
async def test_an_encoded_json_batch_body_is_decoded_and_runs(
    make_gateway: MakeGateway, recorder: Recorder, coding: str, encode: Any
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    document = batch(single("GET", "/echo/one"), single("POST", "/echo/two", {"a": 1}))
    headers = {"Content-Encoding": coding, "Content-Type": "application/json", **NON_ATOMIC}
    body = encode(json.dumps(document).encode())
    async with gateway.post(JSON_BATCH, data=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert [r["status"] for r in results(answer)] == [200, 200]
    assert [(s.method, s.raw_path) for s in recorder.seen] == [("GET", "/echo/one"), ("POST", "/echo/two")]
    assert json.loads(recorder.seen[1].body) == {"a": 1}
    assert all("Content-Encoding" not in s.headers for s in recorder.seen)


async def test_a_gzip_encoded_multipart_batch_body_is_decoded_and_runs(
    make_gateway: MakeGateway, recorder: Recorder
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    body = multipart_body(b"GET /echo/part HTTP/1.1\r\n\r\n")
    headers = {
        "Content-Type": f"multipart/mixed; boundary={BOUNDARY}", "Content-Encoding": "gzip", **NON_ATOMIC
    }
    async with gateway.post(MULTIPART_BATCH, data=gzip.compress(body), headers=headers) as response:
        assert response.status == 200, await response.text()
        [part] = multipart_parts(await response.read(), response.headers["Content-Type"])
    assert part.startswith(b"HTTP/1.1 200 ")
    assert [(s.method, s.raw_path) for s in recorder.seen] == [("GET", "/echo/part")]


def encoded_batch_post(gateway: Client, body: bytes, coding: str) -> Any:
    headers = {"Content-Encoding": coding, "Content-Type": "application/json", **NON_ATOMIC}
    return gateway.post(JSON_BATCH, data=body, headers=headers)


async def test_a_gzip_bomb_batch_body_is_413_and_nothing_is_called(
    make_gateway: MakeGateway, recorder: Recorder
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    # a valid JSON batch padded with 20 MB of spaces: about 20 KB on the wire, over the 10 MiB cap
    document = json.dumps(batch(single("GET", "/echo/bomb"))).encode()
    bomb = gzip.compress(document[:-1] + b" " * (20 * 1024 * 1024) + document[-1:], 9)
    assert len(bomb) < 100_000
    async with encoded_batch_post(gateway, bomb, "gzip") as response:
        doc = await problem_of(response, 413)
    assert "10485760" in doc["detail"]
    assert recorder.seen == []


async def test_a_batch_body_in_another_coding_is_415(make_gateway: MakeGateway, recorder: Recorder) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    async with encoded_batch_post(gateway, b"\x1b\x00\x00\x00", "br") as response:
        doc = await problem_of(response, 415)
    assert "'br'" in doc["detail"] and doc["where"] == "Content-Encoding"
    assert recorder.seen == []


async def test_a_corrupt_gzip_batch_body_is_400(make_gateway: MakeGateway, recorder: Recorder) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    good = gzip.compress(json.dumps(batch(single("GET", "/echo/corrupt"))).encode())
    corrupt = good[:12] + bytes(b ^ 0x5A for b in good[12:-8]) + good[-8:]
    async with encoded_batch_post(gateway, corrupt, "gzip") as response:
        doc = await problem_of(response, 400)
    assert doc["where"] == "Content-Encoding"
    assert recorder.seen == []


async def test_a_multi_member_gzip_batch_body_is_decoded_whole(
    make_gateway: MakeGateway, recorder: Recorder
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    document = json.dumps(batch(single("GET", "/echo/members"))).encode()
    members = gzip.compress(document[:10]) + gzip.compress(document[10:])  # what `cat a.gz b.gz` makes
    assert gzip.decompress(members) == document
    async with encoded_batch_post(gateway, members, "gzip") as response:
        assert response.status == 200, await response.text()
    assert [s.raw_path for s in recorder.seen] == ["/echo/members"]


async def test_an_unsupported_coding_on_a_second_content_encoding_line_is_415(
    make_gateway: MakeGateway, recorder: Recorder
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    body = gzip.compress(json.dumps(batch(single("GET", "/echo/x"))).encode())
    headers = [("Content-Type", "application/json"), ("Content-Encoding", "gzip"), ("Content-Encoding", "br"),
               *NON_ATOMIC.items()]
    async with gateway.post(JSON_BATCH, data=body, headers=headers) as response:
        doc = await problem_of(response, 415)
    assert "'br'" in doc["detail"]
    assert recorder.seen == []


# === Finding 3: forwarding headers and trusted_proxies ===========================================


CLAIMED = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Host", "client.example"),
    ("X-Forwarded-Proto", "https"),
    ("Forwarded", "for=203.0.113.7;proto=https;host=client.example"),
]
"""What a client (or a proxy in front of the gateway) claims about the original request."""


def forwarding(headers: CIMultiDict[str]) -> dict[str, list[str]]:
    names = ("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded")
    return {name: headers.getall(name, []) for name in names}


def gateway_view(gateway: Client) -> dict[str, list[str]]:
    """Exactly what the gateway itself saw of a request from 127.0.0.1 to its own address."""
    host = f"{gateway.host}:{gateway.port}"
    return {
        "X-Forwarded-For": ["127.0.0.1"],
        "X-Forwarded-Host": [host],
        "X-Forwarded-Proto": ["http"],
        "Forwarded": [f'for=127.0.0.1;proto=http;host="{host}"'],
    }


def trusted_view(gateway: Client) -> dict[str, list[str]]:
    """The claims kept, the gateway's hop appended to the chains."""
    host = f"{gateway.host}:{gateway.port}"
    return {
        "X-Forwarded-For": ["203.0.113.7, 127.0.0.1"],
        "X-Forwarded-Host": ["client.example"],
        "X-Forwarded-Proto": ["https"],
        "Forwarded": [
            f'for=203.0.113.7;proto=https;host=client.example, for=127.0.0.1;proto=http;host="{host}"'
        ],
    }


TRUST_LOOPBACK = {"trusted_proxies": ["127.0.0.0/8"]}


@pytest.mark.parametrize(
    "overrides", [None, {"trusted_proxies": ["10.0.0.0/8", "::1"]}], ids=["none-trusted", "others-trusted"]
)
async def test_an_untrusted_client_s_forwarding_headers_are_replaced_on_the_proxy(
    make_gateway: MakeGateway, recorder: Recorder, overrides: dict[str, Any] | None
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url, overrides)
    async with gateway.get("/echo/x", headers=CLAIMED) as response:
        assert response.status == 200
    [seen] = recorder.seen
    assert forwarding(seen.headers) == gateway_view(gateway)


async def test_a_trusted_proxy_s_forwarding_headers_are_kept_and_the_hop_appended(
    make_gateway: MakeGateway, recorder: Recorder
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url, TRUST_LOOPBACK)
    async with gateway.get("/echo/x", headers=CLAIMED) as response:
        assert response.status == 200
    [seen] = recorder.seen
    assert forwarding(seen.headers) == trusted_view(gateway)


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
async def test_every_json_batch_call_follows_the_proxy_rule_for_forwarding_headers(
    make_gateway: MakeGateway, recorder: Recorder, trusted: bool
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url, TRUST_LOOPBACK if trusted else None)
    document = batch(single("GET", "/echo/a"), single("GET", "/echo/b"), mode="Unordered")
    await post_json_batch(gateway, document, headers=dict(CLAIMED))
    expected = trusted_view(gateway) if trusted else gateway_view(gateway)
    assert len(recorder.seen) == 2
    assert [forwarding(s.headers) for s in recorder.seen] == [expected, expected]


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-an-address", "10.0.0.300"])
def test_trusted_proxies_take_cidrs_and_anything_else_is_a_config_error(bad: str) -> None:
    data = demo_config_data("http://127.0.0.1:1", "http://127.0.0.1:2")
    config = parse_config(deep_merge(data, {"trusted_proxies": ["10.0.0.0/8", "::1", "192.0.2.7"]}), "<t>")
    assert config.trusted_proxies == ("10.0.0.0/8", "::1", "192.0.2.7")
    with pytest.raises(ConfigError) as caught:
        parse_config(deep_merge(data, {"trusted_proxies": ["10.0.0.0/8", bad]}), "gateway.yaml")
    message = str(caught.value)
    assert "gateway.yaml" in message and "trusted_proxies" in message and repr(bad) in message
    assert "Traceback" not in message


# === Finding 5: CONNECT and TRACE ================================================================


async def test_trace_on_a_route_that_does_not_list_it_is_405_and_never_forwarded(
    make_gateway: MakeGateway, recorder: Recorder
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    async with gateway.request("TRACE", "/echo/x", headers={"Authorization": "Bearer secret"}) as response:
        doc = await problem_of(response, 405)
        allow = response.headers["Allow"]
    assert doc["type"].endswith("method-not-allowed")
    assert allow == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"  # RFC 9110: a 405 says what is
    assert recorder.seen == []


async def test_trace_on_a_route_that_lists_it_is_proxied(
    make_gateway: MakeGateway, recorder: Recorder
) -> None:
    routes = [*demo_config_data("http://x", "http://y")["routes"],
              {"prefix": "/diagnostics", "upstream": "legacy", "methods": ["TRACE"]}]
    gateway = await gateway_to(make_gateway, recorder.url, {"routes": routes})
    async with gateway.request("TRACE", "/diagnostics/x") as response:
        assert response.status == 200
    assert [(s.method, s.raw_path) for s in recorder.seen] == [("TRACE", "/diagnostics/x")]


CATCH_ALL = {
    "routes": [*demo_config_data("http://x", "http://y")["routes"], {"prefix": "/", "upstream": "legacy"}]
}


@pytest.mark.parametrize("catch_all", [False, True], ids=["demo-routes", "with-catch-all"])
@pytest.mark.parametrize(
    "request_line",
    [b"CONNECT upstream.example:443 HTTP/1.1", b"CONNECT /echo/x HTTP/1.1"],
    ids=["authority-form", "origin-form"],
)
async def test_connect_is_refused_and_never_forwarded(
    make_gateway: MakeGateway, recorder: Recorder, request_line: bytes, catch_all: bool
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url, CATCH_ALL if catch_all else None)
    request = request_line + b"\r\nHost: upstream.example:443\r\nConnection: close\r\n\r\n"
    answer = await raw_to(gateway, request)
    assert 400 <= answer.status < 500, answer
    answer.problem()
    assert recorder.seen == []


# === Finding 6: odd upstream status lines ========================================================


ODD_ANSWERS = {
    "/echo/control": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",
    "/echo/s999": b"HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\nok",
    "/echo/s099": b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok",
}
MORE_ANSWERS = {
    # the gateway never forwards Upgrade, so a 101 is an answer to nothing the client asked
    "/echo/s101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw",
    "/echo/drop": b"",  # the connection closes without an answer
}


@asynccontextmanager
async def odd_upstream(seen: list[str]) -> AsyncIterator[str]:
    """A raw TCP upstream answering each request with the canned answer for its path, then closing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1].decode()
            seen.append(path)
            answers = {**ODD_ANSWERS, **MORE_ANSWERS}
            writer.write(answers.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


def raw_get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n".encode()


async def test_a_reason_phrase_with_a_control_character_is_relayed_as_the_standard_one(
    make_gateway: MakeGateway,
) -> None:
    seen: list[str] = []
    async with odd_upstream(seen) as url:
        gateway = await gateway_to(make_gateway, url)
        answer = await raw_to(gateway, raw_get("/echo/control"))
    assert answer.status_line == b"HTTP/1.1 200 OK"
    assert answer.body == b"ok"
    assert seen == ["/echo/control"]


@pytest.mark.parametrize("path", ["/echo/s999", "/echo/s099"])
async def test_a_status_outside_100_599_is_502_naming_the_upstream(
    make_gateway: MakeGateway, path: str
) -> None:
    seen: list[str] = []
    async with odd_upstream(seen) as url:
        gateway = await gateway_to(make_gateway, url)
        answer = await raw_to(gateway, raw_get(path))
    assert answer.status == 502, answer
    assert "'legacy'" in answer.problem()["detail"]
    assert seen == [path]


async def test_odd_status_lines_in_a_json_batch_give_200_and_502_per_item(make_gateway: MakeGateway) -> None:
    seen: list[str] = []
    async with odd_upstream(seen) as url:
        gateway = await gateway_to(make_gateway, url)
        document = batch(*(single("GET", path) for path in ODD_ANSWERS), mode="Unordered")
        answer = await post_json_batch(gateway, document)
    control, s999, s099 = results(answer)
    assert (control["status"], control["body"]) == (200, "ok")
    for failed in (s999, s099):
        assert failed["status"] == 502 and failed.get("gateway_error") is True
        assert "'legacy'" in failed["body"]["error"]
    assert sorted(seen) == sorted(ODD_ANSWERS)


async def test_a_multipart_answer_never_carries_an_upstream_s_control_character(
    make_gateway: MakeGateway,
) -> None:
    seen: list[str] = []
    async with odd_upstream(seen) as url:
        gateway = await gateway_to(make_gateway, url)
        requests = [f"GET {path} HTTP/1.1\r\n\r\n".encode() for path in ODD_ANSWERS]
        parts = await post_multipart(gateway, *requests)
    status_lines = [part.split(b"\r\n", 1)[0] for part in parts]
    assert status_lines[0] == b"HTTP/1.1 200 OK"
    assert [line.split(b" ")[1] for line in status_lines[1:]] == [b"502", b"502"]
    for line in status_lines:
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", line), line
    assert sorted(seen) == sorted(ODD_ANSWERS)




async def test_an_upstream_101_nobody_asked_for_is_502_on_the_proxy(make_gateway: MakeGateway) -> None:
    seen: list[str] = []
    async with odd_upstream(seen) as url:
        gateway = await gateway_to(make_gateway, url)
        answer = await raw_to(gateway, raw_get("/echo/s101"))
    assert answer.status == 502, answer
    assert "'legacy'" in answer.problem()["detail"]


async def test_an_upstream_101_nobody_asked_for_is_502_in_batches(make_gateway: MakeGateway) -> None:
    seen: list[str] = []
    async with odd_upstream(seen) as url:
        gateway = await gateway_to(make_gateway, url)
        [json_item] = results(await post_json_batch(gateway, batch(single("GET", "/echo/s101"))))
        [part] = await post_multipart(gateway, b"GET /echo/s101 HTTP/1.1\r\n\r\n")
    assert json_item["status"] == 502 and "'legacy'" in json_item["body"]["error"]
    assert part.startswith(b"HTTP/1.1 502 ")


# === Finding 9: HTTP/0.9 =========================================================================


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /echo/x\r\n\r\n", b"GET /echo/x HTTP/0.9\r\nHost: g\r\nConnection: close\r\n\r\n"],
    ids=["no-version", "explicit-0.9"],
)
async def test_an_http_0_9_request_is_400_bad_http_and_never_forwarded(
    make_gateway: MakeGateway, recorder: Recorder, request_bytes: bytes
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    answer = await raw_to(gateway, request_bytes)
    assert answer.status == 400, answer
    assert answer.problem()["type"].endswith("bad-http")
    assert recorder.seen == []


async def test_an_http_2_0_request_line_is_refused_and_never_forwarded(
    make_gateway: MakeGateway, recorder: Recorder
) -> None:
    gateway = await gateway_to(make_gateway, recorder.url)
    answer = await raw_to(gateway, b"GET /echo/x HTTP/2.0\r\nHost: g\r\nConnection: close\r\n\r\n")
    assert answer.status in (400, 505), answer
    answer.problem()
    assert recorder.seen == []


# === Finding 10: requests aiohttp cannot parse, against `gateway serve` =========================


@dataclass(frozen=True)
class Served:
    port: int
    log: Path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """`gateway --log-json serve` in its own process (the ConnectionGuard is wired there)."""
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port},
        "upstreams": {"legacy": {"url": f"http://127.0.0.1:{closed_port()}"}},
        "routes": [{"prefix": "/echo", "upstream": "legacy"}],
        "journal": {"path": str(tmp_path / "journal.sqlite3")},
    }))
    log = tmp_path / "gateway.log"
    process = spawn([sys.executable, "-m", "gateway", "--log-json", "serve", "--config", str(config)], log)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/_gateway/readyz", process, log)
        yield Served(port, log)
    finally:
        stop(process)


UNPARSABLE = {
    "content-length-and-chunked": (
        b"POST /echo/x HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n"
    ),
    "invalid-header-line": b"GET /echo/x HTTP/1.1\r\nHost: g\r\nno colon in this line\r\n\r\n",
    "space-in-header-name": b"GET /echo/x HTTP/1.1\r\nHost: g\r\nBad Name: x\r\n\r\n",
}


def protocol_error_count(metrics: str) -> float:
    match = re.search(
        r'^gateway_http_requests_total\{kind="protocol_error",[^}]*status_class="4xx"[^}]*\} (\S+)$',
        metrics, re.M,
    )
    return float(match.group(1)) if match else 0.0


async def metrics_of(port: int) -> str:
    request = b"GET /_gateway/metrics HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    answer = await raw_exchange("127.0.0.1", port, request)
    assert answer.status == 200
    return answer.body.decode()


def log_lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("request_bytes", list(UNPARSABLE.values()), ids=list(UNPARSABLE))
async def test_a_request_aiohttp_cannot_parse_is_400_problem_json_one_log_line_and_a_metric(
    served: Served, request_bytes: bytes
) -> None:
    answer = await raw_exchange("127.0.0.1", served.port, request_bytes)
    assert answer.status == 400, answer
    doc = answer.problem()
    assert doc["type"].endswith("bad-http")
    request_id = answer.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert protocol_error_count(await metrics_of(served.port)) == 1

    lines = log_lines(served.log)
    mine = [line for line in lines if request_id in line]
    assert len(mine) == 1, mine
    entry = json.loads(mine[0])
    assert entry["event"] == "protocol_error" and entry["status"] == 400
    assert [line for line in lines if "protocol_error" in line] == mine
    assert not [line for line in lines if not line.startswith("{")], "a line that is not JSON (traceback?)"


@pytest.mark.slow
async def test_a_burst_of_unparsable_requests_is_counted_whole_and_logged_without_tracebacks(
    served: Served,
) -> None:
    answers = await asyncio.gather(*(
        raw_exchange("127.0.0.1", served.port, request) for request in [*UNPARSABLE.values()] * 5
    ))
    assert [a.status for a in answers] == [400] * 15
    assert len({a.headers["X-Request-ID"] for a in answers}) == 15
    for answer in answers:
        answer.problem()
    assert protocol_error_count(await metrics_of(served.port)) == 15
    lines = log_lines(served.log)
    logged = [json.loads(line) for line in lines if '"protocol_error"' in line]
    # rate-limited (one line per 10 s; the rest counted into the next line), never one per request
    assert 1 <= len(logged) <= 2
    assert {entry["request_id"] for entry in logged} <= {a.headers["X-Request-ID"] for a in answers}
    assert not [line for line in lines if not line.startswith("{")]
    # the gateway still serves well-formed requests on new connections
    assert (await raw_exchange("127.0.0.1", served.port, raw_get("/_gateway/healthz"))).status == 200


# === Finding 11: error details leak no internals =================================================


REFUSED = ("connection refused", "cannot connect")


def assert_no_internals(text: str, port: int, reasons: tuple[str, ...] = REFUSED) -> None:
    """Names the upstream and a stable reason; no address, port, errno or library wording."""
    assert "'legacy'" in text
    assert any(reason in text for reason in reasons), text
    for internal in ("127.0.0.1", str(port), "Errno", "Connect call failed", "Error"):
        assert internal not in text, f"{internal!r} leaked: {text}"


async def test_a_proxied_request_to_a_closed_port_names_the_upstream_not_its_address(
    make_gateway: MakeGateway,
) -> None:
    port = closed_port()
    gateway = await gateway_to(make_gateway, f"http://127.0.0.1:{port}")
    with capture_logs() as logs:
        async with gateway.get("/echo/x") as response:
            doc = await problem_of(response, 502)
    assert_no_internals(doc["detail"], port)
    assert_no_internals(json.dumps({k: v for k, v in doc.items() if k != "request_id"}), port)
    # the address is for operators: in the log, under the request id
    details = [entry for entry in logs if entry.get("event") == "upstream_error"]
    assert details and any(str(port) in str(entry.get("detail")) for entry in details)


async def test_batch_items_to_a_closed_port_name_the_upstream_not_its_address(
    make_gateway: MakeGateway,
) -> None:
    port = closed_port()
    gateway = await gateway_to(make_gateway, f"http://127.0.0.1:{port}")
    answer = await post_json_batch(gateway, batch(single("GET", "/echo/x")))
    [failed] = results(answer)
    assert failed["status"] == 502 and failed["gateway_error"] is True
    assert_no_internals(failed["body"]["error"], port)
    assert_no_internals(json.dumps({k: v for k, v in answer.items() if k != "batch_id"}), port)

    [part] = await post_multipart(gateway, b"GET /echo/x HTTP/1.1\r\n\r\n")
    assert part.startswith(b"HTTP/1.1 502 ")
    assert_no_internals(part.decode("utf-8", "replace"), port)


async def test_a_connection_lost_before_an_answer_is_named_by_a_stable_reason(
    make_gateway: MakeGateway,
) -> None:
    seen: list[str] = []
    async with odd_upstream(seen) as url:
        gateway = await gateway_to(make_gateway, url)
        port = int(url.rsplit(":", 1)[1])
        async with gateway.get("/echo/drop") as response:
            proxied = (await problem_of(response, 502))["detail"]
        [item] = results(await post_json_batch(gateway, batch(single("GET", "/echo/drop"))))
    assert_no_internals(proxied, port, ("connection lost",))
    assert item["status"] == 502 and item["maybe_executed"] is True
    assert_no_internals(item["body"]["error"], port, ("connection lost",))


FAST_ROLLBACK: dict[str, Any] = {
    "batch": {"rollback": {"attempts": 2, "initial_backoff": 0.005, "max_backoff": 0.01}}
}


async def test_undo_and_snapshot_details_show_paths_relative_to_the_upstream_s_base_path(
    make_gateway: MakeGateway, aiohttp_server: Any
) -> None:
    calls: list[tuple[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        calls.append((request.method, request.raw_path))
        if request.method == "POST":
            return web.json_response({"id": 7}, status=201, headers={"Location": "/base/orders/7"})
        return web.json_response({"error": "no"}, status=500)  # undo DELETE, snapshot GET, .../fail

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    # /legacy strips its prefix: POST /legacy/orders is POST <base>/orders on the upstream
    gateway = await gateway_to(make_gateway, str(server.make_url("/base")), FAST_ROLLBACK)

    async def atomic(*items: dict[str, Any]) -> dict[str, Any]:
        headers = {"X-Batch-Atomic": "true"}
        async with gateway.post(JSON_BATCH, json=batch(*items), headers=headers) as response:
            assert response.status == 200, await response.text()
            answer: dict[str, Any] = await response.json()
        return answer

    undone = await atomic(
        single("POST", "/legacy/orders", {"item": "x"}), single("GET", "/legacy/orders/fail")
    )
    assert calls == [("POST", "/base/orders"), ("GET", "/base/orders/fail"),
                     ("DELETE", "/base/orders/7"), ("DELETE", "/base/orders/7")]
    assert undone["atomic"]["outcome"] == "rollback_incomplete"
    created = undone["Batch"]["items"][0]["SingleItem"]["Result"]
    assert created["rollback"] == "rollback_failed"
    assert "DELETE /orders/7 answered 500" in created["rollback_detail"]

    calls.clear()
    snapshot = await atomic(single("PUT", "/legacy/orders/7", {"item": "y"}))
    assert calls == [("GET", "/base/orders/7")], "the PUT is not sent when its snapshot fails"
    [refused] = results(snapshot)
    assert refused["status"] == 502 and "snapshot GET /orders/7 answered 500" in refused["body"]["error"]

    shown = [created["rollback_detail"], undone["atomic"].get("detail", ""), refused["body"]["error"],
             snapshot["atomic"].get("detail", "")]
    assert not [text for text in shown if "/base" in text or str(server.port) in text], shown
