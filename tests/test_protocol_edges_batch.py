"""Protocol edges of the batch endpoints (issue 11): what is forwarded is exactly what was meant.

The rules, as README "What the gateway forwards, changes and refuses" states them:

- **The gateway's own headers.** Every call carries the gateway's `X-Forwarded-For/-Proto/-Host`,
  RFC 7239 `Forwarded` and the outer request's `X-Request-ID` (the client's, else a generated one,
  also returned on the answer). A batch item that sets any of them is not an error, but its values
  never reach the upstream. An item carrying a control header (`X-Batch-Atomic`,
  `X-Batch-Execution`) or `Expect` rejects the whole batch with 400 problem+json naming the item,
  and nothing is called. Headers an item's own `Connection` lists, and `Keep-Alive`, are dropped.
- **CSRF.** The JSON batch endpoint runs a body only under `application/json` or a `*+json` type;
  no Content-Type, `text/plain`, `application/x-www-form-urlencoded` and `multipart/form-data` (what
  a cross-site form can send without a CORS preflight) answer 415 and execute nothing.
- **Methods.** `CONNECT` and `TRACE` are refused as batch item methods (400 naming the item).
- **Hop-by-hop headers in results.** What an upstream answered reaches the client without its
  hop-by-hop headers (RFC 9110 section 7.6.1: `Connection` and what it lists, `Keep-Alive`,
  `Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`, `Proxy-*`), by one rule for JSON results,
  multipart answer parts and the proxy; end-to-end headers are kept.
- **Targets.** A fragment, raw non-ASCII bytes, and dot segments hidden behind `;parameters`,
  double percent-encoding, fullwidth dots or overlong UTF-8 answer 400 problem+json, in a JSON item's
  `operation`, a multipart part's request line and a proxied request line alike, and nothing reaches
  an upstream; near-twins that are harmless (`%C3%A9`, `;b=1`, `%2541`, `%252f`) still pass.

Everything runs against real loopback upstreams: the demo `legacy` service's `/echo` endpoint returns
the request it received, and a raw TCP upstream answers with exactly the bytes a test chose. Requests
whose bytes matter (no Content-Type, a `#` or raw UTF-8 in a request line) go out on raw sockets, so
no client library normalises them first.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.app import create_app
from gateway.connection_guard import ConnectionGuard
from gateway.demo.launcher import demo_config_data
from gateway.formats._http1 import response_bytes
from gateway.formats._json_results import iter_document
from gateway.headers import end_to_end
from gateway.model import ItemResult, SubResponse
from tests.conftest import MakeConfig, MakeGateway, state_of

Client = TestClient[web.Request, web.Application]
PROBLEM_JSON = "application/problem+json"
JSON_ENDPOINT = "/batch/v1"
MULTIPART_ENDPOINT = "/v1/api/batch"
BOUNDARY = "edge-7f3a91"
Headers = Sequence[tuple[str, str]]


# --- raw HTTP on a socket -------------------------------------------------------------------------


@dataclass
class RawAnswer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def problem(self, status: int) -> dict[str, Any]:
        """The answer as RFC 9457 problem+json with `status`, carrying the request id."""
        assert self.status == status, self.body[:500]
        assert self.headers["Content-Type"].split(";")[0] == PROBLEM_JSON
        doc: dict[str, Any] = json.loads(self.body)
        assert doc["status"] == status and doc["detail"]
        assert doc["request_id"] == self.headers["X-Request-ID"]
        return doc

    def json(self) -> Any:
        assert self.status == 200, self.body[:500]
        return json.loads(self.body)


class _BytesSocket:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self._file


def parse_response(raw: bytes) -> RawAnswer:
    """A whole HTTP/1.x response, parsed by http.client (so chunked framing is undone)."""
    response = http.client.HTTPResponse(cast(Any, _BytesSocket(raw)))
    response.begin()
    return RawAnswer(response.status, CIMultiDict(response.getheaders()), response.read())


async def raw_exchange(host: str, port: int, request: bytes) -> RawAnswer:
    """Send exactly `request` on a fresh connection and read the answer until the server closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return parse_response(data)


