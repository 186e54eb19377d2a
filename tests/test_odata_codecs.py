"""The OData `$batch` codecs, sans-I/O: 4.01 JSON (odata-json-format §19) and multipart (protocol §11.7).

Built from the specifications' own examples; answers are read back with `json` and Python's `email`
package (an independent MIME parser) and `http.client` for the embedded responses.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import (
    ClientError,
    ForbiddenTarget,
    MalformedBatch,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from gateway.formats._odata import (
    ServiceRoot,
    continue_on_error,
    gateway_target,
    resolve_references,
)
from gateway.formats.odata_json import ODataJsonCodec
from gateway.formats.odata_multipart import ODataMultipartCodec, odata_version
from gateway.graph_model import (
    AnsweredItem,
    FailurePolicy,
    GraphItem,
    GraphResult,
    ReferenceUnresolved,
    Unmet,
)
from gateway.model import (
    BatchLimits,
    BatchOutcome,
    CallFailure,
    ItemResult,
    RollbackStatus,
    SubRequest,
    SubResponse,
)

ROOT = ServiceRoot.of("/service/$batch", ["http://host"])
JSON = ODataJsonCodec()
MULTIPART = ODataMultipartCodec()
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_json(document: object, **kwargs: Any) -> Any:
    return JSON.decode(json.dumps(document).encode(), ROOT, **kwargs)


def ok(status: int = 200, body: bytes = b"", *headers: tuple[str, str]) -> ItemResult:
    return ItemResult(SubResponse(status, headers=headers, body=body))


# --- JSON: the spec's examples ------------------------------------------------------------------

SPEC_BATCH = {  # §19.1 example: a query, an atomicity group (patch + insert), a second query
    "requests": [
        {"id": "0", "method": "get", "url": "/service/Customers('ALFKI')"},
        {
            "id": "1",
            "atomicityGroup": "group1",
            "dependsOn": ["0"],
            "method": "patch",
            "url": "/service/Customers('ALFKI')",
            "headers": {"Prefer": "return=minimal"},
            "body": {"CompanyName": "Alfreds"},
        },
        {
            "id": "2",
            "atomicityGroup": "group1",
            "method": "post",
            "url": "/service/Customers",
            "body": {"CustomerID": "POIUY"},
        },
        {"id": "3", "dependsOn": ["group1"], "method": "get", "url": "/service/Products"},
    ]
}


def test_spec_batch_example_decodes_into_the_graph() -> None:
    batch = decode_json(SPEC_BATCH)
    items = batch.graph.items
    assert [i.id for i in items] == ["0", "1", "2", "3"]
    assert [i.request.method for i in items] == ["GET", "PATCH", "POST", "GET"]
    assert [i.group for i in items] == [None, "group1", "group1", None]
    assert items[1].depends_on == ("0",)
    assert items[3].depends_on == ("1", "2")  # a group stands for all its members
    assert items[1].request.headers == (("Prefer", "return=minimal"), ("Content-Type", "application/json"))
    assert json.loads(items[2].request.body or b"") == {"CustomerID": "POIUY"}
    assert items[0].request.body is None
    assert batch.graph.sequential is False
    assert batch.graph.on_failure is FailurePolicy.DEPENDENTS  # §19.4: default processes all
    assert batch.groups == {"1": "group1", "2": "group1"}


def test_continue_on_error_false_stops_the_batch() -> None:
    assert decode_json(SPEC_BATCH, continue_on_error=False).graph.on_failure is FailurePolicy.STOP
    assert decode_json(SPEC_BATCH, continue_on_error=True).graph.on_failure is FailurePolicy.DEPENDENTS


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], None),
        (["return=minimal"], None),
        (["continue-on-error"], True),
        (["odata.continue-on-error"], True),
        (["respond-async, continue-on-error=false"], False),
        (["Continue-On-Error=TRUE"], True),
        (["return=minimal", "odata.continue-on-error=false"], False),
    ],
)
def test_continue_on_error_preference(values: list[str], expected: bool | None) -> None:
    assert continue_on_error(values) is expected


def test_spec_reference_example_resolves_to_the_location() -> None:
    """§19.2: `$1/Orders` is the entity created by request 1, which must be in dependsOn."""
    batch = decode_json(
        {
            "requests": [
                {"id": "1", "method": "post", "url": "/service/Customers", "body": {"Name": "x"}},
                {"id": "2", "dependsOn": ["1"], "method": "post", "url": "$1/Orders", "body": {"n": 1}},
            ]
        }
    )
    second = batch.graph.items[1]
    assert second.has_references and second.depends_on == ("1",)
    answer = AnsweredItem(SubResponse(201, headers=(("Location", "http://up/c/7"),)), "/service/Customers(7)")
    resolved = resolve_references(second, {"1": answer})
    assert resolved.target == "/service/Customers(7)/Orders"
    assert resolved.body == second.request.body
    with pytest.raises(ReferenceUnresolved, match="Location"):
        resolve_references(second, {"1": AnsweredItem(SubResponse(201), None)})


def test_spec_etag_example_resolves_if_match() -> None:
    """§19.3: `if-match: $1` is the ETag of request 1's answer."""
    batch = decode_json(
        {
            "requests": [
                {
                    "id": "1",
                    "method": "get",
                    "url": "/service/Employees(0)",
                    "headers": {"accept": "application/json"},
                },
                {
                    "id": "2",
                    "dependsOn": ["1"],
                    "method": "patch",
                    "url": "/service/Employees(0)",
                    "headers": {"if-match": "$1"},
                    "body": {"Salary": 75000},
                },
            ]
        }
    )
    second = batch.graph.items[1]
    assert second.has_references
    answer = AnsweredItem(SubResponse(200, headers=(("ETag", 'W/"42"'),)))
    assert ("if-match", 'W/"42"') in resolve_references(second, {"1": answer}).headers
    with pytest.raises(ReferenceUnresolved, match="ETag"):
        resolve_references(second, {"1": AnsweredItem(SubResponse(200))})


