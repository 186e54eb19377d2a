"""Logs: one line per request and one per sub-request, with the fields operators filter on.

structlog's capture_logs records what the gateway logs while real requests and batches run over a
socket against the demo upstreams. Where the rendering matters (levels, JSON, stdlib records),
`configure_logging` writes to a buffer and the test reads the lines as an operator would.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping, Sequence
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway import access_log
from gateway.app import create_app
from gateway.connection_guard import ConnectionGuard
from gateway.log import StructlogHandler, _dumps, configure_logging
from tests.conftest import MakeConfig, MakeGateway
from tests.test_cli_ops import _uncache_gateway_loggers

Client = TestClient[web.Request, web.Application]
Logs = Sequence[MutableMapping[str, Any]]


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def logged(aiohttp_client: Any, make_config: MakeConfig) -> Callable[..., Any]:
    """A gateway whose app counts response body bytes (`access_log.install`), as `create_app`
    is to do; `install` is idempotent, so this stays right once it does."""

    async def make(overrides: dict[str, Any] | None = None) -> Client:
        app = create_app(make_config(overrides))
        access_log.install(app)
        client: Client = await aiohttp_client(app)
        return client

    return make


def access_lines(logs: Logs) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "request"]


def only_access_line(logs: Logs) -> MutableMapping[str, Any]:
    (line,) = access_lines(logs)
    return line


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client normalising the target); (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


@pytest.fixture
def json_log() -> Iterator[Callable[..., io.StringIO]]:
    """`configure_logging` into a buffer (JSON); everything it changed is put back afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access_level = logging.getLogger("aiohttp.access").level
    showwarning = warnings.showwarning
    hooks = threading.excepthook, sys.unraisablehook

    def configure(level: str = "INFO", json_output: bool = True) -> io.StringIO:
        buffer = io.StringIO()
        configure_logging(level=level, json_output=json_output, file=buffer)
        _uncache_gateway_loggers()  # module loggers first used from now on take this set-up
        return buffer

    yield configure
    structlog.configure(**saved)
    _uncache_gateway_loggers()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)
    logging.captureWarnings(False)
    warnings.showwarning = showwarning
    threading.excepthook, sys.unraisablehook = hooks


