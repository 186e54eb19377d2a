"""Property tests of gateway.lean_client: random valid responses, cut into random TCP segments,
parse to exactly what was sent; random requests are read by h11 exactly as they were given."""

from __future__ import annotations

import asyncio
import itertools

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.lean_client.protocol import DONE, Connection
from gateway.lean_client.wire import CHUNKED, LAST_CHUNK, build_head, chunk

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TOKEN = st.text(alphabet=TCHAR, min_size=1, max_size=20)
VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0x7e)
VALUE = st.text(VISIBLE, max_size=40) | st.builds(lambda a, b: f"{a} {b}", TOKEN, TOKEN)
FRAMING = {"content-length", "transfer-encoding", "connection", "host"}
HEADERS = st.lists(st.tuples(TOKEN, VALUE), max_size=12).map(
    lambda pairs: [(n, v) for n, v in pairs if n.lower() not in FRAMING]
)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    status=st.integers(200, 599).filter(lambda s: s not in (204, 304)),
    reason=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20).map(str.strip),
    headers=HEADERS,
    body=st.binary(max_size=3000),
    chunked=st.booleans(),
    chunk_cuts=st.lists(st.integers(0, 3000), max_size=8),
    segment_cuts=st.lists(st.integers(0, 10_000), max_size=30),
    interim=st.booleans(),
)
def test_valid_responses_parse_to_what_was_sent(
    status: int, reason: str, headers: list[tuple[str, str]], body: bytes, chunked: bool,
    chunk_cuts: list[int], segment_cuts: list[int], interim: bool,
) -> None:
    framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(len(body)))]
    all_headers = headers + framing
    wire = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    wire += f"HTTP/1.1 {status} {reason}\r\n".encode()
    wire += b"".join(f"{n}: {v}\r\n".encode() for n, v in all_headers) + b"\r\n"
    if chunked:
        wire += b"".join(chunk(part) for part in _split(body, chunk_cuts)) + LAST_CHUNK
    else:
        wire += body
    loop = asyncio.new_event_loop()
    try:
        conn = Connection(loop, max_head_bytes=1 << 20, max_headers=100)
        conn.connection_made(_Transport())
        conn.begin(head_only=False, request_close=False)
        conn.wrote = True
        for segment in _split(wire, segment_cuts):
            conn.data_received(segment)
        assert conn.error is None
        assert conn.phase == DONE
        assert conn.status == status and conn.reason.decode() == reason
        assert [(n.decode(), v.decode()) for n, v in conn.raw_headers] == all_headers
        assert b"".join(conn.take_all()) == body
        conn.request_done = True
        assert conn.reusable()
    finally:
        loop.close()


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "X-CUSTOM"]),
    path=st.text(alphabet="abcXYZ019-._~%/?=&", max_size=30).map(lambda p: "/" + p),
    headers=HEADERS,
    body=st.none() | st.binary(max_size=2000),
    streamed=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_requests_are_read_by_h11_as_given(
    method: str, path: str, headers: list[tuple[str, str]], body: bytes | None, streamed: bool,
    cuts: list[int],
) -> None:
    streamed = streamed and body is not None
    head, length, close = build_head(
        method, path, headers, "upstream:8080", None if streamed else body, streamed
    )
    wire = head
    if streamed:
        assert body is not None and length == CHUNKED
        wire += b"".join(chunk(p) for p in _split(body, cuts)) + LAST_CHUNK
    elif body:
        wire += body
    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    assert request.method.decode() == method and request.target.decode() == path
    received = [(n.decode(), v.decode()) for n, v in request.headers.raw_items()]
    framing = [(n, v) for n, v in received if n.lower() in ("content-length", "transfer-encoding", "host")]
    assert [(n, v) for n, v in received if (n, v) not in framing] == headers
    assert ("Host", "upstream:8080") in framing
    got = b""
    while True:
        event = server.next_event()
        if isinstance(event, h11.Data):
            got += event.data
        else:
            assert isinstance(event, h11.EndOfMessage)
            break
    assert got == (body or b"")
    assert server.next_event() is h11.NEED_DATA  # nothing after the request
    assert close is False