def raw_request(
    method: str, target: bytes, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: gateway.test", b"Connection: close"]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join([*lines, b"", b""]) + body


async def raw_to(client: Client, request: bytes) -> RawAnswer:
    return await raw_exchange(str(client.host), int(client.port or 0), request)


# --- one batch item, in either format -------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()


def item(method: str, target: str, *headers: tuple[str, str]) -> Item:
    return Item(method, target, headers)


@dataclass
class ItemAnswer:
    """One item's answer: its status, the upstream headers the answer shows, and the echo body."""

    status: int
    headers: CIMultiDict[str]
    body: Any

    @property
    def received(self) -> CIMultiDict[str]:
        """The headers the echo upstream received for this item (order and repeats kept)."""
        return CIMultiDict((name, value) for name, value in self.body["headers"])


@dataclass
class Sent:
    """A whole batch answer."""

    answer: RawAnswer
    items: list[ItemAnswer] = field(default_factory=list)


class JsonFormat:
    name = "json"

    @staticmethod
    def where(index: int) -> str:
        return f"/Batch/items/{index}/SingleItem"

    @staticmethod
    def document(items: Sequence[Item]) -> bytes:
        def single(one: Item) -> dict[str, Any]:
            grouped: dict[str, list[str]] = {}
            for name, value in one.headers:
                grouped.setdefault(name, []).append(value)
            headers = {name: values[0] if len(values) == 1 else values for name, values in grouped.items()}
            return {"SingleItem": {"method": one.method, "operation": one.target, "headers": headers}}

        batch = {"batch_execution_type": "Serial", "items": [single(one) for one in items]}
        return json.dumps({"Batch": batch}, ensure_ascii=False).encode("utf-8")

    async def send(self, client: Client, items: Sequence[Item], outer: Headers = ()) -> Sent:
        headers = [("Content-Type", "application/json"), *outer]
        request = raw_request("POST", JSON_ENDPOINT.encode(), headers, self.document(items))
        answer = await raw_to(client, request)
        sent = Sent(answer)
        if answer.status == 200:
            for node in answer.json()["Batch"]["items"]:
                found = node["SingleItem"]["Result"]
                pairs = [
                    (name, value)
                    for name, values in found["headers"].items()
                    for value in (values if isinstance(values, list) else [values])
                ]
                sent.items.append(ItemAnswer(found["status"], CIMultiDict(pairs), found["body"]))
        return sent


class MultipartFormat:
    name = "multipart"

    @staticmethod
    def where(index: int) -> str:
        return f"part {index + 1}"

    @staticmethod
    def document(items: Sequence[Item]) -> bytes:
        body = b""
        for n, one in enumerate(items):
            head = [f"{one.method} {one.target} HTTP/1.1", *(f"{k}: {v}" for k, v in one.headers)]
            request = "\r\n".join([*head, "", ""]).encode("utf-8")
            body += f"--{BOUNDARY}\r\nContent-Type: application/http\r\nContent-ID: <{n}>\r\n\r\n".encode()
            body += request + b"\r\n"
        return body + f"--{BOUNDARY}--\r\n".encode()

    async def send(self, client: Client, items: Sequence[Item], outer: Headers = ()) -> Sent:
        headers = [
            ("Content-Type", f"multipart/mixed; boundary={BOUNDARY}"),
            ("X-Batch-Atomic", "false"),
            *outer,
        ]
        request = raw_request("POST", MULTIPART_ENDPOINT.encode(), headers, self.document(items))
        answer = await raw_to(client, request)
        sent = Sent(answer)
        if answer.status == 200:
            for part in answer_parts(answer):
                body = json.loads(part.body) if "json" in part.headers.get("Content-Type", "") else part.body
                sent.items.append(ItemAnswer(part.status, part.headers, body))
        return sent


def answer_parts(answer: RawAnswer) -> list[RawAnswer]:
    """The embedded HTTP responses of a multipart/mixed answer, parsed by `email` and http.client."""
    head = f"Content-Type: {answer.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=compat32).parsebytes(head + answer.body)
    assert message.is_multipart() and message.defects == []
    parts = []
    for part in message.get_payload():
        assert isinstance(part, Message) and part["Content-Type"] == "application/http"
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append(parse_response(payload))
    return parts


FORMATS = [pytest.param(JsonFormat(), id="json"), pytest.param(MultipartFormat(), id="multipart")]
Format = JsonFormat | MultipartFormat


def calls_to(server: TestServer) -> list[str]:
    return [call["path"] for call in state_of(server).calls]


def assert_refused(sent: Sent, fmt: Format, index: int, *mentions: str) -> dict[str, Any]:
    """400 problem+json naming item `index` (JSON: `where` and `pointer`; multipart: `where`)."""
    doc = sent.answer.problem(400)
    assert doc["where"] == fmt.where(index)
    assert doc.get("pointer") == (doc["where"] if isinstance(fmt, JsonFormat) else None)
    for text in mentions:
        assert text.lower() in doc["detail"].lower(), doc["detail"]
    return doc


# --- finding 2: an item cannot override the gateway's own headers ---------------------------------


FORGED = (
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("Forwarded", "for=6.6.6.6;proto=https;host=evil.example"),
    ("X-Request-ID", "chosen-by-the-item"),
)
GATEWAY_VIEW = {
    "X-Forwarded-For": "127.0.0.1",
    "X-Forwarded-Host": "gateway.test",
    "X-Forwarded-Proto": "http",
    "Forwarded": 'for=127.0.0.1;proto=http;host="gateway.test"',
}


@pytest.mark.parametrize("fmt", FORMATS)
async def test_an_item_cannot_set_forwarding_headers_or_the_request_id(
    fmt: Format, gateway: Client
) -> None:
    """The upstream sees the client's real peer and the outer request's id, never the item's."""
    outer = [("X-Request-ID", "outer-id-0001")]
    sent = await fmt.send(gateway, [item("GET", "/echo/forged", *FORGED)], outer)
    received = sent.items[0].received
    for name, value in GATEWAY_VIEW.items():
        assert received.getall(name) == [value], name
    assert received.getall("X-Request-ID") == ["outer-id-0001.0"]  # derived: <outer id>.<position>
    assert sent.answer.headers["X-Request-ID"] == "outer-id-0001"

    generated = await fmt.send(gateway, [item("GET", "/echo/forged", *FORGED)])
    answer_id = generated.answer.headers["X-Request-ID"]
    assert answer_id != "chosen-by-the-item"
    assert generated.items[0].received.getall("X-Request-ID") == [f"{answer_id}.0"]


@pytest.mark.parametrize("header", [("X-Batch-Atomic", "false"), ("X-Batch-Execution", "Unordered"),
                                    ("Expect", "100-continue")])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_an_item_with_a_control_header_or_expect_rejects_the_batch(
    fmt: Format, header: tuple[str, str], gateway: Client, legacy: TestServer
) -> None:
    items = [item("GET", "/echo/first"), item("GET", "/echo/second", header)]
    assert_refused(await fmt.send(gateway, items), fmt, 1, header[0])
    assert calls_to(legacy) == []


@pytest.mark.parametrize("fmt", FORMATS)
async def test_headers_an_items_connection_lists_and_keep_alive_are_not_forwarded(
    fmt: Format, gateway: Client
) -> None:
    own = [("Connection", "X-Secret , x-other"), ("X-Secret", "1"), ("X-Other", "2"),
           ("Keep-Alive", "timeout=5"), ("X-Kept", "yes")]
    sent = await fmt.send(gateway, [item("GET", "/echo/connection", *own)])
    assert sent.items[0].status == 200
    received = sent.items[0].received
    for name in ("X-Secret", "X-Other", "Keep-Alive"):
        assert name not in received, name
    assert "secret" not in received.get("Connection", "").lower()
    assert received.getall("X-Kept") == ["yes"]


# --- finding 4: CSRF, the JSON endpoint takes JSON only --------------------------------------------


FORM_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=csrf"]
JSON_TYPES = ["application/json", "application/vnd.x+json"]


async def test_a_json_batch_runs_only_under_a_json_media_type(gateway: Client, legacy: TestServer) -> None:
    """What a cross-site form can send is 415 and runs nothing; the JSON types run."""
    body = JsonFormat.document([item("GET", "/echo/csrf")])
    accepted = []
    for ctype in FORM_TYPES:
        headers = [] if ctype is None else [("Content-Type", ctype)]
        answer = await raw_to(gateway, raw_request("POST", JSON_ENDPOINT.encode(), headers, body))
        if answer.status != 415:
            accepted.append((ctype, answer.status))
            continue
        assert answer.problem(415)["where"] == "Content-Type"
    assert accepted == []
    assert calls_to(legacy) == []
    for ctype in JSON_TYPES:
        request = raw_request("POST", JSON_ENDPOINT.encode(), [("Content-Type", ctype)], body)
        answer = await raw_to(gateway, request)
        assert answer.json()["Batch"]["items"][0]["SingleItem"]["Result"]["status"] == 200
    assert calls_to(legacy) == ["/echo/csrf", "/echo/csrf"]


# --- finding 5: CONNECT and TRACE are not batch item methods ---------------------------------------


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_connect_and_trace_items_reject_the_batch(
    fmt: Format, method: str, gateway: Client, legacy: TestServer
) -> None:
    items = [item("GET", "/echo/first"), item(method, "/echo/second")]
    assert_refused(await fmt.send(gateway, items), fmt, 1, method)
    assert calls_to(legacy) == []


# --- finding 7: hop-by-hop headers never appear in results -----------------------------------------


HOP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"X-Keep: 1\r\n"
    b"Connection: close, X-Hop\r\n"
    b"X-Hop: 1\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"Proxy-Authenticate: x\r\n"
    b"Upgrade: h2c\r\n"
    b"\r\n"
    b'b\r\n{"ok":true}\r\n0\r\n\r\n'
)
HOP_NAMES = {"connection", "x-hop", "keep-alive", "transfer-encoding", "proxy-authenticate", "upgrade"}


