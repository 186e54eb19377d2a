"""The multipart/mixed batch codec (seed 003; SPEC sections 3, 4 and 7), sans-I/O.

Requests are built, and responses read, with Python's `email` package and h11: the codec is checked
against independent MIME and HTTP/1.1 implementations, not only against itself.
"""

from __future__ import annotations

import json
import string
from email import encoders, policy
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.parser import BytesParser

import h11
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.errors import (
    ClientError,
    ForbiddenTarget,
    HeadersTooLarge,
    MalformedBatch,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from gateway.formats.multipart_batch import MultipartBatchCodec
from gateway.model import (
    Batch,
    BatchLimits,
    BatchReport,
    BatchResult,
    CallFailure,
    ExecutionMode,
    ItemResult,
    RollbackStatus,
    Skipped,
    SubRequest,
    SubResponse,
)

CODEC = MultipartBatchCodec()
ALL_BYTES = bytes(range(256))


# -- test-side builders and readers ---------------------------------------------------------


def mime_batch(
    *requests: bytes, content_ids: tuple[str | None, ...] = (), lf_only: bool = False
) -> tuple[bytes, str]:
    """A batch built by the `email` package: (body, Content-Type header value)."""
    outer = MIMEMultipart("mixed", boundary="batch_foobarbaz")
    ids = content_ids or (None,) * len(requests)
    for request, content_id in zip(requests, ids, strict=True):
        part = MIMEApplication(request, "http", _encoder=encoders.encode_noop)
        if content_id is not None:
            part["Content-ID"] = f"<{content_id}>"
        outer.attach(part)
    whole = outer.as_bytes(policy=policy.compat32 if lf_only else policy.HTTP)
    blank = b"\n\n" if lf_only else b"\r\n\r\n"
    return whole.split(blank, 1)[1], str(outer["Content-Type"])


def raw_part(http: bytes, content_id: str | None = None, eol: bytes = b"\r\n") -> bytes:
    head = b"Content-Type: application/http" + eol
    if content_id is not None:
        head += b"Content-ID: <" + content_id.encode() + b">" + eol
    return head + eol + http


def raw_batch(
    parts: list[bytes],
    boundary: bytes = b"b1",
    eol: bytes = b"\r\n",
    preamble: bytes = b"",
    epilogue: bytes = b"",
    padding: bytes = b"",
) -> bytes:
    """RFC 2046 framing by hand; the line break before a delimiter belongs to the delimiter."""
    dash = b"--" + boundary
    body = preamble + eol if preamble else b""
    body += b"".join(dash + padding + eol + part + eol for part in parts)
    return body + dash + b"--" + padding + (eol + epilogue if epilogue else b"")


def email_parts(body: bytes, content_type: str) -> list[Message]:
    """Read a multipart body with the `email` parser."""
    message = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert message.is_multipart()
    assert not message.defects
    parts = message.get_payload()
    assert isinstance(parts, list)
    return [part for part in parts if isinstance(part, Message)]


def part_bytes(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def read_http_response(data: bytes) -> tuple[h11.Response, bytes]:
    """Parse one HTTP/1.1 response with h11 in the client role; it must be exactly framed."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "test")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += event.data
    assert conn.trailing_data == (b"", True)
    return response, body


def report(*items: ItemResult) -> BatchReport:
    return BatchReport(root=BatchResult(ExecutionMode.SERIAL, items), batch_id="b-1")


# -- decoding -----------------------------------------------------------------------------------


GET_PONY = b"GET /farm/v1/animals/pony HTTP/1.1\r\n\r\n"
DOLLY = b'{"name": "Dolly"}'
PUT_SHEEP = (
    b"PUT /farm/v1/animals/sheep?fields=name HTTP/1.1\r\n"
    b'Content-Type: application/json\r\nIf-Match: "etag/sheep"\r\nContent-Length: 17\r\n\r\n'
    + DOLLY
)


def test_a_batch_built_by_email_decodes_to_one_subrequest_per_part_in_order():
    body, content_type = mime_batch(GET_PONY, PUT_SHEEP, content_ids=("item1", "item2@farm"))

    batch = CODEC.decode(body, content_type)

    assert batch == Batch(
        mode=ExecutionMode.SERIAL,
        where="/",
        items=(
            SubRequest("GET", "/farm/v1/animals/pony", (), None, "part 1", "item1"),
            SubRequest(
                "PUT",
                "/farm/v1/animals/sheep?fields=name",
                (
                    ("Content-Type", "application/json"),
                    ("If-Match", '"etag/sheep"'),
                    ("Content-Length", "17"),
                ),
                DOLLY,
                "part 2",
                "item2@farm",
            ),
        ),
    )


def test_lf_only_input_is_tolerated():
    lf_put = PUT_SHEEP.replace(b"\r\n", b"\n")
    body, content_type = mime_batch(GET_PONY.replace(b"\r\n", b"\n"), lf_put, lf_only=True)
    assert b"\r" not in body

    batch = CODEC.decode(body, content_type)

    assert [(item.method, item.body) for item in batch.items] == [  # type: ignore[union-attr]
        ("GET", None),
        ("PUT", DOLLY),
    ]


def test_the_execution_mode_is_passed_through():
    body, content_type = mime_batch(GET_PONY)
    batch = CODEC.decode(body, content_type, ExecutionMode.UNORDERED)
    assert batch.mode is ExecutionMode.UNORDERED


@pytest.mark.parametrize(
    "content_type",
    [
        'multipart/mixed; boundary="b1"',
        "multipart/mixed; boundary=b1",
        "Multipart/MIXED;charset=utf-8;BOUNDARY=b1; ",
        'multipart/mixed ; foo="x;y\\"z" ; boundary = "b1"',
    ],
)
def test_the_boundary_parameter_may_be_quoted_or_a_token(content_type):
    batch = CODEC.decode(raw_batch([raw_part(GET_PONY)]), content_type)
    assert len(batch.items) == 1


def test_a_quoted_boundary_may_hold_rfc2046_specials_and_inner_spaces():
    boundary = "=_Part 7:(a)+b,c.d/e?f'"
    body = raw_batch([raw_part(GET_PONY)], boundary=boundary.encode())
    batch = CODEC.decode(body, f'multipart/mixed; boundary="{boundary}"')
    assert len(batch.items) == 1


VALID_PARTS = [raw_part(GET_PONY, "1"), raw_part(PUT_SHEEP)]
EXPECTED = CODEC.decode(raw_batch(VALID_PARTS), "multipart/mixed; boundary=b1")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(raw_batch(VALID_PARTS), id="whole"),
        pytest.param(raw_batch(VALID_PARTS) + b"\r\n", id="final-crlf"),
        pytest.param(raw_batch(VALID_PARTS, preamble=b"This is a preamble."), id="preamble"),
        pytest.param(raw_batch(VALID_PARTS, preamble=b"--b1x\r\n--b1 x"), id="boundary-like"),
        pytest.param(raw_batch(VALID_PARTS, epilogue=b"trailing junk\r\n"), id="epilogue"),
        pytest.param(
            raw_batch(VALID_PARTS, epilogue=b"--b1\r\n" + raw_part(GET_PONY) + b"\r\n--b1--"),
            id="part-after-close",
        ),
        pytest.param(raw_batch(VALID_PARTS, padding=b" \t "), id="transport-padding"),
        pytest.param(
            raw_batch([p.replace(b"\r\n", b"\n") for p in VALID_PARTS], eol=b"\n", preamble=b"pre"),
            id="lf-only",
        ),
    ],
)
def test_a_valid_batch_decodes_the_same_whatever_surrounds_it(body):
    assert CODEC.decode(body, "multipart/mixed; boundary=b1") == EXPECTED


def test_a_line_that_only_starts_with_the_boundary_is_part_of_the_body():
    payload = b"x\r\n--b1x\r\n--b1 y\r\n--b1--z"
    http = b"POST /upload HTTP/1.1\r\n\r\n" + payload
    batch = CODEC.decode(raw_batch([raw_part(http)]), "multipart/mixed; boundary=b1")
    assert batch.items[0].body == payload  # type: ignore[union-attr]


def test_binary_bodies_pass_byte_exact_and_agree_with_the_email_parser():
    framed = b"POST /blob HTTP/1.1\r\nContent-Length: 256\r\n\r\n" + ALL_BYTES
    unframed = b"POST /blob HTTP/1.1\r\n\r\n" + ALL_BYTES
    body = raw_batch([raw_part(framed), raw_part(unframed)])

    batch = CODEC.decode(body, "multipart/mixed; boundary=b1")

    assert [item.body for item in batch.items] == [ALL_BYTES, ALL_BYTES]  # type: ignore[union-attr]
    parsed = email_parts(body, "multipart/mixed; boundary=b1")
    assert [part_bytes(part) for part in parsed] == [framed, unframed]


@pytest.mark.parametrize(
    ("http", "body"),
    [
        pytest.param(b"DELETE /a/1 HTTP/1.1\r\n\r\n", None, id="no-body"),
        pytest.param(b"DELETE /a/1 HTTP/1.1\r\n", None, id="head-ends-at-part-end"),
        pytest.param(b"DELETE /a/1 HTTP/1.1", None, id="request-line-only"),
        pytest.param(b"POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n", None, id="length-0"),
        pytest.param(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\r\n\r\n", b"abc", id="cl"),
        pytest.param(
            b"POST /a HTTP/1.1\r\n\r\nthe rest\r\nof it\r\n",
            b"the rest\r\nof it\r\n",
            id="rest-of-part",
        ),
        pytest.param(
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"Wikipedia",
            id="chunked",
        ),
        pytest.param(b"PATCH /a HTTP/1.0\r\n\r\n{}", b"{}", id="http-1.0"),
    ],
)
def test_part_bodies_are_framed_by_content_length_chunked_or_the_rest_of_the_part(http, body):
    batch = CODEC.decode(raw_batch([raw_part(http)]), "multipart/mixed; boundary=b1")
    assert batch.items[0].body == body  # type: ignore[union-attr]


def test_a_missing_host_is_accepted_and_a_sent_host_is_kept():
    without = b"GET /a HTTP/1.1\r\nAccept: */*\r\n\r\n"
    with_host = b"GET /b HTTP/1.1\r\nhOsT: upstream.test\r\nAccept: */*\r\n\r\n"
    batch = CODEC.decode(
        raw_batch([raw_part(without), raw_part(with_host)]), "multipart/mixed; boundary=b1"
    )
    assert [item.headers for item in batch.items] == [  # type: ignore[union-attr]
        (("Accept", "*/*"),),
        (("hOsT", "upstream.test"), ("Accept", "*/*")),
    ]


def test_headers_keep_order_casing_repeats_and_the_method_as_sent():
    http = b"purge /a HTTP/1.1\r\nX-B: 1\r\nx-a: \xe9t\xe9\r\nX-B: 2\r\n\r\n"
    item = CODEC.decode(raw_batch([raw_part(http)]), "multipart/mixed; boundary=b1").items[0]
    assert item == SubRequest(
        "purge", "/a", (("X-B", "1"), ("x-a", "\xe9t\xe9"), ("X-B", "2")), None, "part 1"
    )


def test_part_headers_other_than_content_type_and_content_id_are_ignored():
    part = (
        b"content-type: Application/HTTP; msgtype=request\r\nContent-Transfer-Encoding: binary\r\n"
        b"X-Folded: a\r\n  b\r\nContent-ID: plain-id\r\n\r\n" + GET_PONY
    )
    item = CODEC.decode(raw_batch([part]), "multipart/mixed; boundary=b1").items[0]
    assert item.content_id == "plain-id"  # type: ignore[union-attr]


# -- rejections ---------------------------------------------------------------------------------

B1 = "multipart/mixed; boundary=b1"
SMALL = BatchLimits(max_body_bytes=2000, max_items=2, max_part_headers=3, max_part_header_bytes=200)


def one(http: bytes) -> bytes:
    return raw_batch([raw_part(http)])


def second(http: bytes) -> bytes:
    return raw_batch([raw_part(GET_PONY), raw_part(http)])


# fmt: off
REJECTIONS: list[tuple[str, bytes, str, BatchLimits, type[ClientError], int, str]] = [
    # the outer Content-Type
    ("json", one(GET_PONY), "application/json", SMALL, UnsupportedMediaType, 415, "Content-Type"),
    ("related", one(GET_PONY), "multipart/related; boundary=b1", SMALL, UnsupportedMediaType, 415,
     "Content-Type"),
    ("no-boundary", one(GET_PONY), "multipart/mixed", SMALL, MalformedBatch, 400, "Content-Type"),
    ("empty-boundary", one(GET_PONY), 'multipart/mixed; boundary=""', SMALL, MalformedBatch, 400,
     "Content-Type"),
    ("boundary-71", one(GET_PONY), "multipart/mixed; boundary=" + "b" * 71, SMALL, MalformedBatch,
     400, "Content-Type"),
    ("boundary-space-end", one(GET_PONY), 'multipart/mixed; boundary="b1 "', SMALL, MalformedBatch,
     400, "Content-Type"),
    ("boundary-bad-char", one(GET_PONY), 'multipart/mixed; boundary="b<1>"', SMALL,
     MalformedBatch, 400, "Content-Type"),
    ("bad-params", one(GET_PONY), "multipart/mixed; boundary", SMALL, MalformedBatch, 400,
     "Content-Type"),
    ("two-boundaries", one(GET_PONY), "multipart/mixed; boundary=b1; boundary=b2", SMALL,
     MalformedBatch, 400, "Content-Type"),
    # the batch as a whole
    ("too-large", one(b"POST / HTTP/1.1\r\n\r\n" + b"x" * 2000), B1, SMALL, PayloadTooLarge, 413,
     "body"),
    ("too-many-parts", raw_batch([raw_part(GET_PONY)] * 3), B1, SMALL, PayloadTooLarge, 413,
     "part 3"),
    ("no-delimiter", b"just text", B1, SMALL, MalformedBatch, 400, "body"),
    ("other-boundary", one(GET_PONY), "multipart/mixed; boundary=b2", SMALL, MalformedBatch, 400,
     "body"),
    ("no-close", one(GET_PONY)[: -len(b"--b1--")], B1, SMALL, MalformedBatch, 400, "body"),
    ("ends-on-delimiter", b"--b1", B1, SMALL, MalformedBatch, 400, "body"),
    ("zero-parts", b"--b1--\r\n", B1, SMALL, MalformedBatch, 400, "body"),
    # part headers
    ("no-blank-line", b"--b1\r\nContent-Type: application/http\r\n--b1--", B1, SMALL,
     MalformedBatch, 400, "part 1"),
    ("no-part-headers", raw_batch([GET_PONY]), B1, SMALL, MalformedBatch, 400, "part 1"),
    ("no-part-content-type", raw_batch([b"Content-ID: <1>\r\n\r\n" + GET_PONY]), B1, SMALL,
     MalformedBatch, 400, "part 1"),
    ("text-plain", raw_batch([b"Content-Type: text/plain\r\n\r\n" + GET_PONY]), B1, SMALL,
     UnsupportedMediaType, 415, "part 1"),
    ("second-part", raw_batch([raw_part(GET_PONY), b"Content-Type: message/http\r\n\r\n"]), B1,
     SMALL, UnsupportedMediaType, 415, "part 2"),
    ("two-content-types", raw_batch([b"Content-Type: application/http\r\n" + raw_part(GET_PONY)]),
     B1, SMALL, MalformedBatch, 400, "part 1"),
    ("empty-content-id", raw_batch([raw_part(GET_PONY, "")]), B1, SMALL, MalformedBatch, 400,
     "part 1"),
    ("header-no-colon", raw_batch([b"Content-Type: application/http\r\nbogus\r\n\r\n" + GET_PONY]),
     B1, SMALL, MalformedBatch, 400, "part 1"),
    ("too-many-part-headers", raw_batch([b"A: 1\r\nB: 2\r\nC: 3\r\n" + raw_part(GET_PONY)]), B1,
     SMALL, HeadersTooLarge, 431, "part 1"),
    ("part-header-bytes", raw_batch([b"A: " + b"x" * 200 + b"\r\n" + raw_part(GET_PONY)]), B1,
     SMALL, HeadersTooLarge, 431, "part 1"),
    # the embedded request
    ("empty-request", raw_batch([raw_part(b"")]), B1, SMALL, MalformedBatch, 400, "part 1"),
    ("blank-before-request", one(b"\r\n" + GET_PONY), B1, SMALL, MalformedBatch, 400, "part 1"),
    ("absolute-form", second(b"GET http://evil.test/x HTTP/1.1\r\n\r\n"), B1, SMALL,
     ForbiddenTarget, 400, "part 2"),
    ("authority-form", one(b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n"), B1, SMALL, ForbiddenTarget,
     400, "part 1"),
    ("asterisk-form", one(b"OPTIONS * HTTP/1.1\r\n\r\n"), B1, SMALL, ForbiddenTarget, 400,
     "part 1"),
    ("scheme-relative", one(b"GET //evil.test/x HTTP/1.1\r\n\r\n"), B1, SMALL, ForbiddenTarget,
     400, "part 1"),
    ("http-2", one(b"GET / HTTP/2.0\r\n\r\n"), B1, SMALL, MalformedBatch, 400, "part 1"),
    ("http-0.9", one(b"GET /\r\n\r\n"), B1, SMALL, MalformedBatch, 400, "part 1"),
    ("space-in-target", one(b"GET /a b HTTP/1.1\r\n\r\n"), B1, SMALL, MalformedBatch, 400,
     "part 1"),
    ("bad-header-name", one(b"GET / HTTP/1.1\r\nX A: b\r\n\r\n"), B1, SMALL, MalformedBatch, 400,
     "part 1"),
    ("space-before-colon", one(b"GET / HTTP/1.1\r\nX-A : b\r\n\r\n"), B1, SMALL, MalformedBatch,
     400, "part 1"),
    ("nul-in-value", one(b"GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n"), B1, SMALL, MalformedBatch, 400,
     "part 1"),
    ("bare-cr-in-value", one(b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n"), B1, SMALL, MalformedBatch,
     400, "part 1"),
    ("two-hosts", one(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), B1, SMALL, MalformedBatch,
     400, "part 1"),
    ("te-and-cl", one(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n"
                      b"\r\n0\r\n\r\n"), B1, SMALL, MalformedBatch, 400, "part 1"),
    ("te-gzip", one(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nx"), B1, SMALL,
     MalformedBatch, 400, "part 1"),
    ("bad-chunk", one(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), B1, SMALL,
     MalformedBatch, 400, "part 1"),
    ("short-chunked", one(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"), B1,
     SMALL, MalformedBatch, 400, "part 1"),
    ("bad-content-length", one(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), B1, SMALL,
     MalformedBatch, 400, "part 1"),
    ("two-lengths", one(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
     B1, SMALL, MalformedBatch, 400, "part 1"),
    ("short-body", one(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc"), B1, SMALL,
     MalformedBatch, 400, "part 1"),
    ("bytes-after-body", one(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\r\nd"), B1, SMALL,
     MalformedBatch, 400, "part 1"),
    ("too-many-request-headers", one(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n"), B1,
     SMALL, HeadersTooLarge, 431, "part 1"),
    ("request-head-bytes", one(b"GET / HTTP/1.1\r\nA: " + b"x" * 200 + b"\r\n\r\n"), B1, SMALL,
     HeadersTooLarge, 431, "part 1"),
]
# fmt: on


@pytest.mark.parametrize(
    ("body", "content_type", "limits", "error", "status", "where"),
    [pytest.param(*row[1:], id=row[0]) for row in REJECTIONS],
)
def test_every_problem_rejects_the_batch_naming_where(
    body, content_type, limits, error, status, where
):
    with pytest.raises(error) as caught:
        MultipartBatchCodec(limits).decode(body, content_type)
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.where == where


def test_too_many_parts_says_the_maximum():
    with pytest.raises(PayloadTooLarge) as caught:
        MultipartBatchCodec(SMALL).decode(raw_batch([raw_part(GET_PONY)] * 3), B1)
    assert caught.value.detail == "Too many parts. Maximum number of parts is 2."


def test_every_truncation_before_the_close_delimiter_is_rejected():
    body = raw_batch(VALID_PARTS, preamble=b"pre")
    for end in range(len(body)):
        with pytest.raises(MalformedBatch):
            CODEC.decode(body[:end], B1)
    assert CODEC.decode(body, B1) == EXPECTED


# -- encoding -----------------------------------------------------------------------------------


def test_encode_answers_one_application_http_part_per_item_readable_by_email_and_h11():
    created = SubResponse(
        201,
        "Created",
        (
            ("Location", "/farm/v1/animals/sheep"),
            ("Connection", "close, X-Private"),
            ("X-Private", "hop"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Authenticate", "Basic"),
            ("Content-Length", "999"),
            ("Content-Type", "application/octet-stream"),
        ),
        ALL_BYTES,
    )
    items = (
        ItemResult(created, RollbackStatus.ROLLED_BACK, "undone by\r\nDELETE"),
        ItemResult(CallFailure(504, "timed out after 5 s")),
        ItemResult(Skipped("part 2 failed"), RollbackStatus.SKIPPED),
        ItemResult(SubResponse(299, headers=(("X-A", "1"),))),
    )

    body, content_type = CODEC.encode(report(*items), content_ids=("1", None, "x@y", None))

    assert content_type.startswith("multipart/mixed; boundary=batch_")
    parts = email_parts(body, content_type)
    assert [part.get_content_type() for part in parts] == ["application/http"] * 4
    assert [part["Content-ID"] for part in parts] == ["<response-1>", None, "<response-x@y>", None]
    assert [part["X-Batch-Item-Status"] for part in parts] == ["rolled_back", None, "skipped", None]
    assert parts[0]["X-Batch-Item-Detail"] == "undone by  DELETE"
    responses = [read_http_response(part_bytes(part)) for part in parts]

    first, first_body = responses[0]
    assert (first.status_code, first.reason) == (201, b"Created")
    assert first.headers.raw_items() == [
        (b"Location", b"/farm/v1/animals/sheep"),
        (b"Content-Type", b"application/octet-stream"),
        (b"Content-Length", b"256"),
    ]
    assert first_body == ALL_BYTES
    assert (responses[1][0].status_code, responses[1][0].reason) == (504, b"Gateway Timeout")
    assert json.loads(responses[1][1]) == {"error": "timed out after 5 s"}
    assert (responses[2][0].status_code, responses[2][0].reason) == (424, b"Failed Dependency")
    assert (b"content-type", b"application/json") in responses[2][0].headers
    assert json.loads(responses[2][1]) == {"reason": "part 2 failed"}
    assert (responses[3][0].status_code, responses[3][0].reason, responses[3][1]) == (299, b"", b"")


def test_encode_uses_crlf_and_the_given_boundary_and_ends_with_the_close_delimiter():
    body, content_type = CODEC.encode(
        report(ItemResult(CallFailure(502, "refused"))), boundary="fixed_b"
    )
    assert content_type == "multipart/mixed; boundary=fixed_b"
    assert body.startswith(b"--fixed_b\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 502 Bad ")
    assert body.endswith(b'"refused"}\r\n--fixed_b--\r\n')
    assert b"\n" not in body.replace(b"\r\n", b"")


def test_encode_quotes_a_boundary_that_is_not_a_token_and_flattens_nested_results():
    nested = BatchResult(
        ExecutionMode.SERIAL,
        (
            ItemResult(SubResponse(200, body=b"a")),
            BatchResult(ExecutionMode.UNORDERED, (ItemResult(SubResponse(204)),)),
        ),
    )
    body, content_type = CODEC.encode(BatchReport(nested, "b-2"), boundary="a b")
    assert content_type == 'multipart/mixed; boundary="a b"'
    statuses = [
        read_http_response(part_bytes(p))[0].status_code for p in email_parts(body, content_type)
    ]
    assert statuses == [200, 204]


def test_random_boundaries_differ_and_never_occur_in_a_part():
    item = ItemResult(SubResponse(200, body=b"--batch_ is a prefix, not the boundary"))
    boundaries = {CODEC.encode(report(item))[1] for _ in range(20)}
    assert len(boundaries) == 20


def test_encode_refuses_misaligned_content_ids_and_a_colliding_boundary():
    item = ItemResult(SubResponse(200, body=b"--clash"))
    with pytest.raises(ValueError):
        CODEC.encode(report(item), content_ids=("1", "2"))
    with pytest.raises(ValueError):
        CODEC.encode(report(item), boundary="clash")


def test_request_content_ids_come_back_as_response_ids_in_order():
    body, content_type = mime_batch(GET_PONY, GET_PONY, GET_PONY, content_ids=("a", None, "c"))
    batch = CODEC.decode(body, content_type)
    ids = [item.content_id for item in batch.items]  # type: ignore[union-attr]
    answer = report(*(ItemResult(SubResponse(200)) for _ in ids))

    out, out_type = CODEC.encode(answer, content_ids=ids)

    assert [p["Content-ID"] for p in email_parts(out, out_type)] == [
        "<response-a>",
        None,
        "<response-c>",
    ]


# -- properties ---------------------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
PCHAR = string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@"
FIELD_CHARS = "".join(map(chr, [*range(0x21, 0x7F), *range(0x80, 0x100)])) + " \t"
BOUNDARY = b"hyp-7f3a9c-boundary"

tokens = st.text(alphabet=TCHAR, min_size=1, max_size=12)
header_names = tokens.filter(
    lambda n: n.lower() not in {"host", "content-length", "transfer-encoding"}
)
header_values = st.text(alphabet=FIELD_CHARS, max_size=20).map(lambda v: v.strip(" \t"))
targets = st.builds(
    lambda path, rest: "/" + path + rest,
    st.text(alphabet=PCHAR, max_size=10),
    st.text(alphabet=PCHAR + "/?", max_size=20),
).filter(lambda t: not t.startswith("//"))


@st.composite
def sub_requests(draw):
    """(SubRequest expected from decoding, the HTTP/1.1 bytes a client would send for it)."""
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=5))
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), ("Host", draw(tokens)))
    body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["length", "chunked", "rest"]))
    payload = body
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload += draw(st.sampled_from([b"", b"\r\n", b"\n\n"]))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        cut = draw(st.integers(0, len(body)))
        chunks = [c for c in (body[:cut], body[cut:]) if c]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    method, target = draw(st.sampled_from(["GET", "POST", "PATCH"]) | tokens), draw(targets)
    version = draw(st.sampled_from([b"1.1", b"1.0"]))
    head = b"%s %s HTTP/%s" % (method.encode(), target.encode(), version) + eol
    head += b"".join(f"{n}: {v}".encode("latin-1") + eol for n, v in headers)
    request = SubRequest(method, target, tuple(headers), body or None)
    return request, head + eol + payload, eol


@st.composite
def batches(draw):
    """(expected Batch, body bytes, the HTTP messages the parts carry) for a random valid batch."""
    drawn = draw(st.lists(sub_requests(), min_size=1, max_size=4))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    ids = draw(
        st.lists(
            st.none() | st.text(alphabet=PCHAR, min_size=1, max_size=8),
            min_size=len(drawn),
            max_size=len(drawn),
        )
    )
    for _, http, _ in drawn:
        assume(BOUNDARY not in http and not (eol == b"\n" and http.endswith(b"\r")))
    items = tuple(
        SubRequest(r.method, r.target, r.headers, r.body, f"part {n}", cid)
        for n, ((r, _, _), cid) in enumerate(zip(drawn, ids, strict=True), 1)
    )
    body = raw_batch(
        [raw_part(http, cid, eol) for (_, http, _), cid in zip(drawn, ids, strict=True)],
        boundary=BOUNDARY,
        eol=eol,
        preamble=draw(st.sampled_from([b"", b"preamble", b"--not-it"])),
        epilogue=draw(st.sampled_from([b"", b"epilogue\r\n", ALL_BYTES])),
        padding=draw(st.sampled_from([b"", b" ", b"\t \t"])),
    )
    return Batch(ExecutionMode.SERIAL, items, "/"), body, [http for _, http, _ in drawn]


BOUNDARY_TYPE = f'multipart/mixed; boundary="{BOUNDARY.decode()}"'
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(batches())
def test_random_valid_batches_decode_to_the_model_they_were_built_from(case):
    expected, body, messages = case
    assert CODEC.decode(body, BOUNDARY_TYPE) == expected
    assert [part_bytes(p) for p in email_parts(body, BOUNDARY_TYPE)] == messages


def decodes_or_rejects(body: bytes, content_type: str) -> None:
    try:
        result = CODEC.decode(body, content_type)
    except ClientError as exc:
        assert exc.where is not None
        assert 400 <= exc.status < 500
    else:
        assert isinstance(result, Batch) and result.items


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0), st.binary(min_size=1, max_size=8)),
)


def mutate(body: bytes, kind: str, where: int, arg: int | bytes) -> bytes:
    at = where % (len(body) + 1)
    if isinstance(arg, bytes):  # insert
        return body[:at] + arg + body[at:]
    if kind == "flip" and at < len(body):
        return body[:at] + bytes([body[at] ^ arg]) + body[at + 1 :]
    return body[:at]


@FAST
@given(batches(), st.lists(mutations, min_size=1, max_size=4))
def test_a_mutated_batch_decodes_or_raises_a_client_error_nothing_else(case, changes):
    body = case[1]
    for kind, where, arg in changes:
        body = mutate(body, kind, where, arg)
    decodes_or_rejects(body, BOUNDARY_TYPE)


@FAST
@given(
    st.binary(max_size=300),
    st.sampled_from([b"", b"--b\r\n", b"--b\r\nContent-Type: application/http\r\n\r\n"]),
)
def test_arbitrary_bytes_decode_or_raise_a_client_error_nothing_else(data, prefix):
    decodes_or_rejects(prefix + data + b"\r\n--b--", "multipart/mixed; boundary=b")
    decodes_or_rejects(data, "multipart/mixed; boundary=b")


@FAST
@given(st.text(max_size=60))
def test_an_arbitrary_content_type_is_accepted_or_raises_a_client_error(content_type):
    decodes_or_rejects(raw_batch([raw_part(GET_PONY)]), "multipart/mixed" + content_type)
    decodes_or_rejects(raw_batch([raw_part(GET_PONY)]), content_type)