@pytest.mark.parametrize(
    ("location", "rest", "expected"),
    [
        ("/orders/5", "", "/orders/5"),
        ("/orders/5", "/lines", "/orders/5/lines"),
        ("/orders/5/", "/lines", "/orders/5/lines"),
        ("/orders/5", "?x=1", "/orders/5?x=1"),
        ("/orders/5?v=2", "/lines", "/orders/5/lines?v=2"),
        ("/orders/5?v=2", "?x=1", "/orders/5?v=2&x=1"),
    ],
)
def test_reference_joins_location_and_rest(location: str, rest: str, expected: str) -> None:
    item = GraphItem("2", SubRequest("GET", f"$1{rest}"), ("1",), None, True)
    answer = AnsweredItem(SubResponse(201), location)
    assert resolve_references(item, {"1": answer}).target == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("Customers('ALFKI')", "/service/Customers('ALFKI')"),
        ("/other/Products?$top=2", "/other/Products?$top=2"),
        ("http://host/service/People(1)", "/service/People(1)"),
        ("HTTP://HOST/service/People(1)?a=b", "/service/People(1)?a=b"),
        ("$metadata", "/service/$metadata"),
        ("Customers%3A1", "/service/Customers%3A1"),
    ],
)
def test_request_urls_become_gateway_targets(url: str, expected: str) -> None:
    assert gateway_target(url, ROOT, "here") == expected


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://elsewhere/service/People(1)", ForbiddenTarget),
        ("https://host/service/People(1)", ForbiddenTarget),
        ("http://user@host/service", ForbiddenTarget),
        ("//host/service/People", ForbiddenTarget),
        ("People(1) x", MalformedBatch),
        ("a:b/c", MalformedBatch),
        ("/x#frag", MalformedBatch),
        ("", MalformedBatch),
    ],
)
def test_request_urls_refused(url: str, error: type[ClientError]) -> None:
    with pytest.raises(error):
        gateway_target(url, ROOT, "here")


def test_spec_response_example_encodes() -> None:
    """§19.5 example: all but the final query succeed; ids, statuses, lower-case headers, bodies."""
    batch = decode_json(SPEC_BATCH)
    result = GraphResult(
        items=(
            ("0", ok(200, b'{"CustomerID":"ALFKI"}', ("Content-Type", "application/json"))),
            ("1", ok(204)),
            (
                "2",
                ok(
                    201,
                    b'{"CustomerID":"POIUY"}',
                    ("Content-Type", "application/json"),
                    ("Location", "http://host/service.svc/Customer('POIUY')"),
                    ("Connection", "close"),
                ),
            ),
            ("3", ok(404, b"no such thing", ("Content-Type", "text/plain"))),
        ),
        groups=(("group1", BatchOutcome.COMMITTED),),
    )
    answer = json.loads(JSON.encode(batch, result))
    responses = answer["responses"]
    assert [r["id"] for r in responses] == ["0", "1", "2", "3"]
    assert [r["status"] for r in responses] == [200, 204, 201, 404]
    assert responses[0]["body"] == {"CustomerID": "ALFKI"}
    assert "body" not in responses[1]
    assert responses[2]["headers"] == {
        "content-type": "application/json",
        "location": "http://host/service.svc/Customer('POIUY')",
    }
    assert responses[3]["body"] == "no such thing"
    assert [r.get("atomicityGroup") for r in responses] == [None, "group1", "group1", None]


def test_binary_bodies_travel_as_base64url() -> None:
    batch = decode_json(
        {
            "requests": [
                {
                    "id": "a",
                    "method": "put",
                    "url": "Blobs(1)",
                    "headers": {"content-type": "image/png"},
                    "body": "_-8A",
                },
            ]
        }
    )
    assert batch.graph.items[0].request.body == b"\xff\xef\x00"
    result = GraphResult(items=(("a", ok(200, b"\xff\xfe", ("Content-Type", "image/png"))),))
    assert json.loads(JSON.encode(batch, result))["responses"][0]["body"] == "__4"