@asynccontextmanager
async def fixed_upstream(response: bytes) -> AsyncIterator[str]:
    """A raw TCP upstream that answers every request with `response` and closes; yields its URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def with_upstream(name: str, url: str, prefix: str) -> dict[str, Any]:
    """Config overrides: the demo routes plus `prefix` -> a new upstream `name` at `url`."""
    routes = demo_config_data("http://127.0.0.1:1", "http://127.0.0.1:2")["routes"]
    return {"upstreams": {name: {"url": url}}, "routes": [*routes, {"prefix": prefix, "upstream": name}]}


async def test_json_and_multipart_answers_drop_the_upstreams_hop_by_hop_headers(
    make_gateway: MakeGateway,
) -> None:
    async with fixed_upstream(HOP_RESPONSE) as url:
        gateway = await make_gateway(with_upstream("hops", url, "/hops"))
        seen = {}
        for fmt in (JsonFormat(), MultipartFormat()):
            sent = await fmt.send(gateway, [item("GET", "/hops/x")])
            answer = sent.items[0]
            assert answer.status == 200 and answer.body == {"ok": True}
            names = [name.lower() for name in answer.headers if name.lower() != "content-length"]
            assert HOP_NAMES.isdisjoint(names), (fmt.name, names)
            assert answer.headers.getall("X-Keep") == ["1"]
            assert answer.headers["Content-Type"] == "application/json"
            seen[fmt.name] = sorted(names)
        assert seen["json"] == seen["multipart"] == ["content-type", "x-keep"]


RFC_HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
NAMES = ["Connection", "connection", "Keep-Alive", "Transfer-Encoding", "TE", "Trailer", "Upgrade",
         "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection", "Proxy-Whatever",
         "X-Hop", "x-hop", "X-Other", "X-Keep", "Content-Type", "Cache-Control", "Set-Cookie"]
TOKENS = ["close", "keep-alive", "X-Hop", "x-HOP", "X-Other", "Upgrade", "", " "]


def expected_end_to_end(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """RFC 9110 section 7.6.1, written out independently of the gateway."""
    listed = {token.strip().lower() for name, value in pairs if name.lower() == "connection"
              for token in value.split(",")}
    return [
        (name, value) for name, value in pairs
        if name.lower() not in RFC_HOP_BY_HOP | listed and not name.lower().startswith("proxy-")
    ]


@st.composite
def upstream_headers(draw: st.DrawFn) -> list[tuple[str, str]]:
    pairs = []
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=10)):
        if name.lower() == "connection":
            value = ",".join(draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4)))
        else:
            value = draw(st.sampled_from(["1", "a b", "x=1; y"]))
        pairs.append((name, value))
    return pairs


def json_result_headers(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    document = b"".join(iter_document(ItemResult(SubResponse(200, "OK", tuple(pairs), b"")), {}))
    grouped = json.loads(document)["SingleItem"]["Result"]["headers"]
    return [(name, value) for name, values in grouped.items()
            for value in (values if isinstance(values, list) else [values])]


def multipart_part_headers(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    head = response_bytes(200, "OK", tuple(pairs), b"").decode("latin-1").split("\r\n\r\n")[0]
    lines = [line.split(": ", 1) for line in head.split("\r\n")[1:]]
    return [(name, value) for name, value in lines if name.lower() != "content-length"]


def grouped_lower(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Lowercase names, values grouped by name in first-seen order (how JSON results list them)."""
    order: dict[str, list[str]] = {}
    for name, value in pairs:
        order.setdefault(name.lower(), []).append(value)
    return [(name, value) for name, values in order.items() for value in values]


