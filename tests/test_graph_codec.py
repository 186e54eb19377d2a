"""The Microsoft Graph JSON batching codec, pure: the Graph docs' own examples, every bad input the
codec refuses (with where), the answer shapes, and hypothesis round trips and junk.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ClientError, ForbiddenTarget, HeadersTooLarge, MalformedBatch, PayloadTooLarge
from gateway.formats._graph_answers import Base64Body, dump, iter_answer
from gateway.formats.graph_batch import ATOMIC_GROUP, DEFAULT_LIMITS, GraphBatchCodec, GraphSite
from gateway.graph_model import FailurePolicy, GraphBatch, GraphResult, Unmet
from gateway.model import (
    BatchLimits,
    BatchOutcome,
    CallFailure,
    ItemResult,
    RollbackStatus,
    Skipped,
    SubResponse,
)

CODEC = GraphBatchCodec()
SITE = GraphSite.of("/v1.0/$batch", ["http://gw.test:8080", "https://api.example.com"])


def decode(document: Any, site: GraphSite = SITE, **kwargs: Any) -> GraphBatch:
    return CODEC.decode(json.dumps(document).encode(), site, **kwargs)


def refused(document: Any, error: type[ClientError] = MalformedBatch, site: GraphSite = SITE) -> ClientError:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    with pytest.raises(error) as caught:
        CODEC.decode(body, site)
    assert caught.value.detail
    return caught.value


# --- the Graph docs' examples (learn.microsoft.com/graph/json-batching) --------------------------

DOCS_REQUEST = {
    "requests": [
        {"id": "1", "method": "GET", "url": "/me/drive/root:/{file}:/content"},
        {"id": "2", "method": "GET", "url": "/me/planner/tasks"},
        {"id": "3", "method": "GET", "url": "/groups/{id}/events"},
        {
            "id": "4",
            "url": "/me",
            "method": "PATCH",
            "body": {"city": "Redmond"},
            "headers": {"Content-Type": "application/json"},
        },
        {
            "id": "5",
            "url": "users?$select=id,displayName,userPrincipalName&$filter=city eq null&$count=true",
            "method": "GET",
            "headers": {"ConsistencyLevel": "eventual"},
        },
    ]
}
DOCS_SEQUENCED = {
    "requests": [
        {"id": "1", "method": "GET", "url": "/me/drive/root:/{file}:/content"},
        {"id": "2", "dependsOn": ["1"], "method": "GET", "url": "/me/planner/tasks"},
        {"id": "3", "dependsOn": ["2"], "method": "GET", "url": "/groups/{id}/events"},
        {
            "id": "4",
            "dependsOn": ["3"],
            "url": "/me",
            "method": "PATCH",
            "body": {"city": "Redmond"},
            "headers": {"Content-Type": "application/json"},
        },
    ]
}


def test_the_docs_batch_decodes_item_for_item() -> None:
    batch = decode(DOCS_REQUEST)
    assert [item.id for item in batch.items] == ["1", "2", "3", "4", "5"]
    assert not batch.sequential and batch.on_failure is FailurePolicy.DEPENDENTS
    assert all(item.depends_on == () and item.group is None for item in batch.items)
    four, five = batch.items[3].request, batch.items[4].request
    assert (four.method, four.target, json.loads(four.body or b"")) == ("PATCH", "/me", {"city": "Redmond"})
    assert four.headers == (("Content-Type", "application/json"),)
    assert (
        five.target == "/users?$select=id,displayName,userPrincipalName&$filter=city%20eq%20null&$count=true"
    )
    assert five.headers == (("ConsistencyLevel", "eventual"),) and five.body is None
    assert five.content_id == "5" and five.where == "/requests/4"


def test_the_docs_sequenced_batch_keeps_its_dependencies() -> None:
    batch = decode(DOCS_SEQUENCED)
    assert [item.depends_on for item in batch.items] == [(), ("1",), ("2",), ("3",)]


def test_depends_on_is_an_alias_msgraph_core_sends() -> None:
    batch = decode(
        {
            "requests": [
                {"id": "a", "method": "GET", "url": "/x"},
                {"id": "b", "method": "GET", "url": "/y", "depends_on": ["a"]},
            ]
        }
    )
    assert batch.items[1].depends_on == ("a",)


def test_dependencies_match_ids_case_insensitively_and_keep_the_declared_spelling() -> None:
    batch = decode(
        {
            "requests": [
                {"id": "First", "method": "GET", "url": "/x"},
                {"id": "b", "method": "GET", "url": "/y", "dependsOn": ["FIRST", "first"]},
            ]
        }
    )
    assert batch.items[1].depends_on == ("First",)


def test_atomic_puts_every_request_in_one_group() -> None:
    batch = decode(DOCS_REQUEST, atomic=True)
    assert {item.group for item in batch.items} == {ATOMIC_GROUP}


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://gw.test:8080/v1.0/orders/1?x=1", "/orders/1?x=1"),
        ("HTTPS://API.example.com/v1.0/orders", "/orders"),
        ("https://api.example.com:443/v1.0", "/"),
        ("orders/1", "/orders/1"),
        ("/orders/%2F", "/orders/%2F"),
    ],
)
def test_urls_become_gateway_targets(url: str, target: str) -> None:
    batch = decode({"requests": [{"id": "1", "method": "get", "url": url}]})
    assert batch.items[0].request.target == target
    assert batch.items[0].request.method == "GET"


def test_without_a_service_root_an_own_absolute_url_keeps_its_path() -> None:
    site = GraphSite.of("/$batch", ["http://gw.test"])
    batch = decode({"requests": [{"id": "1", "method": "GET", "url": "http://gw.test/orders"}]}, site)
    assert batch.items[0].request.target == "/orders"


@pytest.mark.parametrize(
    "url",
    [
        "https://graph.microsoft.com/v1.0/me",  # another host
        "http://gw.test:8081/v1.0/orders",  # another port
        "https://gw.test:8080/v1.0/orders",  # another scheme
        "http://gw.test:8080/beta/orders",  # not under the service root
        "http://gw.test:8080/v1.0x/orders",
        "http://user@gw.test:8080/v1.0/orders",
        "//gw.test:8080/v1.0/orders",
        "mailto:x@example.com",
        "ftp://gw.test:8080/v1.0/orders",
    ],
)
def test_foreign_absolute_urls_are_refused(url: str) -> None:
    error = refused({"requests": [{"id": "1", "method": "GET", "url": url}]}, ForbiddenTarget)
    assert error.where == "/requests/0/url"


def test_string_bodies_are_base64_under_their_content_type() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\xff"
    for text in (base64.b64encode(png).decode(), base64.urlsafe_b64encode(png).decode().rstrip("=")):
        batch = decode(
            {
                "requests": [
                    {
                        "id": "1",
                        "method": "PUT",
                        "url": "/photo",
                        "body": text,
                        "headers": {"Content-Type": "image/png"},
                    }
                ]
            }
        )
        assert batch.items[0].request.body == png
        assert batch.items[0].request.headers == (("Content-Type", "image/png"),)


def test_a_json_body_without_content_type_is_sent_as_json() -> None:
    batch = decode({"requests": [{"id": "1", "method": "POST", "url": "/orders", "body": [1, {"a": None}]}]})
    request = batch.items[0].request
    assert request.body == b'[1,{"a":null}]'
    assert request.headers == (("Content-Type", "application/json"),)


def test_header_lists_repeat_the_header() -> None:
    batch = decode({"requests": [{"id": "1", "method": "GET", "url": "/x", "headers": {"X-A": ["1", "2"]}}]})
    assert batch.items[0].request.headers == (("X-A", "1"), ("X-A", "2"))


# --- bad input -----------------------------------------------------------------------------------


def one(**fields: Any) -> dict[str, Any]:
    return {"requests": [{"id": "1", "method": "GET", "url": "/x", **fields}]}


@pytest.mark.parametrize(
    ("document", "where"),
    [
        (
            {
                "requests": [
                    {"id": "1", "method": "GET", "url": "/a"},
                    {"id": "1", "method": "GET", "url": "/b"},
                ]
            },
            "/requests/1/id",
        ),
        (
            {
                "requests": [
                    {"id": "ab", "method": "GET", "url": "/a"},
                    {"id": "AB", "method": "GET", "url": "/b"},
                ]
            },
            "/requests/1/id",
        ),
        (
            {
                "requests": [
                    {"id": "1", "method": "GET", "url": "/a", "dependsOn": ["2"]},
                    {"id": "2", "method": "GET", "url": "/b"},
                ]
            },
            "/requests/0/dependsOn/0",
        ),
        (
            {
                "requests": [
                    {"id": "1", "method": "GET", "url": "/a", "dependsOn": ["2"]},
                    {"id": "2", "method": "GET", "url": "/b", "dependsOn": ["1"]},
                ]
            },
            "/requests/0/dependsOn/0",
        ),
        (
            {"requests": [{"id": "1", "method": "GET", "url": "/a", "dependsOn": ["1"]}]},
            "/requests/0/dependsOn/0",
        ),
        (
            {"requests": [{"id": "1", "method": "GET", "url": "/a", "dependsOn": ["nope"]}]},
            "/requests/0/dependsOn/0",
        ),
        (
            {"requests": [{"id": "1", "method": "GET", "url": "/a", "dependsOn": "1"}]},
            "/requests/0/dependsOn",
        ),
        (
            {
                "requests": [
                    {"id": "a", "method": "GET", "url": "/a"},
                    {"id": "b", "method": "GET", "url": "/a", "dependsOn": ["a"], "depends_on": ["a"]},
                ]
            },
            "/requests/1/depends_on",
        ),
        ({"requests": [{"id": 1, "method": "GET", "url": "/a"}]}, "/requests/0/id"),
        ({"requests": [{"id": "", "method": "GET", "url": "/a"}]}, "/requests/0/id"),
        ({"requests": [{"id": "a\nb", "method": "GET", "url": "/a"}]}, "/requests/0/id"),
        ({"requests": [{"method": "GET", "url": "/a"}]}, "/requests/0/id"),
        (one(method=""), "/requests/0/method"),
        (one(method="GET /x"), "/requests/0/method"),
        (one(method=None), "/requests/0/method"),
        (one(url=None), "/requests/0/url"),
        (one(url=""), "/requests/0/url"),
        (one(url=7), "/requests/0/url"),
        (one(url="/a\r\nX: 1"), "/requests/0/url"),
        (one(url="/a#frag"), "/requests/0/url"),
        (one(headers=["X-A"]), "/requests/0/headers"),
        (one(headers={"X A": "1"}), "/requests/0/headers/X A"),
        (one(headers={"X-A": 1}), "/requests/0/headers/X-A"),
        (one(headers={"X-A": "1\r\nX-B: 2"}), "/requests/0/headers/X-A"),
        (one(headers={"Content-Length": "3"}), "/requests/0/headers/Content-Length"),
        (one(body="not base64!", headers={"Content-Type": "text/plain"}), "/requests/0/body"),
        (one(body="aGVsbG8="), "/requests/0/body"),
        (one(body={"a": 1}, headers={"Content-Type": "text/plain"}), "/requests/0/body"),
        (one(extra=1), "/requests/0/extra"),
        ({"requests": []}, "/requests"),
        ({"requests": {}}, "/requests"),
        ({}, "/requests"),
        ({"requests": [], "more": 1}, "/more"),
        ([], "/"),
        ({"requests": ["x"]}, "/requests/0"),
    ],
)
def test_bad_batches_are_refused_with_where(document: Any, where: str) -> None:
    assert refused(document).where == where


def test_cyclic_dependencies_are_named_as_forward_references() -> None:
    error = refused(
        {
            "requests": [
                {"id": "1", "method": "GET", "url": "/a", "dependsOn": ["2"]},
                {"id": "2", "method": "GET", "url": "/b", "dependsOn": ["1"]},
            ]
        }
    )
    assert "later request" in error.detail


@pytest.mark.parametrize(
    "body", [b"", b"  ", b"{", b'{"requests": [1,]}', b"\xff", b'{"a":1,"a":2}', b'{"requests": NaN}']
)
def test_bodies_that_are_not_strict_json_are_refused(body: bytes) -> None:
    assert refused(body).where == "/"


def test_more_than_twenty_requests_is_too_large() -> None:
    requests = [{"id": str(n), "method": "GET", "url": "/x"} for n in range(21)]
    error = refused({"requests": requests}, PayloadTooLarge)
    assert error.where == "/requests/20" and error.limit == "batch.graph.max_items"
    assert len(decode({"requests": requests[:20]}).items) == 20


def test_the_limit_follows_the_configured_maximum() -> None:
    codec = GraphBatchCodec(BatchLimits(max_items=2))
    body = json.dumps({"requests": [{"id": str(n), "method": "GET", "url": "/x"} for n in range(3)]})
    with pytest.raises(PayloadTooLarge):
        codec.decode(body.encode(), SITE)


def test_too_many_or_too_large_headers_are_431() -> None:
    codec = GraphBatchCodec(BatchLimits(max_part_headers=2))
    body = json.dumps(one(headers={"A": "1", "B": "2", "C": "3"})).encode()
    with pytest.raises(HeadersTooLarge):
        codec.decode(body, SITE)


def test_a_body_over_the_limit_is_too_large() -> None:
    codec = GraphBatchCodec(BatchLimits(max_body_bytes=50))
    with pytest.raises(PayloadTooLarge):
        codec.decode(json.dumps(one(body={"x": "y" * 60})).encode(), SITE)


# --- answers -------------------------------------------------------------------------------------


def encoded(
    batch: GraphBatch, *outcomes: ItemResult | Unmet, groups: tuple[tuple[str, BatchOutcome], ...] = ()
) -> list[dict[str, Any]]:
    result = GraphResult(tuple((item.id, o) for item, o in zip(batch.items, outcomes, strict=True)), groups)
    document = json.loads(CODEC.encode(batch, result))
    assert list(document) == ["responses"]
    for response in document["responses"]:
        assert set(response) == {"id", "status", "headers", "body"}  # always both headers and body
    answers: list[dict[str, Any]] = document["responses"]
    return answers


def test_answers_embed_json_base64_other_bodies_and_always_carry_headers_and_body() -> None:
    batch = decode(DOCS_SEQUENCED)
    answers = encoded(
        batch,
        ItemResult(
            SubResponse(
                302,
                headers=(
                    ("Location", "https://files.example/x"),
                    ("Connection", "close"),
                    ("Content-Length", "0"),
                ),
            )
        ),
        ItemResult(
            SubResponse(
                200, headers=(("Content-Type", "application/json"),), body=b'{"value": [{"id": "t1"}]}'
            )
        ),
        ItemResult(SubResponse(200, headers=(("Content-Type", "image/png"),), body=b"\x89PNG")),
        ItemResult(
            SubResponse(
                200,
                headers=(("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("set-cookie", "b=2")),
                body=b"hi",
            )
        ),
    )
    assert [a["id"] for a in answers] == ["1", "2", "3", "4"]
    assert answers[0] == {
        "id": "1",
        "status": 302,
        "headers": {"Location": "https://files.example/x"},
        "body": None,
    }
    assert answers[1]["body"] == {"value": [{"id": "t1"}]}
    assert base64.b64decode(answers[2]["body"]) == b"\x89PNG"
    assert answers[3]["headers"] == {"Content-Type": "text/plain", "Set-Cookie": "a=1, b=2"}
    assert base64.b64decode(answers[3]["body"]) == b"hi"


def test_unmet_items_answer_424_failed_dependency() -> None:
    batch = decode(DOCS_SEQUENCED)
    answers = encoded(
        batch,
        ItemResult(
            SubResponse(
                403,
                headers=(("Content-Type", "application/json"),),
                body=b'{"error": {"code": "Forbidden", "message": "no"}}',
            )
        ),
        Unmet("request 1 failed (403)", dependency="1"),
        Unmet("request 2 was not run", dependency="2"),
        ItemResult(CallFailure(504, "upstream 'x' timed out")),
    )
    assert [a["status"] for a in answers] == [403, 424, 424, 504]
    assert answers[0]["body"]["error"]["code"] == "Forbidden"
    assert answers[1]["body"] == {"error": {"code": "failed-dependency", "message": "request 1 failed (403)"}}
    assert answers[1]["headers"] == {"Content-Type": "application/json"}
    assert answers[3]["body"]["error"]["code"] == "upstream-timeout"


def test_a_rolled_back_atomic_batch_answers_424_for_the_others_and_its_own_error_for_the_culprit() -> None:
    batch = decode(DOCS_SEQUENCED, atomic=True)
    answers = encoded(
        batch,
        ItemResult(SubResponse(200, body=b"{}"), RollbackStatus.EXECUTED),
        ItemResult(SubResponse(201, body=b"{}"), RollbackStatus.ROLLED_BACK),
        ItemResult(SubResponse(500, body=b'{"error": "boom"}'), RollbackStatus.FAILED),
        ItemResult(Skipped("request 3 failed"), RollbackStatus.SKIPPED),
        groups=((ATOMIC_GROUP, BatchOutcome.ROLLED_BACK),),
    )
    assert [a["status"] for a in answers] == [424, 424, 500, 424]
    assert answers[1]["headers"]["X-Batch-Item-Status"] == "rolled_back"
    assert "rolled back" in answers[1]["body"]["error"]["message"]
    assert (
        answers[2]["body"] == {"error": "boom"} and answers[2]["headers"]["X-Batch-Item-Status"] == "failed"
    )
    assert answers[3]["headers"]["X-Batch-Item-Status"] == "skipped"


def test_a_committed_atomic_batch_answers_as_it_came() -> None:
    batch = decode(DOCS_SEQUENCED, atomic=True)
    ok = ItemResult(SubResponse(204), RollbackStatus.EXECUTED)
    answers = encoded(batch, ok, ok, ok, ok, groups=((ATOMIC_GROUP, BatchOutcome.COMMITTED),))
    assert [a["status"] for a in answers] == [204] * 4
    assert all(a["headers"] == {} for a in answers)


# --- properties ----------------------------------------------------------------------------------

_ID = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8)
_SEGMENT = st.text(
    st.characters(codec="ascii", categories=["L", "N"]) | st.sampled_from("-._~"), min_size=1, max_size=8
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def graph_batches(draw: st.DrawFn) -> list[dict[str, Any]]:
    ids = draw(st.lists(_ID, min_size=1, max_size=DEFAULT_LIMITS.max_items, unique_by=lambda i: i.casefold()))
    requests = []
    for n, item_id in enumerate(ids):
        request: dict[str, Any] = {
            "id": item_id,
            "method": draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"])),
            "url": "/" + "/".join(draw(st.lists(_SEGMENT, min_size=1, max_size=3))),
        }
        if n and draw(st.booleans()):
            request[draw(st.sampled_from(["dependsOn", "depends_on"]))] = draw(
                st.lists(st.sampled_from(ids[:n]), max_size=3)
            )
        if draw(st.booleans()):
            request["headers"] = draw(
                st.dictionaries(
                    st.sampled_from(["X-A", "X-B", "Accept"]),
                    st.text(st.characters(codec="ascii", min_codepoint=32), max_size=8),
                    max_size=2,
                )
            )
        body = draw(_JSON)
        if body is not None and not isinstance(body, str):
            request["body"] = body
        requests.append(request)
    return requests


@settings(max_examples=200, deadline=None)
@given(requests=graph_batches(), atomic=st.booleans())
def test_random_valid_batches_round_trip_into_the_model(requests: list[dict[str, Any]], atomic: bool) -> None:
    batch = decode({"requests": requests}, atomic=atomic)
    assert len(batch.items) == len(requests)
    for item, request in zip(batch.items, requests, strict=True):
        assert item.id == request["id"] and item.request.method == request["method"]
        assert item.request.target == request["url"]
        assert item.depends_on == tuple(
            dict.fromkeys(request.get("dependsOn", request.get("depends_on", [])))
        )
        assert item.group == (ATOMIC_GROUP if atomic else None)
        if "body" in request:
            assert json.loads(item.request.body or b"") == request["body"]
        else:
            assert item.request.body is None
        sent = dict(item.request.headers)
        for name, value in request.get("headers", {}).items():
            assert sent[name] == value


_JUNK_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.sampled_from(["GET", "/x", "1", "http://gw.test:8080/v1.0/x", "requests", "dependsOn"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["requests", "id", "method", "url", "headers", "body", "dependsOn", "depends_on", "x"]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(document=_JUNK_JSON)
def test_random_documents_never_raise_anything_but_a_client_error(document: Any) -> None:
    with contextlib.suppress(ClientError):
        CODEC.decode(json.dumps(document).encode(), SITE)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_a_client_error(body: bytes) -> None:
    with contextlib.suppress(ClientError):
        CODEC.decode(body, SITE)


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 2, 3, 49151, 49152, 49153, 102401]), min_size=1, max_size=4),
    urlsafe=st.booleans(),
    text=st.text(max_size=20),
)
def test_an_answer_written_piece_by_piece_is_byte_for_byte_the_whole_document(
    sizes: list[int], urlsafe: bool, text: str
) -> None:
    """iter_answer renders one response at a time and a Base64Body in 48 KiB slices (the dialect
    endpoints write big answers so); joined, the chunks are exactly `dump` of the document built
    whole, lone surrogates (U+FFFD) included."""
    data = [bytes(range(256)) * (size // 256) + b"\xff" * (size % 256) for size in sizes]
    responses = [{"id": str(n), "body": Base64Body(d, urlsafe=urlsafe), "note": text}
                 for n, d in enumerate(data)]
    responses.append({"id": "json", "body": {"a": [text, "\ud800"]}})

    def whole(body: object) -> object:
        if not isinstance(body, Base64Body):
            return body
        encoded = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(body.data).decode()
        return encoded.rstrip("=") if urlsafe else encoded

    chunks = list(iter_answer("responses", iter(responses)))
    document = {"responses": [{k: whole(v) for k, v in r.items()} for r in responses]}
    assert b"".join(chunks) == dump(document)
    assert all(Base64Body(d, urlsafe=urlsafe).text() == whole(Base64Body(d, urlsafe=urlsafe)) for d in data)
    if sum(sizes) > 70_000:
        assert len(chunks) > 1
