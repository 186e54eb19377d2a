"""The JSON batch codec (SPEC sections 4 and 7), sans-I/O: what it accepts, rejects and answers.

Every rejection names its error class, HTTP status and JSON pointer; every answer is checked
against the seed's `BatchResponse` schema; hypothesis checks "parses, or raises ClientError".
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import gateway
from gateway.errors import ClientError, HeadersTooLarge, MalformedBatch, PayloadTooLarge
from gateway.formats._json_results import _dump, _encode_node, iter_document
from gateway.formats.json_batch import JsonBatchCodec
from gateway.model import (
    Batch,
    BatchLimits,
    BatchOutcome,
    BatchReport,
    BatchResult,
    CallFailure,
    ExecutionMode,
    Item,
    ItemResult,
    ResultNode,
    RollbackStatus,
    Skipped,
    SubRequest,
    SubResponse,
    iter_calls,
)

CODEC = JsonBatchCodec()
SCHEMA_URI = "urn:seed:batch-openapi"
SEED = json.loads(
    (Path(gateway.__file__).parent / "schemas" / "seed_batch_openapi.json").read_text()
)
REGISTRY: Registry[Any] = Registry().with_resource(
    SCHEMA_URI, Resource.from_contents(SEED, default_specification=DRAFT202012)
)
RESPONSE_SCHEMA = Draft202012Validator(
    {"$ref": f"{SCHEMA_URI}#/components/schemas/BatchResponse"}, registry=REGISTRY
)
REQUEST_SCHEMA = Draft202012Validator(
    {"$ref": f"{SCHEMA_URI}#/components/schemas/BatchRequest"}, registry=REGISTRY
)


def dumps(document: object) -> bytes:
    return json.dumps(document).encode("utf-8")


def single(method: object = "GET", operation: object = "/a", **extra: object) -> dict[str, object]:
    return {"SingleItem": {"method": method, "operation": operation, **extra}}


def batch(*items: object, mode: object = "Serial") -> dict[str, object]:
    return {"Batch": {"batch_execution_type": mode, "items": list(items)}}


def nested(depth: int) -> dict[str, object]:
    document: dict[str, object] = single()
    for _ in range(depth):
        document = batch(document)
    return document


def decode(document: object, limits: BatchLimits | None = None) -> Item:
    codec = CODEC if limits is None else JsonBatchCodec(limits)
    return codec.decode(dumps(document))


def encoded(report: BatchReport) -> dict[str, Any]:
    """Encode, check the bytes are compact UTF-8 JSON valid against the seed schema, parse back."""
    data = CODEC.encode(report)
    document = json.loads(data.decode("utf-8"))
    RESPONSE_SCHEMA.validate(document)
    assert data == json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    return document  # type: ignore[no-any-return]


def ok(body: bytes = b"", content_type: str | None = None, status: int = 200) -> ItemResult:
    headers = () if content_type is None else (("Content-Type", content_type),)
    return ItemResult(SubResponse(status=status, headers=headers, body=body))


# --- decode: what is accepted -------------------------------------------------------------------


def test_codec_speaks_application_json() -> None:
    assert JsonBatchCodec.media_type == "application/json"
    assert JsonBatchCodec().limits == BatchLimits()


def test_a_single_item_is_one_sub_request_with_its_method_uppercased() -> None:
    assert decode(single("get", "/v1/keys?limit=2")) == SubRequest(
        method="GET", target="/v1/keys?limit=2", headers=(), body=None, where="/SingleItem"
    )


def test_a_flat_batch_keeps_its_mode_order_and_pointers() -> None:
    item = decode(batch(single("GET", "/a"), single("DELETE", "/b"), mode="Unordered"))
    assert isinstance(item, Batch)
    assert item.mode is ExecutionMode.UNORDERED
    assert item.where == "/Batch"
    assert [(call.method, call.target, call.where) for call in iter_calls(item)] == [
        ("GET", "/a", "/Batch/items/0/SingleItem"),
        ("DELETE", "/b", "/Batch/items/1/SingleItem"),
    ]


def test_nested_batches_mix_modes_and_point_at_each_level() -> None:
    document = batch(
        single(operation="/first"),
        batch(single(operation="/inner"), batch(mode="Serial"), mode="Unordered"),
        single(operation="/last"),
    )
    item = decode(document)
    assert isinstance(item, Batch) and item.mode is ExecutionMode.SERIAL
    inner = item.items[1]
    assert isinstance(inner, Batch)
    assert (inner.mode, inner.where) == (ExecutionMode.UNORDERED, "/Batch/items/1/Batch")
    assert inner.items[1] == Batch(
        ExecutionMode.SERIAL, (), where="/Batch/items/1/Batch/items/1/Batch"
    )
    assert [call.target for call in iter_calls(item)] == ["/first", "/inner", "/last"]
    assert iter_calls(item)[1].where == "/Batch/items/1/Batch/items/0/SingleItem"


def test_a_batch_may_be_empty() -> None:
    assert decode(batch()) == Batch(ExecutionMode.SERIAL, (), where="/Batch")


@pytest.mark.parametrize(
    ("extra", "body"),
    [
        ({}, None),
        ({"body": None}, None),
        ({"body": {"name": "k1", "size": [1, 2.5]}}, b'{"name":"k1","size":[1,2.5]}'),
        ({"body": "text"}, b'"text"'),
        ({"body": 0}, b"0"),
        ({"body": False}, b"false"),
        ({"body": {}}, b"{}"),
        ({"body": {"name": "clé ✓"}}, '{"name":"clé ✓"}'.encode()),
    ],
    ids=["absent", "null", "object", "string", "zero", "false", "empty-object", "non-ascii"],
)
def test_body_is_compact_utf8_json_and_null_or_absent_means_none(
    extra: dict[str, object], body: bytes | None
) -> None:
    call = decode(single("POST", **extra))
    assert isinstance(call, SubRequest)
    assert call.body == body
    expected_headers = () if body is None else (("Content-Type", "application/json"),)
    assert call.headers == expected_headers


def test_header_extension_keeps_names_and_order_and_lists_repeat() -> None:
    headers = {"X-Trace": "abc", "Accept": ["application/json", "text/plain"], "X-Empty": ""}
    call = decode(single(headers=headers))
    assert isinstance(call, SubRequest)
    assert call.headers == (
        ("X-Trace", "abc"),
        ("Accept", "application/json"),
        ("Accept", "text/plain"),
        ("X-Empty", ""),
    )


def test_null_headers_mean_none() -> None:
    assert decode(single(headers=None)) == decode(single())


@pytest.mark.parametrize("name", ["Content-Type", "content-type", "CONTENT-TYPE"])
def test_a_client_content_type_is_kept_and_not_duplicated(name: str) -> None:
    call = decode(single("PATCH", body={"a": 1}, headers={name: "application/merge-patch+json"}))
    assert isinstance(call, SubRequest)
    assert call.headers == ((name, "application/merge-patch+json"),)


def test_surrounding_whitespace_is_fine() -> None:
    assert CODEC.decode(b" \r\n\t" + dumps(single()) + b"\n ") == decode(single())


def test_limits_are_inclusive() -> None:
    limits = BatchLimits(max_items=2, max_depth=2, max_part_headers=2, max_body_bytes=10_000)
    assert len(iter_calls(decode(batch(single(), single()), limits))) == 2
    assert isinstance(decode(nested(2), limits), Batch)
    assert isinstance(decode(single(headers={"A": ["1", "2"]}), limits), SubRequest)


def test_a_deep_but_allowed_json_body_is_accepted() -> None:
    body: object = 1
    for _ in range(100):
        body = [body]
    call = decode(single("POST", body=body))
    assert isinstance(call, SubRequest) and call.body == b"[" * 100 + b"1" + b"]" * 100


# --- decode: what is rejected, where and how ---------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
REJECTIONS: list[tuple[str, bytes, type[ClientError], str]] = [
    ("not-utf8", b'{"SingleItem": "\xff"}', MalformedBatch, "/"),
    ("utf16", json.dumps(single()).encode("utf-16"), MalformedBatch, "/"),
    ("empty", b"", MalformedBatch, "/"),
    ("blank", b"  \n", MalformedBatch, "/"),
    ("truncated", b'{"SingleItem": {"method": "GET"', MalformedBatch, "/"),
    ("trailing-data", dumps(single()) + b"{}", MalformedBatch, "/"),
    (
        "nan",
        b'{"SingleItem": {"method": "GET", "operation": "/a", "body": NaN}}',
        MalformedBatch,
        "/",
    ),
    ("infinity", b'{"SingleItem": {"body": -Infinity}}', MalformedBatch, "/"),
    ("huge-float", b'{"SingleItem": {"body": 1e999}}', MalformedBatch, "/"),
    ("huge-int", b'{"SingleItem": {"body": ' + b"9" * 5000 + b"}}", MalformedBatch, "/"),
    ("deep-arrays", DEEP, MalformedBatch, "/"),
    ("deep-objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, MalformedBatch, "/"),
    ("deep-unclosed", b"[" * 100_000, MalformedBatch, "/"),
    ("dup-root", b'{"SingleItem": {}, "SingleItem": {}}', MalformedBatch, "/"),
    (
        "dup-item",
        b'{"SingleItem": {"method": "GET", "method": "PUT", "operation": "/a"}}',
        MalformedBatch,
        "/SingleItem",
    ),
    (
        "dup-in-body",
        b'{"SingleItem": {"method": "GET", "operation": "/a", "body": [{"x": 1, "x": 2}]}}',
        MalformedBatch,
        "/SingleItem/body/0",
    ),
    ("root-array", dumps([single()]), MalformedBatch, "/"),
    ("root-string", dumps("SingleItem"), MalformedBatch, "/"),
    ("root-empty", dumps({}), MalformedBatch, "/"),
    ("root-both", dumps({**single(), **batch()}), MalformedBatch, "/"),
    ("root-unknown", dumps({**single(), "Extra": 1}), MalformedBatch, "/Extra"),
    ("root-lowercase", dumps({"singleItem": {}}), MalformedBatch, "/singleItem"),
    ("pointer-escaped", dumps({"a/b~c": 1}), MalformedBatch, "/a~1b~0c"),
    ("item-not-object", dumps({"SingleItem": "GET /a"}), MalformedBatch, "/SingleItem"),
    ("item-unknown-key", dumps(single(bodyy={})), MalformedBatch, "/SingleItem/bodyy"),
    (
        "method-missing",
        dumps({"SingleItem": {"operation": "/a"}}),
        MalformedBatch,
        "/SingleItem/method",
    ),
    ("method-number", dumps(single(method=1)), MalformedBatch, "/SingleItem/method"),
    ("method-empty", dumps(single(method="")), MalformedBatch, "/SingleItem/method"),
    ("method-space", dumps(single(method="GE T")), MalformedBatch, "/SingleItem/method"),
    ("method-crlf", dumps(single(method="GET\r\n")), MalformedBatch, "/SingleItem/method"),
    (
        "operation-missing",
        dumps({"SingleItem": {"method": "GET"}}),
        MalformedBatch,
        "/SingleItem/operation",
    ),
    ("operation-null", dumps(single(operation=None)), MalformedBatch, "/SingleItem/operation"),
    ("operation-empty", dumps(single(operation="")), MalformedBatch, "/SingleItem/operation"),
    ("operation-array", dumps(single(operation=["/a"])), MalformedBatch, "/SingleItem/operation"),
    (
        "operation-crlf",
        dumps(single(operation="/a\r\nX: 1")),
        MalformedBatch,
        "/SingleItem/operation",
    ),
    (
        "operation-surrogate",
        b'{"SingleItem": {"method": "GET", "operation": "/\\udc80"}}',
        MalformedBatch,
        "/SingleItem/operation",
    ),
    (
        "body-surrogate",
        b'{"SingleItem": {"method": "GET", "operation": "/a", "body": "\\ud800"}}',
        MalformedBatch,
        "/SingleItem/body",
    ),
    ("headers-array", dumps(single(headers=[["A", "1"]])), MalformedBatch, "/SingleItem/headers"),
    ("header-name", dumps(single(headers={"X A": "1"})), MalformedBatch, "/SingleItem/headers/X A"),
    ("header-name-empty", dumps(single(headers={"": "1"})), MalformedBatch, "/SingleItem/headers/"),
    ("header-number", dumps(single(headers={"X-A": 1})), MalformedBatch, "/SingleItem/headers/X-A"),
    (
        "header-null",
        dumps(single(headers={"X-A": None})),
        MalformedBatch,
        "/SingleItem/headers/X-A",
    ),
    (
        "header-list-item",
        dumps(single(headers={"X-A": ["1", 2]})),
        MalformedBatch,
        "/SingleItem/headers/X-A/1",
    ),
    (
        "header-lf",
        dumps(single(headers={"X-A": "1\nX-B: 2"})),
        MalformedBatch,
        "/SingleItem/headers/X-A",
    ),
    (
        "header-cr",
        dumps(single(headers={"X-A": ["ok", "1\r"]})),
        MalformedBatch,
        "/SingleItem/headers/X-A/1",
    ),
    (
        "header-nul",
        dumps(single(headers={"X-A": "a\x00"})),
        MalformedBatch,
        "/SingleItem/headers/X-A",
    ),
    (
        "header-content-length",
        dumps(single(headers={"content-length": "5"})),
        MalformedBatch,
        "/SingleItem/headers/content-length",
    ),
    (
        "header-transfer-encoding",
        dumps(single(headers={"Transfer-Encoding": "chunked"})),
        MalformedBatch,
        "/SingleItem/headers/Transfer-Encoding",
    ),
    ("batch-not-object", dumps({"Batch": []}), MalformedBatch, "/Batch"),
    (
        "batch-no-mode",
        dumps({"Batch": {"items": []}}),
        MalformedBatch,
        "/Batch/batch_execution_type",
    ),
    ("batch-mode-case", dumps(batch(mode="serial")), MalformedBatch, "/Batch/batch_execution_type"),
    ("batch-mode-number", dumps(batch(mode=1)), MalformedBatch, "/Batch/batch_execution_type"),
    (
        "batch-no-items",
        dumps({"Batch": {"batch_execution_type": "Serial"}}),
        MalformedBatch,
        "/Batch/items",
    ),
    (
        "batch-items-object",
        dumps({"Batch": {"batch_execution_type": "Serial", "items": {}}}),
        MalformedBatch,
        "/Batch/items",
    ),
    (
        "batch-unknown-key",
        dumps({"Batch": {"batch_execution_type": "Serial", "items": [], "atomic": True}}),
        MalformedBatch,
        "/Batch/atomic",
    ),
    ("batch-item-null", dumps(batch(single(), None)), MalformedBatch, "/Batch/items/1"),
    (
        "deep-bad-operation",
        dumps(batch(single(), single(), batch(single(), single(operation=7)))),
        MalformedBatch,
        "/Batch/items/2/Batch/items/1/SingleItem/operation",
    ),
    ("batch-too-deep", dumps(nested(9)), MalformedBatch, "/Batch" + "/items/0/Batch" * 8),
    (
        "too-many-items",
        dumps(batch(*[single()] * 1001)),
        PayloadTooLarge,
        "/Batch/items/1000/SingleItem",
    ),
    (
        "too-many-headers",
        dumps(single(headers={f"X-{i}": "v" for i in range(101)})),
        HeadersTooLarge,
        "/SingleItem/headers",
    ),
    (
        "headers-too-big",
        dumps(single(headers={"X-Big": ["v" * 30_000, "v" * 30_000, "v" * 2000]})),
        HeadersTooLarge,
        "/SingleItem/headers",
    ),
]


@pytest.mark.parametrize(
    ("body", "error", "where"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_rejections_name_class_status_and_pointer(
    body: bytes, error: type[ClientError], where: str
) -> None:
    with pytest.raises(ClientError) as caught:
        CODEC.decode(body)
    assert type(caught.value) is error
    assert caught.value.where == where
    assert (
        caught.value.status
        == {MalformedBatch: 400, PayloadTooLarge: 413, HeadersTooLarge: 431}[error]
    )
    assert caught.value.detail.endswith(".") and len(caught.value.detail) < 200


@pytest.mark.parametrize(
    ("limits", "document", "error", "where", "detail"),
    [
        (
            BatchLimits(max_body_bytes=50),
            batch(single(), single()),
            PayloadTooLarge,
            "/",
            "Body too large. Maximum body size is 50 bytes.",
        ),
        (
            BatchLimits(max_items=2),
            batch(single(), batch(single(), single())),
            PayloadTooLarge,
            "/Batch/items/1/Batch/items/1/SingleItem",
            "Too many items. Maximum number of items is 2.",
        ),
        (
            BatchLimits(max_depth=2),
            batch(single(), batch(batch(single()))),
            MalformedBatch,
            "/Batch/items/1/Batch/items/0/Batch",
            "Batches nested too deep. Maximum nesting depth is 2.",
        ),
        (
            BatchLimits(max_part_headers=2),
            batch(single(headers={"A": "1"}), single(headers={"A": ["1", "2"], "B": "3"})),
            HeadersTooLarge,
            "/Batch/items/1/SingleItem/headers",
            "Too many headers. Maximum number of headers is 2.",
        ),
        (
            BatchLimits(max_part_header_bytes=20),
            single(headers={"Name": "v" * 12}),  # 4 + 12 + ": " + CRLF = 20: fits ...
            None,
            "",
            "",
        ),
        (
            BatchLimits(max_part_header_bytes=20),
            single(headers={"Name": "v" * 13}),  # ... 21 does not
            HeadersTooLarge,
            "/SingleItem/headers",
            "Headers too large. Maximum size is 20 bytes.",
        ),
    ],
    ids=["body-bytes", "items", "depth", "header-count", "header-bytes-fit", "header-bytes"],
)
def test_limits_answer_413_431_or_400_with_exact_messages(
    limits: BatchLimits,
    document: object,
    error: type[ClientError] | None,
    where: str,
    detail: str,
) -> None:
    if error is None:
        decode(document, limits)
        return
    with pytest.raises(error) as caught:
        decode(document, limits)
    assert (caught.value.where, caught.value.detail) == (where, detail)


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        (
            single(method="GE T"),
            '"method" must be a non-empty HTTP method token such as "GET" or "POST"; got "GE T".',
        ),
        (
            {"SingleItem": {"method": "GET"}},
            'Missing "operation": expected a non-empty string: the target path with optional '
            'query, such as "/v1/keys?x=1".',
        ),
        (
            batch(mode="Parallel"),
            '"batch_execution_type" must be "Serial" or "Unordered"; got "Parallel".',
        ),
        (
            single(bodyy=1),
            'Unknown key "bodyy": SingleItem takes only "method", "operation", "body", "headers".',
        ),
        (
            {},
            'Expected exactly one key of {"SingleItem": {...}} or {"Batch": {...}}; '
            "got an empty object.",
        ),
    ],
)
def test_messages_say_what_is_wrong_and_the_expected_form(document: object, detail: str) -> None:
    with pytest.raises(MalformedBatch) as caught:
        decode(document)
    assert caught.value.detail == detail


def test_every_strict_prefix_of_a_document_is_rejected_cleanly() -> None:
    data = dumps(batch(single("POST", "/a", body={"k": [1, "x"]}, headers={"A": ["1"]})))
    for end in range(len(data)):
        with pytest.raises(MalformedBatch) as caught:
            CODEC.decode(data[:end])
        assert caught.value.where == "/"
    assert isinstance(CODEC.decode(data), Batch)


# --- encode -------------------------------------------------------------------------------------


def test_a_single_result_encodes_exactly() -> None:
    report = BatchReport(root=ok(b'{"id": 1}', "application/json"), batch_id="b-1")
    assert CODEC.encode(report) == (
        b'{"SingleItem":{"Result":{"status":200,"body":{"id":1},"body_encoding":"json",'
        b'"headers":{"content-type":"application/json"}}},"batch_id":"b-1"}'
    )


def test_results_mirror_the_request_shape_item_for_item() -> None:
    root = BatchResult(
        ExecutionMode.SERIAL,
        (
            ok(b"first", "text/plain"),
            BatchResult(ExecutionMode.UNORDERED, (ok(status=204), ok(b"[]", "application/json"))),
            BatchResult(ExecutionMode.SERIAL, ()),
            ItemResult(Skipped("not executed: /Batch/items/0/SingleItem failed with 500")),
        ),
    )
    document = encoded(BatchReport(root=root, batch_id="b-2"))
    items = document["Batch"]["items"]
    assert items[0]["SingleItem"]["Result"]["body"] == "first"
    assert [i["SingleItem"]["Result"]["status"] for i in items[1]["Batch"]["items"]] == [204, 200]
    assert items[2] == {"Batch": {"items": []}}
    assert items[3] == {
        "SingleItem": {
            "Skipped": {"reason": "not executed: /Batch/items/0/SingleItem failed with 500"}
        }
    }
    assert document["batch_id"] == "b-2"
    assert "atomic" not in document


@pytest.mark.parametrize(
    ("content_type", "body", "value", "encoding"),
    [
        (None, b"", None, "empty"),
        ("application/json", b"", None, "empty"),
        ("application/json", b'{"a": [1, 2.5, null]}', {"a": [1, 2.5, None]}, "json"),
        ("Application/JSON; charset=utf-8", b'"s"', "s", "json"),
        ("application/problem+json", b'{"title": "x"}', {"title": "x"}, "json"),
        ("application/json", b"not json", "not json", "text"),
        ("application/json", b'{"a": 1, "a": 2}', '{"a": 1, "a": 2}', "text"),
        ("application/json", b"[NaN]", "[NaN]", "text"),
        ("application/json", b"[" * 300 + b"]" * 300, "[" * 300 + "]" * 300, "text"),
        (None, b'{"a": 1}', '{"a": 1}', "text"),
        (None, b"plain", "plain", "text"),
        ("", b"plain", "plain", "text"),
        ("text/plain", "héllo ✓".encode(), "héllo ✓", "text"),
        ("text/html; charset=UTF-8", b"<p>hi</p>", "<p>hi</p>", "text"),
        ("application/xml", b"<a/>", "<a/>", "text"),
        ("application/atom+xml", b"<feed/>", "<feed/>", "text"),
        ("application/x-www-form-urlencoded", b"a=1&b=2", "a=1&b=2", "text"),
        ("text/plain", b"\xff\xfe", base64.b64encode(b"\xff\xfe").decode(), "base64"),
        ("text/plain; charset=iso-8859-1", b"caf\xe9", "Y2Fm6Q==", "base64"),
        ("text/plain; charset=latin-1", b"cafe", "Y2FmZQ==", "base64"),
        ("application/octet-stream", b"abc", "YWJj", "base64"),
        ("image/png", b"\x89PNG\r\n\x1a\n", "iVBORw0KGgo=", "base64"),
        ("application/vnd.ms-excel", b"ab", "YWI=", "base64"),
        ("application/json", b"\x1f\x8b\x08\x00", "H4sIAA==", "base64"),
    ],
)
def test_body_encoding_json_text_base64_or_empty(
    content_type: str | None, body: bytes, value: object, encoding: str
) -> None:
    document = encoded(BatchReport(root=ok(body, content_type), batch_id="b"))
    result = document["SingleItem"]["Result"]
    assert (result["body"], result["body_encoding"]) == (value, encoding)
    if encoding == "base64":
        assert base64.b64decode(result["body"], validate=True) == body


def test_response_headers_are_lowercase_and_repeats_become_lists() -> None:
    headers = (
        ("Set-Cookie", "a=1"),
        ("X-One", "1"),
        ("set-cookie", "b=2"),
        ("Content-Type", "text/plain"),
    )
    report = BatchReport(ItemResult(SubResponse(201, headers=headers, body=b"x")), batch_id="b")
    assert encoded(report)["SingleItem"]["Result"]["headers"] == {
        "set-cookie": ["a=1", "b=2"],
        "x-one": "1",
        "content-type": "text/plain",
    }


@pytest.mark.parametrize(
    ("failure", "extra"),
    [
        (CallFailure(502, "connection refused"), {}),
        (CallFailure(504, "timed out after 5.0 s", maybe_executed=True), {"maybe_executed": True}),
    ],
)
def test_a_call_failure_is_a_gateway_result(failure: CallFailure, extra: dict[str, object]) -> None:
    document = encoded(BatchReport(ItemResult(failure), batch_id="b"))
    assert document["SingleItem"] == {
        "Result": {
            "status": failure.status,
            "body": {"error": failure.reason},
            "body_encoding": "json",
            "gateway_error": True,
            **extra,
        }
    }


def test_atomic_outcome_and_rollback_statuses_are_reported() -> None:
    root = BatchResult(
        ExecutionMode.SERIAL,
        (
            ItemResult(SubResponse(201), rollback=RollbackStatus.ROLLED_BACK),
            ItemResult(
                SubResponse(200), RollbackStatus.ROLLBACK_FAILED, "DELETE /a/1 answered 500"
            ),
            ItemResult(CallFailure(502, "refused"), rollback=RollbackStatus.FAILED),
            ItemResult(Skipped("not executed"), rollback=RollbackStatus.SKIPPED),
        ),
    )
    report = BatchReport(
        root, "b-3", BatchOutcome.ROLLBACK_INCOMPLETE, "1 compensation failed", extra={"note": "n"}
    )
    document = encoded(report)
    assert document["atomic"] == {
        "outcome": "rollback_incomplete",
        "detail": "1 compensation failed",
    }
    assert document["note"] == "n"
    items = [item["SingleItem"] for item in document["Batch"]["items"]]
    assert items[0]["Result"]["rollback"] == "rolled_back"
    assert "rollback_detail" not in items[0]["Result"]
    assert items[1]["Result"]["rollback"] == "rollback_failed"
    assert items[1]["Result"]["rollback_detail"] == "DELETE /a/1 answered 500"
    assert items[2]["Result"]["rollback"] == "failed"
    assert items[3] == {"Skipped": {"reason": "not executed", "rollback": "skipped"}}


def test_committed_outcome_without_detail() -> None:
    report = BatchReport(ok(), "b", BatchOutcome.COMMITTED)
    assert encoded(report)["atomic"] == {"outcome": "committed"}


def test_extra_fields_never_replace_the_reserved_ones() -> None:
    report = BatchReport(ok(), "b", extra={"batch_id": "forged", "SingleItem": "x"})
    document = encoded(report)
    assert document["batch_id"] == "b" and "Result" in document["SingleItem"]


def test_output_is_utf8_and_survives_lone_surrogates() -> None:
    text = ok("clé".encode(), "text/plain")
    lone = ok(b'{"s": "\\ud800"}', "application/json")
    bad_header = ItemResult(SubResponse(200, headers=(("X-Raw", "a\udcff"),)))
    data = CODEC.encode(
        BatchReport(BatchResult(ExecutionMode.SERIAL, (text, lone, bad_header)), "b")
    )
    assert "clé".encode() in data
    document = json.loads(data.decode("utf-8"))
    RESPONSE_SCHEMA.validate(document)


# --- hypothesis: structure round trip and "parses or raises ClientError" -----------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
header_values = st.text(
    st.characters(exclude_characters="\r\n\x00", exclude_categories=["Cs"]), max_size=10
)
single_items = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "post", "Put", "DELETE", "patch", "M-SEARCH"]),
        "operation": st.from_regex(r"/[a-z0-9/._~-]{0,12}(\?[a-z]=[0-9]{1,3})?", fullmatch=True),
    },
    optional={
        "body": json_values,
        "headers": st.dictionaries(
            st.from_regex(r"X-[A-Za-z0-9]{1,6}", fullmatch=True),
            header_values | st.lists(header_values, max_size=3),
            max_size=4,
        ),
    },
)
requests = st.recursive(
    single_items.map(lambda item: {"SingleItem": item}),
    lambda inner: st.fixed_dictionaries(
        {
            "batch_execution_type": st.sampled_from(["Serial", "Unordered"]),
            "items": st.lists(inner, max_size=4),
        }
    ).map(lambda body: {"Batch": body}),
    max_leaves=12,
)
ROOMY = JsonBatchCodec(BatchLimits(max_depth=64))


def shape_of_document(document: dict[str, Any]) -> object:
    if "SingleItem" in document:
        return "call"
    body = document["Batch"]
    return (body["batch_execution_type"], [shape_of_document(item) for item in body["items"]])


def shape_of_model(item: Item) -> object:
    if isinstance(item, SubRequest):
        return "call"
    return (item.mode.value, [shape_of_model(child) for child in item.items])


def resolve(document: Any, pointer: str) -> Any:
    for token in pointer.strip("/").split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        document = document[int(token)] if isinstance(document, list) else document[token]
    return document


def results_for(item: Item) -> ResultNode:
    if isinstance(item, SubRequest):
        return ok(item.body or b"", "application/json")
    return BatchResult(item.mode, tuple(results_for(child) for child in item.items))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=requests, ensure_ascii=st.booleans())
def test_valid_documents_decode_to_the_same_structure(
    document: dict[str, Any], ensure_ascii: bool
) -> None:
    REQUEST_SCHEMA.validate(document)
    item = ROOMY.decode(json.dumps(document, ensure_ascii=ensure_ascii).encode())
    assert shape_of_model(item) == shape_of_document(document)
    for call in iter_calls(item):
        source = resolve(document, call.where)
        assert call.method == source["method"].upper()
        assert call.target == source["operation"]
        body = source.get("body")
        assert (call.body is None) == (body is None)
        if call.body is not None:
            assert json.loads(call.body) == body
    answer = json.loads(ROOMY.encode(BatchReport(results_for(item), "b")))
    RESPONSE_SCHEMA.validate(answer)
    assert positions(answer) == positions(document)


def positions(document: dict[str, Any]) -> object:
    """Request or response tree without modes: which positions hold calls and which batches."""
    if "SingleItem" in document:
        return "call"
    return [positions(item) for item in document["Batch"]["items"]]


def decodes_or_rejects(codec: JsonBatchCodec, data: bytes) -> None:
    """The one rule: a model comes back, or a ClientError that says where; nothing else."""
    try:
        codec.decode(data)
    except ClientError as exc:
        assert exc.where is not None and exc.where.startswith("/")
        assert exc.status in (400, 413, 431)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_client_error(data: bytes) -> None:
    decodes_or_rejects(CODEC, data)


keys = st.sampled_from(
    [
        "SingleItem",
        "Batch",
        "method",
        "operation",
        "body",
        "headers",
        "batch_execution_type",
        "items",
    ]
) | st.text(max_size=3)
plausible = st.recursive(
    json_scalars | st.sampled_from(["GET", "/a", "Serial", "Unordered", "X-A", "a\r\n"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=15,
)


@settings(max_examples=200, deadline=None)
@given(document=plausible)
def test_arbitrary_json_parses_or_raises_client_error(document: object) -> None:
    decodes_or_rejects(JsonBatchCodec(BatchLimits(max_depth=2, max_items=3)), dumps(document))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=requests, data=st.data())
def test_mutated_documents_parse_or_raise_client_error(
    document: dict[str, Any], data: st.DataObject
) -> None:
    raw = bytearray(json.dumps(document).encode())
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        at = data.draw(st.integers(0, len(raw)), label="at")
        chunk = data.draw(st.sampled_from([b"", b"{", b"]", b'"', b"\\", b",", b"\xff", b"\x00"]))
        raw[at : at + data.draw(st.integers(0, 3), label="cut")] = chunk
    decodes_or_rejects(JsonBatchCodec(BatchLimits(max_depth=3, max_items=5)), bytes(raw))


def test_a_big_answer_is_encoded_in_chunks_that_join_to_the_same_compact_json() -> None:
    """The endpoint writes the answer chunk by chunk (issue 10): never the whole answer at once."""
    big = bytes(range(256)) * 1024  # 256 KiB of binary: base64
    inner = BatchResult(ExecutionMode.SERIAL, (ok(big, "application/octet-stream"), ok(b'"x"', "text/plain")))
    root = BatchResult(ExecutionMode.UNORDERED, (ok(b'{"a": 1}', "application/json"), inner, ok(big)))
    report = BatchReport(root=root, batch_id="b-chunks", atomic_outcome=BatchOutcome.COMMITTED)
    chunks = list(CODEC.encode_chunks(report))
    assert len(chunks) >= 3 and max(map(len, chunks)) < len(b"".join(chunks))
    document = encoded(report)  # byte-exact compact JSON, valid against the seed schema
    assert b"".join(chunks) == json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    assert document["Batch"]["items"][1]["Batch"]["items"][0]["SingleItem"]["Result"]["body"] == (
        base64.b64encode(big).decode()
    )


_BIG_BODIES = [
    bytes(range(256)) * 192,  # exactly one 48 KiB slice of base64 (or text/JSON by its type)
    bytes(range(256)) * 400 + b"\x01",  # slices, the last one not a multiple of 3
    b"x" * 70_000,
    b"[" + b"1," * 40_000 + b"1]",
]
"""Bodies at and over the size from which a base64 body is encoded slice by slice."""


def _big_body(index: int) -> bytes:
    return _BIG_BODIES[index]  # by index: hypothesis would print the bodies in the strategy's repr


_outcomes = st.one_of(
    st.builds(
        SubResponse,
        status=st.integers(200, 599),
        reason=st.just("R"),
        headers=st.lists(
            st.tuples(st.sampled_from(["Content-Type", "X-A", "ETag"]),
                      st.sampled_from(["application/json", "text/plain", "a\u00e9", "1"])),
            max_size=3,
        ).map(tuple),
        body=st.sampled_from([b"", b'{"a":[1,2]}', b"plain", b"\xff\x00", "\u00e9t\u00e9".encode()])
        | st.integers(0, len(_BIG_BODIES) - 1).map(_big_body),
    ),
    st.builds(CallFailure, status=st.sampled_from([502, 504]), reason=st.text(max_size=10),
              maybe_executed=st.booleans()),
    st.builds(Skipped, reason=st.text(max_size=10)),
)
_leaves = st.builds(
    ItemResult, _outcomes, st.none() | st.sampled_from(list(RollbackStatus)), st.none() | st.text(max_size=5)
)
_trees = st.recursive(
    _leaves,
    lambda inner: st.builds(
        BatchResult, st.sampled_from(list(ExecutionMode)), st.lists(inner, max_size=4).map(tuple)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(root=_trees, tail=st.dictionaries(st.sampled_from(["batch_id", "atomic"]), st.text(max_size=5)))
def test_the_answer_streamed_piece_by_piece_is_byte_for_byte_the_whole_document(
    root: ResultNode, tail: dict[str, object]
) -> None:
    """iter_document writes one piece per item; joined, they are exactly the document encoded at once."""
    streamed = b"".join(iter_document(root, tail))
    assert streamed == _dump({**_encode_node(root), **tail})
    json.loads(streamed)