def test_failed_group_answers_424_for_its_other_members_and_dependents() -> None:
    batch = decode_json(SPEC_BATCH)
    result = GraphResult(
        items=(
            ("0", ok(200)),
            ("1", ItemResult(SubResponse(204), RollbackStatus.ROLLED_BACK)),
            (
                "2",
                ItemResult(
                    SubResponse(500, body=b'{"e":1}', headers=(("Content-Type", "application/json"),)),
                    RollbackStatus.FAILED,
                ),
            ),
            ("3", Unmet("request 2 failed", dependency="2")),
        ),
        groups=(("group1", BatchOutcome.ROLLED_BACK),),
    )
    responses = json.loads(JSON.encode(batch, result))["responses"]
    assert [r["status"] for r in responses] == [200, 424, 500, 424]
    assert responses[1]["headers"]["x-batch-item-status"] == "rolled_back"
    assert "rolled back" in responses[1]["body"]["error"]["message"]
    assert responses[1]["body"]["error"]["code"] == "FailedDependency"
    assert responses[2]["body"] == {"e": 1}
    assert responses[3]["body"]["error"]["message"] == "request 2 failed"


def test_rollback_failure_is_never_reported_as_done() -> None:
    batch = decode_json(SPEC_BATCH)
    result = GraphResult(
        items=(
            ("0", ok(200)),
            ("1", ItemResult(SubResponse(204), RollbackStatus.ROLLBACK_FAILED, "undo answered 500")),
            ("2", ItemResult(CallFailure(504, "timed out"), RollbackStatus.FAILED)),
            ("3", Unmet("group1 failed", dependency="group1")),
        ),
        groups=(("group1", BatchOutcome.ROLLBACK_INCOMPLETE),),
    )
    responses = json.loads(JSON.encode(batch, result))["responses"]
    assert [r["status"] for r in responses] == [200, 424, 504, 424]
    assert responses[1]["headers"]["x-batch-item-status"] == "rollback_failed"
    assert "NOT be rolled back" in responses[1]["body"]["error"]["message"]
    assert "incomplete" in responses[1]["body"]["error"]["message"]


def test_unresolved_reference_answers_400() -> None:
    batch = decode_json(
        {
            "requests": [
                {"id": "1", "method": "post", "url": "/o", "body": {}},
                {"id": "2", "dependsOn": ["1"], "method": "get", "url": "$1"},
            ]
        }
    )
    result = GraphResult(items=(("1", ok(201)), ("2", Unmet("no Location", unresolved=True))))
    second = json.loads(JSON.encode(batch, result))["responses"][1]
    assert second["status"] == 400 and second["body"]["error"]["code"] == "UnresolvedReference"


# --- JSON: bad input ----------------------------------------------------------------------------

GET = {"method": "get", "url": "/x"}