def lines_of(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Every line must be one JSON object (a traceback line would fail here)."""
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


# --- the access line -------------------------------------------------------------------------------


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
    access = only_access_line(logs)
    assert access["request_id"] == "req-42"
    assert access["batch_id"] == batch_id
    assert access["kind"] == "batch_json"
    assert access["status"] == 200
    assert access["route"] == "/batch/v1"
    assert access["status_origin"] == "gateway"  # a batch's status is the gateway's own


SECRET_QUERY = "token=s3kr1t&x=1&API_Key=zz;sig=q1&%74oken=t2&pass+word=p3&token&empty=&a=%zz&b==c"


async def test_the_access_line_names_client_agent_route_origin_and_redacts_secret_values(
    logged: Callable[..., Any],
) -> None:
    """The query as sent, but the values of secret parameters (default list; names compared
    percent-decoded and case-insensitively, `;` a separator too) are REDACTED; a malformed
    escape is shown as it came. The upstream still gets the real query."""
    gateway: Client = await logged({"logging": {"redact_query_params": [
        "token", "api_key", "sig", "pass word",
    ]}})
    request = (f"GET /echo/a?{SECRET_QUERY} HTTP/1.1\r\nHost: g\r\nUser-Agent: probe/1.0 (x)\r\n"
               "Connection: close\r\n\r\n").encode()
    assert gateway.port is not None
    with capture_logs() as logs:
        status, _, body = await raw_exchange(gateway.port, request)
    assert status == 200
    assert json.loads(body)["raw_query"] == SECRET_QUERY
    line = only_access_line(logs)
    assert line["query"] == ("token=REDACTED&x=1&API_Key=REDACTED;sig=REDACTED&%74oken=REDACTED"
                             "&pass+word=REDACTED&token&empty=&a=%zz&b==c")
    for secret in ("s3kr1t", "zz;", "q1", "t2", "p3"):  # none could be part of a hex request id
        assert secret not in json.dumps(line)
    assert line["path"] == "/echo/a"
    assert line["client"] == "127.0.0.1"
    assert line["user_agent"] == "probe/1.0 (x)"
    assert line["route"] == "/echo"
    assert (line["kind"], line["upstream"]) == ("proxy", "legacy")
    assert (line["status"], line["status_origin"]) == (200, "upstream")


async def test_the_redacted_names_are_the_configured_ones(logged: Callable[..., Any]) -> None:
    gateway: Client = await logged({"logging": {"redact_query_params": ["Session"]}})
    with capture_logs() as logs:
        async with gateway.get("/echo/a?SESSION=s3cr3t&token=visible") as response:
            assert response.status == 200
    assert only_access_line(logs)["query"] == "SESSION=REDACTED&token=visible"


@pytest.mark.parametrize(("raw", "shown"), [
    ("", ""),
    ("a=1", "a=1"),
    ("token=1", "token=REDACTED"),
    ("TOKEN=1&Token=2", "TOKEN=REDACTED&Token=REDACTED"),
    ("to%6Ben=1", "to%6Ben=REDACTED"),
    ("token=a=b", "token=REDACTED"),
    ("token", "token"),  # no value, nothing to hide
    ("&&;=&token=1&", "&&;=&token=REDACTED&"),
    ("%=%&%zz=1&\udcff=1&token=%E0%A4%A", "%=%&%zz=1&\udcff=1&token=REDACTED"),
    ("x=%20token&token%00=1", "x=%20token&token%00=1"),
])
def test_redact_query_keeps_the_raw_form_and_never_fails(raw: str, shown: str) -> None:
    assert access_log.redact_query(raw, frozenset({"token"})) == shown


async def test_a_rejected_request_is_one_access_line_carrying_the_error(gateway: Client) -> None:
    with capture_logs() as logs:
        async with gateway.post("/batch/v1", data=b"{}", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
            request_id = r.headers["X-Request-ID"]
        async with gateway.get("/nowhere?token=t") as r:
            assert r.status == 404
    assert [entry["event"] for entry in logs] == ["request", "request"], logs
    unsupported, unrouted = logs
    assert unsupported["request_id"] == request_id
    assert (unsupported["log_level"], unsupported["error"]) == ("warning", "UnsupportedMediaType")
    assert "application/json" in unsupported["detail"]
    assert (unsupported["status"], unsupported["status_origin"]) == (415, "gateway")
    assert unrouted["status"] == 404 and unrouted["error"] and unrouted["detail"]
    assert (unrouted["route"], unrouted["query"]) == ("", "token=REDACTED")


# --- bytes in and out --------------------------------------------------------------------------------


async def test_bytes_of_a_streamed_proxied_body_and_of_the_relayed_answers(
    logged: Callable[..., Any],
) -> None:
    """A chunked body over proxy.buffer_bytes is streamed to the upstream: bytes_in is its size
    (de-chunked). bytes_out is the body relayed (no headers, no chunk framing), both for an
    upstream answer with Content-Length and for one of unknown length."""
    gateway: Client = await logged({"proxy": {"buffer_bytes": 1024}})
    payload = bytes(range(256)) * 1200  # 307,200 bytes

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 10_000):
            yield payload[start:start + 10_000]

    with capture_logs() as logs:
        async with gateway.post("/echo/up", data=chunks()) as response:
            assert response.status == 200
            echoed = await response.read()
        async with gateway.get("/legacy/bytes/200000") as response:
            downloaded = await response.read()
            assert response.headers.get("Content-Length") == "200000"
    assert base64.b64decode(json.loads(echoed)["body_b64"]) == payload  # streamed intact
    upload, download = access_lines(logs)
    assert (upload["bytes_in"], upload["bytes_out"]) == (len(payload), len(echoed))
    assert len(downloaded) == 200_000
    assert (download["bytes_in"], download["bytes_out"]) == (0, 200_000)


async def test_bytes_out_of_an_upstream_answer_relayed_chunked(
    aiohttp_server: Any, aiohttp_client: Any, make_config: MakeConfig,
) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for size in (1, 70_000, 3):
            await response.write(b"z" * size)
        await response.write_eof()
        return response

    upstream_app = web.Application()
    upstream_app.router.add_get("/c", chunked)
    upstream = await aiohttp_server(upstream_app)
    config = make_config({
        "upstreams": {"chunky": {"url": str(upstream.make_url("")).rstrip("/")}},
        "routes": [{"prefix": "/c", "upstream": "chunky"}],
    })
    app = create_app(config)
    access_log.install(app)
    gateway: Client = await aiohttp_client(app)
    with capture_logs() as logs:
        async with gateway.get("/c") as response:
            assert response.headers.get("Transfer-Encoding") == "chunked"
            body = await response.read()
    assert len(body) == 70_004
    line = only_access_line(logs)
    assert (line["bytes_out"], line["status_origin"], line["route"]) == (70_004, "upstream", "/c")


async def test_bytes_of_a_batch_body_and_of_its_plain_and_chunked_answers(
    logged: Callable[..., Any],
) -> None:
    gateway: Client = await logged()
    small = json.dumps({"SingleItem": {"method": "GET", "operation": "/echo/s"}}).encode()
    big = json.dumps({"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": "POST", "operation": f"/echo/{n}", "body": {"pad": "p" * 40_000}}}
        for n in range(3)
    ]}}).encode()
    headers = {"Content-Type": "application/json"}
    with capture_logs() as logs:
        async with gateway.post("/batch/v1", data=small, headers=headers) as response:
            assert "Content-Length" in response.headers  # a plain web.Response
            small_answer = await response.read()
        async with gateway.post("/batch/v1", data=big, headers=headers) as response:
            assert response.headers.get("Transfer-Encoding") == "chunked"  # streamed as encoded
            big_answer = await response.read()
    first, second = access_lines(logs)
    assert (first["bytes_in"], first["bytes_out"]) == (len(small), len(small_answer))
    assert (second["bytes_in"], second["bytes_out"]) == (len(big), len(big_answer))
    assert len(big_answer) > 100_000


async def test_bytes_out_of_the_gateways_own_answers_and_of_head(logged: Callable[..., Any]) -> None:
    gateway: Client = await logged()
    with capture_logs() as logs:
        async with gateway.get("/_gateway/healthz") as response:
            body = await response.read()
        async with gateway.head("/_gateway/healthz") as response:
            assert response.status == 200
        async with gateway.head("/echo/h") as response:
            assert response.status == 200
    get, head, proxied_head = access_lines(logs)
    assert (get["bytes_out"], get["route"], get["kind"]) == (len(body), "/_gateway/healthz", "gateway")
    assert head["bytes_out"] == 0 and proxied_head["bytes_out"] == 0


async def test_without_the_counter_a_streamed_answer_has_no_made_up_size(gateway: Client) -> None:
    """Not `body_length`: that counts headers and chunk framing. Unknown is null."""
    with capture_logs() as logs:
        async with gateway.get("/legacy/bytes/1000") as response:
            await response.read()
        async with gateway.get("/_gateway/healthz") as response:
            body = await response.read()
    streamed, plain = access_lines(logs)
    assert streamed["bytes_out"] == 1000
    assert plain["bytes_out"] == len(body)


async def test_create_app_counts_response_body_bytes(gateway: Client) -> None:
    with capture_logs() as logs:
        async with gateway.get("/legacy/bytes/1000") as response:
            await response.read()
    assert only_access_line(logs)["bytes_out"] == 1000


async def test_an_unexpected_exception_is_one_error_line_with_its_traceback(
    gateway: Client, json_log: Callable[..., io.StringIO], monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffer = json_log("INFO")

    def broken(raw_path: str) -> None:
        raise RuntimeError("an unexpected bug")

    monkeypatch.setattr("gateway.proxy.parse_target", broken)
    async with gateway.get("/echo/x") as response:
        assert response.status == 500
        assert "unexpected bug" not in await response.text()
    (line,) = lines_of(buffer)
    assert (line["event"], line["level"], line["status"]) == ("request", "error", 500)
    assert "RuntimeError: an unexpected bug" in line["exception"]


# --- levels and rendering ------------------------------------------------------------------------------


BATCH_OF_TWO = {"Batch": {"batch_execution_type": "Serial", "items": [
    {"SingleItem": {"method": "GET", "operation": "/echo/a"}},
    {"SingleItem": {"method": "GET", "operation": "/echo/b"}},
]}}


@pytest.mark.parametrize(("subrequest_level", "log_level", "lines"), [
    ("info", "INFO", 2),
    ("debug", "INFO", 0),
    ("debug", "DEBUG", 2),
    ("off", "DEBUG", 0),
    ("warning", "WARNING", 2),
])
async def test_the_subrequest_line_level_is_configurable(
    make_gateway: MakeGateway, json_log: Callable[..., io.StringIO],
    subrequest_level: str, log_level: str, lines: int,
) -> None:
    buffer = json_log(log_level)
    gateway = await make_gateway({"logging": {"subrequest_level": subrequest_level}})
    async with gateway.post("/batch/v1", json=BATCH_OF_TWO) as response:
        assert response.status == 200
    logged = lines_of(buffer)
    subrequests = [entry for entry in logged if entry["event"] == "subrequest"]
    assert len(subrequests) == lines
    assert all(entry["level"] == subrequest_level for entry in subrequests)
    if log_level != "WARNING":
        assert [entry["kind"] for entry in logged if entry["event"] == "request"] == ["batch_json"]


def test_a_stdlib_exception_is_one_json_line_with_the_traceback_in_a_field(
    json_log: Callable[..., io.StringIO],
) -> None:
    buffer = json_log("INFO")
    missing: dict[str, int] = {}
    try:
        missing["missing"]
    except KeyError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "10.0.0.1")
    text = buffer.getvalue()
    assert text.count("\n") == 1
    (line,) = lines_of(buffer)
    assert line["event"] == "Error handling request from 10.0.0.1"
    assert (line["logger"], line["level"]) == ("aiohttp.server", "error")
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing'" in line["exception"]
    assert line["timestamp"].endswith("Z")


def test_stdlib_levels_warnings_and_the_quiet_access_logger(json_log: Callable[..., io.StringIO]) -> None:
    buffer = json_log("INFO")
    logging.getLogger("aiohttp.web").debug("hidden at INFO")
    logging.getLogger("aiohttp.access").info("aiohttp's own access line: the gateway writes its own")
    logging.getLogger("aiohttp.web").info("shown at INFO")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old\nAPI", DeprecationWarning, stacklevel=1)
    shown, warned = lines_of(buffer)
    assert (shown["event"], shown["logger"], shown["level"]) == ("shown at INFO", "aiohttp.web", "info")
    assert warned["logger"] == "py.warnings" and "DeprecationWarning: an old\nAPI" in warned["event"]


def test_configuring_again_replaces_the_handler(json_log: Callable[..., io.StringIO]) -> None:
    json_log("INFO")
    second = json_log("WARNING")
    ours = [h for h in logging.getLogger().handlers if isinstance(h, StructlogHandler)]
    assert len(ours) == 1
    logging.getLogger("x").info("below WARNING")
    structlog.get_logger().info("below WARNING too")
    logging.getLogger("x").warning("kept")
    assert [line["event"] for line in lines_of(second)] == ["kept"]


def test_on_a_console_stdlib_records_use_the_console_renderer(json_log: Callable[..., io.StringIO]) -> None:
    buffer = json_log("INFO", json_output=False)
    logging.getLogger("aiohttp.web").warning("console %s", "line")
    text = buffer.getvalue()
    assert "console line" in text and "warn" in text and not text.startswith("{")


async def test_an_asyncio_error_is_one_json_line(json_log: Callable[..., io.StringIO]) -> None:
    buffer = json_log("INFO")

    def fail() -> None:
        raise RuntimeError("in a callback")

    asyncio.get_running_loop().call_soon(fail)
    await asyncio.sleep(0.01)
    (line,) = lines_of(buffer)
    assert line["logger"] == "asyncio" and line["level"] == "error"
    assert "RuntimeError: in a callback" in line["exception"]


async def test_an_exception_in_aiohttps_server_machinery_is_one_json_line(
    json_log: Callable[..., io.StringIO], aiohttp_raw_server: Any,
) -> None:
    """A plain aiohttp server whose handler raises: aiohttp logs "Error handling request" with
    the exception; it comes out as one JSON line, the traceback in `exception`."""
    buffer = json_log("INFO")

    async def broken(request: web.BaseRequest) -> web.StreamResponse:
        raise ValueError("inside the server")

    server: RawTestServer = await aiohttp_raw_server(broken)
    async with aiohttp.ClientSession() as session, session.get(server.make_url("/x")) as response:
        assert response.status == 500
    (line,) = lines_of(buffer)
    assert line["logger"] == "aiohttp.server" and line["event"].startswith("Error handling request")
    assert "ValueError: inside the server" in line["exception"]


async def test_a_failure_the_guarded_server_answers_is_one_line_with_the_traceback(
    json_log: Callable[..., io.StringIO],
) -> None:
    """Behind the ConnectionGuard (as `gateway serve` runs): one `request_failed` line with the
    request's method and path and the traceback in a field; no aiohttp line besides it."""
    buffer = json_log("INFO")

    async def broken(request: web.BaseRequest) -> web.StreamResponse:
        raise ValueError("escaped the app")

    protocol_errors: list[int] = []
    runner = web.ServerRunner(web.Server(broken))
    await runner.setup()
    assert runner.server is not None
    ConnectionGuard(5.0, 100, 16, on_protocol_error=protocol_errors.append).install(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        status, headers, body = await raw_exchange(
            port, b"GET /boom?token=x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
    finally:
        await runner.cleanup()
    assert status == 500 and headers["content-type"] == "application/problem+json"
    assert protocol_errors == [500]
    (line,) = lines_of(buffer)
    assert line["event"] == "request_failed" and line["request_id"] == headers["x-request-id"]
    assert line["level"] == "error"
    assert (line["status"], line["method"], line["path"]) == (500, "GET", "/boom")
    assert line["client"] == "127.0.0.1"
    assert "ValueError: escaped the app" in line["exception"]
    assert "escaped the app" not in body.decode()  # the client is told nothing internal


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(), _JSON_VALUES, max_size=8))
def test_a_log_line_is_ascii_json_that_reads_back_as_the_event(event: dict[str, Any]) -> None:
    """The orjson renderer keeps what the json module guaranteed: one ASCII line (any stdout
    encoding takes it, a control character or U+2028 cannot break it), the same values back,
    ints of any size."""
    line = _dumps(event)
    assert line.isascii() and "\n" not in line and "\r" not in line
    assert json.loads(line) == event


def test_a_value_json_cannot_encode_is_shown_by_its_repr() -> None:
    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    assert json.loads(_dumps({"value": Odd(), "when": (1, 2)})) == {"value": "<odd>", "when": [1, 2]}