@settings(max_examples=300, deadline=None)
@given(upstream_headers())
def test_json_results_multipart_parts_and_the_proxy_share_one_hop_by_hop_rule(
    pairs: list[tuple[str, str]],
) -> None:
    expected = expected_end_to_end(pairs)
    assert json_result_headers(pairs) == grouped_lower(expected)
    assert multipart_part_headers(pairs) == expected
    assert list(end_to_end(CIMultiDict(pairs)).items()) == expected


# --- finding 8: targets that an upstream could read differently ------------------------------------


HOSTILE = {
    "fragment": "/echo/x#frag",
    "fragment hiding a query": "/echo/x#?a=1",
    "dots with ;parameters": "/echo/..;/x",
    "encoded dots with ;parameters": "/echo/%2e%2e;x/y",
    "double-encoded dots": "/echo/%252e%252e/x",
    "double-encoded slash forming dots": "/echo/a%252f..%252fb",
    "fullwidth dots": "/echo/%EF%BC%8E%EF%BC%8E/x",
    "overlong dots": "/echo/%C0%AE%C0%AE/x",
}
RAW_NON_ASCII = "/echo/\u00e9"
HARMLESS = {  # target -> the path the echo upstream decodes it to (once, as aiohttp does)
    "/echo/caf%C3%A9": "/echo/caf\u00e9",
    "/echo/a;b=1": "/echo/a;b=1",
    "/echo/%2541": "/echo/%41",
    "/echo/%252f": "/echo/%2f",
    "/echo/x%23frag": "/echo/x#frag",
}