@pytest.mark.parametrize(
    ("requests", "where", "text"),
    [
        ([{"id": "1", **GET}, {"id": "1", **GET}], "/requests/1/id", "Duplicate"),
        ([{"id": "1", "dependsOn": ["2"], **GET}, {"id": "2", **GET}], "/requests/0/dependsOn/0", "forward"),
        ([{"id": "1", "dependsOn": ["nope"], **GET}], "/requests/0/dependsOn/0", "no earlier"),
        ([{"id": "1", "dependsOn": ["1"], **GET}], "/requests/0/dependsOn/0", "no earlier"),
        (
            [
                {"id": "1", "atomicityGroup": "g", **GET},
                {"id": "2", **GET},
                {"id": "3", "atomicityGroup": "g", **GET},
            ],
            "/requests/2/atomicityGroup",
            "adjacent",
        ),
        ([{"id": "1", **GET}, {"id": "2", "method": "get", "url": "$1/x"}], "/requests/1", "dependsOn"),
        (
            [{"id": "1", **GET}, {"id": "2", "dependsOn": ["1"], "method": "get", "url": "$9/x"}],
            "/requests/1/url",
            "no earlier request",
        ),
        (
            [
                {"id": "1", **GET},
                {"id": "2", "method": "patch", "url": "/x", "headers": {"if-match": "$1"}, "body": {}},
            ],
            "/requests/1",
            "dependsOn",
        ),
        ([{"id": "g", **GET}, {"id": "2", "atomicityGroup": "g", **GET}], "/requests/1/atomicityGroup", "id"),
        ([{"id": "1", "atomicityGroup": "g", **GET}, {"id": "g", **GET}], "/requests/1/id", "atomicityGroup"),
        (
            [{"id": "1", "atomicityGroup": "g", **GET}, {"id": "2", "dependsOn": ["1"], **GET}],
            "/requests/1/dependsOn/0",
            "name the group",
        ),
        ([{"id": "1", "atomicityGroup": "g", "dependsOn": ["g"], **GET}], "/requests/0/dependsOn/0", "own"),
        ([{"id": "1", "method": "trace", "url": "/x"}], "/requests/0/method", "method"),
        ([{"id": "1", "method": "get", "url": "/x", "body": {"a": 1}}], "/requests/0/body", "must not"),
        ([{"id": "1", "method": "get"}], "/requests/0/url", "url"),
        ([{"method": "get", "url": "/x"}], "/requests/0/id", "id"),
        ([{"id": "a b", **GET}], "/requests/0/id", "request-id"),
        ([{"id": "1", "if": "$0/$succeeded", **GET}], "/requests/0/if", "not supported"),
        (
            [{"id": "1", "method": "get", "url": "/x", "headers": {"A": "1", "a": "2"}}],
            "/requests/0/headers/a",
            "twice",
        ),
        (
            [{"id": "1", "method": "get", "url": "/x", "headers": {"Content-Length": "1"}}],
            "/requests/0/headers/Content-Length",
            "frames",
        ),
        (
            [{"id": "1", "method": "get", "url": "/x", "headers": {"X": "a\r\nB: c"}}],
            "/requests/0/headers/X",
            "CR, LF",
        ),
        (
            [
                {
                    "id": "1",
                    "method": "post",
                    "url": "/x",
                    "headers": {"content-type": "image/png"},
                    "body": "!!",
                }
            ],
            "/requests/0/body",
            "base64url",
        ),
        (
            [
                {
                    "id": "1",
                    "method": "post",
                    "url": "/x",
                    "headers": {"content-type": "text/plain"},
                    "body": 5,
                }
            ],
            "/requests/0/body",
            "string",
        ),
        ([{"id": "1", "method": "get", "url": "http://elsewhere/x"}], "/requests/0/url", "does not point"),
        ([], "/requests", "empty"),
        ([5], "/requests/0", "object"),
    ],
)
def test_bad_json_batches_are_refused_with_where(requests: list[Any], where: str, text: str) -> None:
    with pytest.raises(ClientError) as caught:
        decode_json({"requests": requests})
    assert caught.value.where == where
    assert text.lower() in caught.value.detail.lower()


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b"", "empty"),
        (b"[]", "object"),
        (b'{"requests": {}}', "array"),
        (b'{"requests": [], "extra": 1}', "unknown"),
        (b'{"requests": [{"id": "1", "id": "2"}]}', "duplicate"),
        (b"{not json", "not valid json"),
        (b"\xff", "utf-8"),
    ],
)
def test_malformed_json_documents(body: bytes, text: str) -> None:
    with pytest.raises(MalformedBatch, match=f"(?i){text}"):
        JSON.decode(body, ROOT)


def test_annotations_at_the_top_are_ignored() -> None:
    assert (
        len(
            JSON.decode(
                b'{"@a.b": 1, "requests": [{"id": "1", "method": "get", "url": "x"}]}', ROOT
            ).graph.items
        )
        == 1
    )


def test_json_limits() -> None:
    codec = ODataJsonCodec(BatchLimits(max_items=2, max_body_bytes=400))
    three = {"requests": [{"id": str(n), **GET} for n in range(3)]}
    with pytest.raises(PayloadTooLarge) as caught:
        codec.decode(json.dumps(three).encode(), ROOT)
    assert caught.value.where == "/requests/2" and caught.value.status == 413
    with pytest.raises(PayloadTooLarge):
        codec.decode(b" " * 401, ROOT)


# --- JSON: properties ---------------------------------------------------------------------------


@st.composite
def json_batches(draw: st.DrawFn) -> dict[str, Any]:
    """Valid batches: unique ids, adjacent groups, backward dependencies, `$id` references."""
    count = draw(st.integers(1, 12))
    requests: list[dict[str, Any]] = []
    group_of: dict[str, str | None] = {}
    group: str | None = None
    for n in range(count):
        item_id = f"r{n}"
        if draw(st.booleans()):
            group = draw(st.sampled_from([None, f"g{n}"])) if group is None or draw(st.booleans()) else group
        request: dict[str, Any] = {
            "id": item_id,
            "method": draw(st.sampled_from(["get", "POST", "Patch"])),
            "url": draw(st.sampled_from(["Orders", "/orders/1", "http://host/service/x"])),
        }
        if group is not None:
            request["atomicityGroup"] = group
        earlier = [e for e in group_of if group_of[e] is None or group_of[e] == group]
        deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if earlier else []
        if deps:
            request["dependsOn"] = deps
            if draw(st.booleans()):
                request["url"] = f"${deps[0]}/lines"
        if request["method"] != "get":
            request["body"] = draw(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
        requests.append(request)
        group_of[item_id] = group
    return {"requests": requests}


@FAST
@given(json_batches())
def test_valid_json_batches_decode(document: dict[str, Any]) -> None:
    batch = decode_json(document)
    assert [i.id for i in batch.graph.items] == [r["id"] for r in document["requests"]]
    for item in batch.graph.items:
        assert all(
            dep in [i.id for i in batch.graph.items[: batch.graph.items.index(item)]]
            for dep in item.depends_on
        )


@FAST
@given(st.binary(max_size=300))
def test_json_junk_only_ever_raises_client_errors(body: bytes) -> None:
    with contextlib.suppress(ClientError):
        JSON.decode(body, ROOT)


@FAST
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    ["id", "method", "url", "dependsOn", "atomicityGroup", "headers", "body", "x"]
                ),
                inner,
                max_size=5,
            )
        ),
        max_leaves=20,
    )
)
def test_json_shaped_junk_only_ever_raises_client_errors(value: object) -> None:
    with contextlib.suppress(ClientError):
        decode_json({"requests": value if isinstance(value, list) else [value]})


# --- multipart: the spec's examples -------------------------------------------------------------


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


SPEC_MULTIPART = crlf("""--batch_36522ad7-fc75-4b56-8c71-56071383e77b
Content-Type: application/http

GET /service/Customers('ALFKI')
Host: host


--batch_36522ad7-fc75-4b56-8c71-56071383e77b
Content-Type: multipart/mixed; boundary=changeset_77162fcd-b8da-41ac-a9f8-9357efbbd

--changeset_77162fcd-b8da-41ac-a9f8-9357efbbd
Content-Type: application/http
Content-ID: 1

POST /service/Customers HTTP/1.1
Host: host
Content-Type: application/json
Content-Length: 21

{"CustomerID":"NEW1"}
--changeset_77162fcd-b8da-41ac-a9f8-9357efbbd
Content-Type: application/http
Content-ID: 2

PATCH /service/Customers('ALFKI') HTTP/1.1
Host: host
Content-Type: application/json
If-Match: xxxxx
Prefer: return=minimal
Content-Length: 16

{"Name":"Alfie"}
--changeset_77162fcd-b8da-41ac-a9f8-9357efbbd--
--batch_36522ad7-fc75-4b56-8c71-56071383e77b
Content-Type: application/http

GET /service/Products HTTP/1.1
Host: host


--batch_36522ad7-fc75-4b56-8c71-56071383e77b--
""")
SPEC_TYPE = "multipart/mixed; boundary=batch_36522ad7-fc75-4b56-8c71-56071383e77b"

SPEC_REFERENCE = crlf("""--batch_36522ad7-fc75-4b56-8c71-56071383e77b
Content-Type: multipart/mixed; boundary=changeset_77162fcd-b8da-41ac-a9f8-9357efbbd

--changeset_77162fcd-b8da-41ac-a9f8-9357efbbd
Content-Type: application/http
Content-ID: 1

POST /service/Customers HTTP/1.1
Host: host
Content-Type: application/json

{"CustomerID":"NEW1"}
--changeset_77162fcd-b8da-41ac-a9f8-9357efbbd
Content-Type: application/http
Content-ID: 2

POST $1/Orders HTTP/1.1
Host: host
Content-Type: application/json

{"OrderID":1}
--changeset_77162fcd-b8da-41ac-a9f8-9357efbbd--
--batch_36522ad7-fc75-4b56-8c71-56071383e77b--
""")


def test_spec_multipart_example_decodes() -> None:
    batch = MULTIPART.decode(SPEC_MULTIPART, SPEC_TYPE, ROOT)
    items = batch.graph.items
    assert [i.request.method for i in items] == ["GET", "POST", "PATCH", "GET"]
    assert [i.request.target for i in items] == [
        "/service/Customers('ALFKI')",
        "/service/Customers",
        "/service/Customers('ALFKI')",
        "/service/Products",
    ]
    assert [i.group for i in items] == [None, "changeset-2", "changeset-2", None]
    assert [i.id for i in items] == ["part1", "1", "2", "part3"]
    assert items[1].request.body == b'{"CustomerID":"NEW1"}'
    assert items[0].request.body is None
    assert all(name.lower() != "host" for i in items for name, _ in i.request.headers)
    assert ("If-Match", "xxxxx") in items[2].request.headers
    assert batch.graph.sequential is True
    assert batch.graph.on_failure is FailurePolicy.STOP
    assert [e.content_ids for e in batch.entries] == [(None,), ("1", "2"), (None,)]


def test_spec_multipart_reference_example() -> None:
    batch = MULTIPART.decode(SPEC_REFERENCE, SPEC_TYPE, ROOT)
    second = batch.graph.items[1]
    assert second.depends_on == ("1",) and second.has_references
    assert second.request.target == "$1/Orders"
    answer = AnsweredItem(SubResponse(201), "/service/Customers('NEW1')")
    assert resolve_references(second, {"1": answer}).target == "/service/Customers('NEW1')/Orders"


def test_spec_multipart_etag_example_outside_change_sets() -> None:
    body = crlf("""--b
Content-Type: application/http
Content-ID: 1

GET /service/Employees(0) HTTP/1.1
Host: host
Accept: application/json


--b
Content-Type: application/http
Content-ID: 2

PATCH /service/Employees(0) HTTP/1.1
Host: host
Content-Type: application/json
If-Match: $1

{"Salary": 75000}
--b--
""")
    batch = MULTIPART.decode(body, "multipart/mixed; boundary=b", ROOT)
    second = batch.graph.items[1]
    assert second.depends_on == ("1",)
    answer = AnsweredItem(SubResponse(200, headers=(("ETag", '"v1"'),)))
    assert ("If-Match", '"v1"') in resolve_references(second, {"1": answer}).headers