async def assert_harmless_twins_pass(fmt: Format, gateway: Client) -> None:
    sent = await fmt.send(gateway, [item("GET", target) for target in HARMLESS])
    assert [answer.status for answer in sent.items] == [200] * len(HARMLESS)
    assert [answer.body["path"] for answer in sent.items] == list(HARMLESS.values())


@pytest.mark.parametrize("target", [pytest.param(t, id=k) for k, t in HOSTILE.items()])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_hostile_item_target_rejects_the_batch_before_any_call(
    fmt: Format, target: str, gateway: Client, legacy: TestServer
) -> None:
    """The hostile target comes last, after harmless ones: the whole batch is refused, naming it."""
    items = [*(item("GET", harmless) for harmless in HARMLESS), item("GET", target)]
    assert_refused(await fmt.send(gateway, items), fmt, len(HARMLESS))
    assert calls_to(legacy) == []
    await assert_harmless_twins_pass(fmt, gateway)


async def test_raw_non_ascii_in_a_json_operation_is_refused(gateway: Client, legacy: TestServer) -> None:
    """A multipart part cannot carry it at all (h11 refuses non-ASCII request lines); JSON can."""
    fmt = JsonFormat()
    assert_refused(await fmt.send(gateway, [item("GET", RAW_NON_ASCII)]), fmt, 0, "non-ASCII")
    assert calls_to(legacy) == []


@asynccontextmanager
async def served_like_the_cli(make_config: MakeConfig) -> AsyncIterator[int]:
    """The gateway behind `gateway serve`'s connection protocol (requests aiohttp cannot parse are
    answered by the gateway too); yields its port."""
    config = make_config()
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    assert runner.server is not None
    ConnectionGuard(config.listen.header_timeout, config.listen.max_connections, 64).install(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "target",
    [pytest.param(t.encode(), id=k) for k, t in HOSTILE.items()]
    + [pytest.param(RAW_NON_ASCII.encode("utf-8"), id="raw UTF-8")],
)
async def test_a_hostile_proxied_request_line_is_refused_before_any_call(
    target: bytes, make_config: MakeConfig, legacy: TestServer
) -> None:
    async with served_like_the_cli(make_config) as port:
        answer = await raw_exchange("127.0.0.1", port, raw_request("GET", target))
        answer.problem(400)
        assert calls_to(legacy) == []
        for harmless, path in HARMLESS.items():
            assert (await raw_exchange("127.0.0.1", port, raw_request("GET", harmless.encode()))).json()[
                "path"
            ] == path


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/echo/%E0%80%AE%E0%80%AE/x", id="3-byte overlong"),
        pytest.param("/echo/%F0%80%80%AE%F0%80%80%AE/x", id="4-byte overlong"),
        pytest.param("/echo/%25C0%25AE%25C0%25AE/x", id="double-encoded overlong"),
    ],
)
async def test_every_overlong_form_of_a_dot_segment_is_refused(
    target: str, gateway: Client, legacy: TestServer
) -> None:
    fmt = JsonFormat()
    sent = await fmt.send(gateway, [item("GET", target)])
    assert calls_to(legacy) == [], "the overlong dot segment reached the upstream"
    assert_refused(sent, fmt, 0)