def read_multipart(body: bytes, content_type: str) -> Message:
    return BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)


def parts_of(message: Message) -> list[Message]:
    return cast(list[Message], message.get_payload())


def http_of(part: Message) -> http.client.HTTPResponse:
    payload = cast(bytes, part.get_payload(decode=True))

    class Sock:
        def makefile(self, *args: object, **kwargs: object) -> io.BytesIO:
            return io.BytesIO(payload)

    response = http.client.HTTPResponse(Sock())  # type: ignore[arg-type]
    response.begin()
    return response


def test_spec_multipart_response_example() -> None:
    """All but the final query succeed: the change set answers as a nested multipart with the
    Content-IDs echoed (protocol §11.7.7.2 example)."""
    batch = MULTIPART.decode(SPEC_MULTIPART, SPEC_TYPE, ROOT)
    result = GraphResult(
        items=(
            ("part1", ok(200, b"{}", ("Content-Type", "application/json"))),
            ("1", ok(201, b"{}", ("Location", "http://host/service.svc/Customer('POIUY')"))),
            ("2", ok(204)),
            ("part3", ok(404, b"<error/>", ("Content-Type", "application/xml"))),
        ),
        groups=(("changeset-2", BatchOutcome.COMMITTED),),
    )
    body, content_type = MULTIPART.encode(batch, result)
    parts = parts_of(read_multipart(body, content_type))
    assert isinstance(parts, list) and len(parts) == 3
    assert http_of(parts[0]).status == 200
    changeset = parts_of(parts[1])
    assert parts[1].get_content_type() == "multipart/mixed"
    assert [p["Content-ID"] for p in changeset] == ["1", "2"]
    assert [http_of(p).status for p in changeset] == [201, 204]
    assert http_of(changeset[0]).getheader("Location") == "http://host/service.svc/Customer('POIUY')"
    last = http_of(parts[2])
    assert last.status == 404 and last.read() == b"<error/>"


def test_a_multipart_answer_is_framed_around_the_upstream_bodies_without_copying_them() -> None:
    """encode_chunks hands out a big body as the very bytes object the upstream sent (the answer
    of 20 x 10 MB grew peak RSS by +200 MiB when every part was copied twice), a body in the
    change set too, and the chunks read back as the same multipart answer."""
    batch = MULTIPART.decode(SPEC_MULTIPART, SPEC_TYPE, ROOT)
    big, other = bytes(range(256)) * 512, b"x" * 100_000
    result = GraphResult(
        items=(
            ("part1", ok(200, big, ("Content-Type", "application/octet-stream"))),
            ("1", ok(201, other)),
            ("2", ok(204)),
            ("part3", ok(200, b"small")),
        ),
        groups=(("changeset-2", BatchOutcome.COMMITTED),),
    )
    pieces, content_type = MULTIPART.encode_chunks(batch, result)
    chunks = list(pieces)
    assert any(chunk is big for chunk in chunks) and any(chunk is other for chunk in chunks)
    parts = parts_of(read_multipart(b"".join(chunks), content_type))
    assert isinstance(parts, list) and http_of(parts[0]).read() == big
    assert http_of(parts_of(parts[1])[0]).read() == other


def test_failed_change_set_is_one_error_part_and_stops_the_batch() -> None:
    batch = MULTIPART.decode(SPEC_MULTIPART, SPEC_TYPE, ROOT)
    result = GraphResult(
        items=(
            ("part1", ok(200)),
            ("1", ItemResult(SubResponse(201), RollbackStatus.ROLLED_BACK)),
            (
                "2",
                ItemResult(
                    SubResponse(412, body=b'{"why":"etag"}', headers=(("Content-Type", "application/json"),)),
                    RollbackStatus.FAILED,
                ),
            ),
            ("part3", Unmet("the batch stopped")),
        ),
        groups=(("changeset-2", BatchOutcome.ROLLED_BACK),),
    )
    body, content_type = MULTIPART.encode(batch, result)
    parts = parts_of(read_multipart(body, content_type))
    assert isinstance(parts, list) and len(parts) == 2  # the failed change set is the last part
    error_part = parts[1]
    assert error_part.get_content_type() == "application/http"
    assert error_part["Content-ID"] == "2" and error_part["X-Batch-Outcome"] == "rolled_back"
    response = http_of(error_part)
    assert response.status == 412
    error = json.loads(response.read())["error"]
    assert error["code"] and "2 failed" in error["message"] and error["innererror"]["body"] == {"why": "etag"}


def test_continue_on_error_answers_every_part() -> None:
    batch = MULTIPART.decode(SPEC_MULTIPART, SPEC_TYPE, ROOT, continue_on_error=True)
    assert batch.graph.on_failure is FailurePolicy.DEPENDENTS
    result = GraphResult(
        items=(("part1", ok(500)), ("1", ok(201)), ("2", ok(204)), ("part3", ok(200))),
        groups=(("changeset-2", BatchOutcome.COMMITTED),),
    )
    body, content_type = MULTIPART.encode(batch, result)
    parts = parts_of(read_multipart(body, content_type))
    assert isinstance(parts, list) and len(parts) == 3
    assert http_of(parts[0]).status == 500 and http_of(parts[2]).status == 200


def test_v2_change_sets_need_no_content_id_and_every_part_answers() -> None:
    body = crlf("""--batch_1
Content-Type: multipart/mixed;boundary=changeset_1

--changeset_1
Content-Type: application/http
Content-Transfer-Encoding:binary

POST Orders HTTP/1.1
Accept: application/json
Content-Type: application/json

{"Name": "a"}
--changeset_1--
--batch_1
Content-Type: application/http
Content-Transfer-Encoding:binary

GET Orders('1') HTTP/1.1
Accept: application/json


--batch_1--""")
    batch = MULTIPART.decode(body, "multipart/mixed;boundary=batch_1", ROOT, version=2)
    assert [i.request.target for i in batch.graph.items] == ["/service/Orders", "/service/Orders('1')"]
    assert batch.graph.on_failure is FailurePolicy.DEPENDENTS
    with pytest.raises(MalformedBatch, match="Content-ID"):
        MULTIPART.decode(body, "multipart/mixed;boundary=batch_1", ROOT, version=4)


@pytest.mark.parametrize(
    ("headers", "version"),
    [
        ((None, None, "2.0", "2.0"), 2),
        ((None, None, None, None), 2),
        (("4.0", None, None, None), 4),
        (("4.01", "4.01", None, None), 4),
        ((None, "4.0", None, None), 4),
        ((None, "4.0", None, "3.0"), 2),
    ],
)
def test_version_by_header(
    headers: tuple[str | None, str | None, str | None, str | None], version: int
) -> None:
    assert odata_version(*headers) == version


def part(request: str, content_id: str | None = None, content_type: str = "application/http") -> str:
    cid = f"Content-ID: {content_id}\n" if content_id is not None else ""
    return f"Content-Type: {content_type}\n{cid}\n{request}"


def changeset(boundary: str, *parts: str) -> str:
    inner = "".join(f"--{boundary}\n{p}\n" for p in parts) + f"--{boundary}--"
    return f"Content-Type: multipart/mixed; boundary={boundary}\n\n{inner}"


def batch_of(*parts: str) -> bytes:
    return crlf("".join(f"--b\n{p}\n" for p in parts) + "--b--\n")


GET_PART = part("GET /x HTTP/1.1\n\n")


@pytest.mark.parametrize(
    ("body", "error", "where", "text"),
    [
        (batch_of(changeset("cs", part("POST /x HTTP/1.1\n\n{}"))), MalformedBatch, "part 1.1", "Content-ID"),
        (
            batch_of(changeset("cs", changeset("inner", part("GET /x HTTP/1.1\n\n", "1")))),
            MalformedBatch,
            "part 1.1",
            "nested",
        ),
        (
            batch_of(
                changeset("cs", part("POST /x HTTP/1.1\n\n{}", "1"), part("POST /y HTTP/1.1\n\n{}", "1"))
            ),
            MalformedBatch,
            "part 1.2",
            "twice",
        ),
        (
            batch_of(part("GET /x HTTP/1.1\n\n", "1"), changeset("cs", part("POST /y HTTP/1.1\n\n{}", "1"))),
            MalformedBatch,
            "part 2.1",
            "twice",
        ),
        (
            batch_of(changeset("cs", part("POST $2/lines HTTP/1.1\n\n{}", "1"))),
            MalformedBatch,
            "part 1.1",
            "no earlier",
        ),
        (batch_of(part("GET /x HTTP/1.1\nIf-Match: $7\n\n")), MalformedBatch, "part 1", "no earlier"),
        (batch_of("Content-ID: 1\n\nGET /x HTTP/1.1\n\n"), MalformedBatch, "part 1", "Content-Type"),
        (
            batch_of(part("GET /x HTTP/1.1\n\n", content_type="application/json")),
            UnsupportedMediaType,
            "part 1",
            "application/http",
        ),
        (
            batch_of("Content-Type: application/http\nContent-Transfer-Encoding: base64\n\nR0VU"),
            UnsupportedMediaType,
            "part 1",
            "binary",
        ),
        (batch_of(part("GET\n\n")), MalformedBatch, "part 1", "request line"),
        (batch_of(part("GET /x HTTP/1.1 extra\n\n")), MalformedBatch, "part 1", "request line"),
        (batch_of(part("GET /x HTTP/1.1\nBad Header\n\n")), MalformedBatch, "part 1", "invalid"),
        (batch_of(part("GET http://elsewhere/x HTTP/1.1\n\n")), ForbiddenTarget, "part 1", "does not point"),
        (batch_of(changeset("cs")), MalformedBatch, "part 1", "no parts"),
        (batch_of(part("POST /x HTTP/1.1\nContent-Length: 9\n\n{}")), MalformedBatch, "part 1", "incomplete"),
        (batch_of(part("GET /x HTTP/1.1\n\n", "a b")), MalformedBatch, "part 1", "Content-ID"),
        (batch_of(part("GET /\u00e9 HTTP/1.1\n\n")), MalformedBatch, "part 1", "ASCII"),
    ],
)
def test_bad_multipart_batches_are_refused_with_where(
    body: bytes, error: type[ClientError], where: str, text: str
) -> None:
    with pytest.raises(error) as caught:
        MULTIPART.decode(body, "multipart/mixed; boundary=b", ROOT)
    assert caught.value.where == where
    assert text.lower() in caught.value.detail.lower()


def test_multipart_outer_problems() -> None:
    with pytest.raises(UnsupportedMediaType):
        MULTIPART.decode(batch_of(GET_PART), "application/json", ROOT)
    with pytest.raises(MalformedBatch, match="boundary"):
        MULTIPART.decode(batch_of(GET_PART), "multipart/mixed", ROOT)
    with pytest.raises(MalformedBatch, match="close delimiter"):
        MULTIPART.decode(batch_of(GET_PART)[:-8], "multipart/mixed; boundary=b", ROOT)


def test_multipart_limits() -> None:
    codec = ODataMultipartCodec(BatchLimits(max_items=2, max_body_bytes=500))
    inside = changeset("cs", *(part("POST /x HTTP/1.1\n\n{}", str(n)) for n in range(2)))
    with pytest.raises(PayloadTooLarge) as caught:
        codec.decode(batch_of(GET_PART, inside), "multipart/mixed; boundary=b", ROOT)
    assert caught.value.where == "part 2" and caught.value.status == 413
    with pytest.raises(PayloadTooLarge):
        codec.decode(batch_of(GET_PART, GET_PART, GET_PART), "multipart/mixed; boundary=b", ROOT)
    with pytest.raises(PayloadTooLarge):
        codec.decode(b"x" * 501, "multipart/mixed; boundary=b", ROOT)


def test_v2_repeated_content_ids_across_change_sets_get_their_own_ids() -> None:
    body = batch_of(
        changeset("c1", part("POST /o HTTP/1.1\n\n{}", "1"), part("POST $1/l HTTP/1.1\n\n{}", "2")),
        changeset("c2", part("POST /o HTTP/1.1\n\n{}", "1"), part("POST $1/l HTTP/1.1\n\n{}", "2")),
    )
    items = MULTIPART.decode(body, "multipart/mixed; boundary=b", ROOT, version=2).graph.items
    ids = [i.id for i in items]
    assert len(set(ids)) == 4
    assert items[3].depends_on == (ids[2],)  # the `$1` of its own change set
    assert items[3].request.target == f"${ids[2]}/l"


def test_content_id_in_the_embedded_request_headers_counts() -> None:
    body = batch_of(changeset("cs", part("POST /o HTTP/1.1\nContent-ID: 7\n\n{}")))
    item = MULTIPART.decode(body, "multipart/mixed; boundary=b", ROOT).graph.items[0]
    assert item.id == "7" and all(name.lower() != "content-id" for name, _ in item.request.headers)


# --- multipart: properties ----------------------------------------------------------------------


@st.composite
def multipart_batches(draw: st.DrawFn) -> tuple[bytes, int]:
    parts: list[str] = []
    requests = 0
    for n in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            size = draw(st.integers(1, 3))
            members = [
                part(f'POST Orders HTTP/1.1\nContent-Type: application/json\n\n{{"n": {m}}}', f"c{n}x{m}")
                for m in range(size)
            ]
            if size > 1 and draw(st.booleans()):
                members[-1] = part(f"PATCH $c{n}x0 HTTP/1.1\n\n{{}}", f"c{n}x{size - 1}")
            parts.append(changeset(f"cs{n}", *members))
            requests += size
        else:
            parts.append(part(f"GET Orders({n}) HTTP/1.1\nAccept: application/json\n\n"))
            requests += 1
    return batch_of(*parts), requests


@FAST
@given(multipart_batches())
def test_valid_multipart_batches_decode(generated: tuple[bytes, int]) -> None:
    body, count = generated
    batch = MULTIPART.decode(body, "multipart/mixed; boundary=b", ROOT)
    assert len(batch.graph.items) == count
    assert sum(len(entry.ids) for entry in batch.entries) == count


@FAST
@given(multipart_batches(), st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
def test_multipart_corruption_only_ever_raises_client_errors(
    generated: tuple[bytes, int], at: int, junk: bytes
) -> None:
    body, _ = generated
    at %= len(body)
    for broken in (body[:at] + junk + body[at:], body[:at], body[:at] + body[at + len(junk) :]):
        with contextlib.suppress(ClientError):
            MULTIPART.decode(broken, "multipart/mixed; boundary=b", ROOT)


@FAST
@given(st.binary(max_size=300))
def test_multipart_junk_only_ever_raises_client_errors(body: bytes) -> None:
    with contextlib.suppress(ClientError):
        MULTIPART.decode(b"--b\r\n" + body + b"\r\n--b--", "multipart/mixed; boundary=b", ROOT)
