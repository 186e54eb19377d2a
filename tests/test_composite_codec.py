"""The Salesforce Composite codec and its reference resolver, pure: Salesforce's own Account-then-
Contact example, references in URLs and bodies, every bad input (with where), the answer shapes,
and hypothesis round trips and junk.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ClientError, ForbiddenTarget, MalformedBatch, PayloadTooLarge
from gateway.formats.composite_batch import (
    ALL_OR_NONE_GROUP,
    CompositeBatch,
    CompositeBatchCodec,
    api_prefix,
    resolve_references,
)
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
    Skipped,
    SubResponse,
)

PREFIX = "/services/data/v59.0"
CODEC = CompositeBatchCodec(prefix=PREFIX)


def decode(document: Any, codec: CompositeBatchCodec = CODEC, **kwargs: Any) -> CompositeBatch:
    return codec.decode(json.dumps(document).encode(), **kwargs)


def refused(document: Any, error: type[ClientError] = MalformedBatch) -> ClientError:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    with pytest.raises(error) as caught:
        CODEC.decode(body)
    assert caught.value.detail
    return caught.value


def answered(ref: str, body: Any, status: int = 201) -> dict[str, AnsweredItem]:
    response = SubResponse(
        status, headers=(("Content-Type", "application/json"),), body=json.dumps(body).encode()
    )
    return {ref: AnsweredItem(response)}


# --- Salesforce's example: an Account, then a Contact that refers to it ----------------------------

SALESFORCE_EXAMPLE = {
    "allOrNone": True,
    "compositeRequest": [
        {
            "method": "POST",
            "url": "/services/data/v59.0/sobjects/Account",
            "referenceId": "refAccount",
            "body": {"Name": "Sample Account"},
        },
        {
            "method": "POST",
            "url": "/services/data/v59.0/sobjects/Contact",
            "referenceId": "refContact",
            "body": {"LastName": "Sample Contact", "AccountId": "@{refAccount.id}"},
        },
    ],
}
ACCOUNT_ANSWER = {"id": "001R00000033I6AIAU", "success": True, "errors": []}


def test_the_salesforce_example_decodes_in_order_as_one_atomic_group() -> None:
    batch = decode(SALESFORCE_EXAMPLE)
    graph = batch.graph
    assert batch.all_or_none and graph.sequential and graph.on_failure is FailurePolicy.DEPENDENTS
    assert graph.resolver is not None
    resolved = graph.resolver(graph.items[1], answered("refAccount", ACCOUNT_ANSWER))
    assert resolved == resolve_references(graph.items[1], answered("refAccount", ACCOUNT_ANSWER))
    account, contact = graph.items
    assert (account.id, account.request.target, account.depends_on, account.has_references) == (
        "refAccount",
        "/sobjects/Account",
        (),
        False,
    )
    assert (contact.id, contact.request.target, contact.depends_on, contact.has_references) == (
        "refContact",
        "/sobjects/Contact",
        ("refAccount",),
        True,
    )
    assert {account.group, contact.group} == {ALL_OR_NONE_GROUP}
    assert account.request.headers == (("Content-Type", "application/json"),)


def test_the_contact_gets_the_account_id_from_the_account_s_answer() -> None:
    contact = decode(SALESFORCE_EXAMPLE).graph.items[1]
    request = resolve_references(contact, answered("refAccount", ACCOUNT_ANSWER))
    assert json.loads(request.body or b"") == {
        "LastName": "Sample Contact",
        "AccountId": "001R00000033I6AIAU",
    }
    assert request.target == "/sobjects/Contact" and request.method == "POST"


def test_the_salesforce_example_answers_in_its_response_shape() -> None:
    batch = decode(SALESFORCE_EXAMPLE)
    result = GraphResult(
        (
            (
                "refAccount",
                ItemResult(
                    SubResponse(
                        201,
                        headers=(
                            ("Location", "/sobjects/Account/001R00000033I6AIAU"),
                            ("Content-Type", "application/json"),
                        ),
                        body=json.dumps(ACCOUNT_ANSWER).encode(),
                    ),
                    RollbackStatus.EXECUTED,
                ),
            ),
            (
                "refContact",
                ItemResult(
                    SubResponse(
                        201,
                        headers=(("Content-Type", "application/json;charset=UTF-8"),),
                        body=b'{"id":"003R00000025REHIA2","success":true,"errors":[]}',
                    ),
                    RollbackStatus.EXECUTED,
                ),
            ),
        ),
        ((ALL_OR_NONE_GROUP, BatchOutcome.COMMITTED),),
    )
    document = json.loads(CODEC.encode(batch, result))
    assert document == {
        "compositeResponse": [
            {
                "body": ACCOUNT_ANSWER,
                "httpHeaders": {
                    "Location": "/sobjects/Account/001R00000033I6AIAU",
                    "Content-Type": "application/json",
                },
                "httpStatusCode": 201,
                "referenceId": "refAccount",
            },
            {
                "body": {"id": "003R00000025REHIA2", "success": True, "errors": []},
                "httpHeaders": {"Content-Type": "application/json;charset=UTF-8"},
                "httpStatusCode": 201,
                "referenceId": "refContact",
            },
        ]
    }


# --- references ----------------------------------------------------------------------------------


def test_references_into_arrays_and_urls_resolve_and_percent_encode_one_segment() -> None:
    batch = decode(
        {
            "compositeRequest": [
                {
                    "method": "GET",
                    "url": "/services/data/v59.0/query?q=SELECT+Id+FROM+Account",
                    "referenceId": "refList",
                },
                {
                    "method": "PATCH",
                    "url": "/sobjects/Account/@{refList.records[0].Id}?tag=@{refList.records[1].Name}",
                    "referenceId": "upd",
                    "body": {
                        "Name": "@{refList.records[1].Name} (copy)",
                        "N": "@{refList.totalSize}",
                        "Whole": ["@{refList.records[0]}"],
                    },
                },
            ]
        }
    )
    assert batch.graph.items[0].request.target == "/query?q=SELECT+Id+FROM+Account"
    listing = {"totalSize": 2, "records": [{"Id": "001A"}, {"Id": "001B", "Name": "a/b c&d"}]}
    request = resolve_references(batch.graph.items[1], answered("refList", listing, 200))
    assert request.target == "/sobjects/Account/001A?tag=a%2Fb%20c%26d"
    assert json.loads(request.body or b"") == {"Name": "a/b c&d (copy)", "N": 2, "Whole": [{"Id": "001A"}]}


def test_field_names_match_case_insensitively_when_unambiguous() -> None:
    item = decode(
        {
            "compositeRequest": [
                {"method": "POST", "url": "/orders", "referenceId": "order", "body": {}},
                {"method": "GET", "url": "/orders/@{order.ID}", "referenceId": "again"},
            ]
        }
    ).graph.items[1]
    assert resolve_references(item, answered("order", {"id": 7})).target == "/orders/7"
    with pytest.raises(ReferenceUnresolved):
        resolve_references(item, answered("order", {"id": 7, "Id": 8}))


@pytest.mark.parametrize(
    ("url", "body", "answer"),
    [
        ("/orders/@{order.missing}", None, {"id": 1}),
        ("/orders/@{order.lines[3].id}", None, {"lines": [{"id": 1}]}),
        ("/orders/@{order.id.more}", None, {"id": 1}),
        ("/orders/@{order.lines}", None, {"lines": [1]}),  # an array in a URL
        ("/orders/@{order.id}", None, {"id": None}),
        ("/orders", {"x": "@{order.nope}"}, {"id": 1}),
        ("/orders/@{order.id}", None, "not an object"),
    ],
)
def test_a_reference_path_that_resolves_to_nothing_is_unresolved(url: str, body: Any, answer: Any) -> None:
    second: dict[str, Any] = {"method": "POST" if body else "GET", "url": url, "referenceId": "next"}
    if body is not None:
        second["body"] = body
    item = decode(
        {
            "compositeRequest": [
                {"method": "POST", "url": "/orders", "referenceId": "order", "body": {}},
                second,
            ]
        }
    ).graph.items[1]
    with pytest.raises(ReferenceUnresolved) as caught:
        resolve_references(item, answered("order", answer))
    assert "order" in caught.value.detail


def test_a_reference_to_an_answer_that_is_not_json_is_unresolved() -> None:
    item = decode(
        {
            "compositeRequest": [
                {"method": "GET", "url": "/a", "referenceId": "a"},
                {"method": "GET", "url": "/b/@{a.id}", "referenceId": "b"},
            ]
        }
    ).graph.items[1]
    text = {"a": AnsweredItem(SubResponse(200, headers=(("Content-Type", "text/plain"),), body=b"id"))}
    with pytest.raises(ReferenceUnresolved):
        resolve_references(item, text)
    with pytest.raises(ReferenceUnresolved):
        resolve_references(item, {})


# --- prefixes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        ("/services/data/v59.0/composite", "/services/data/v59.0"),
        ("/services/data/v60.0/x/composite", "/services/data/v60.0"),
        ("/composite", ""),
        ("/legacy/composite", ""),
        ("/services/data/v59/composite", ""),
    ],
)
def test_the_api_prefix_is_stripped_only_when_the_endpoint_is_configured_under_one(
    path: str, prefix: str
) -> None:
    assert api_prefix(path) == prefix


def test_without_a_prefix_urls_are_gateway_targets_as_they_are() -> None:
    codec = CompositeBatchCodec()
    batch = decode({"compositeRequest": [{"method": "GET", "url": "/orders/1", "referenceId": "a"}]}, codec)
    assert batch.graph.items[0].request.target == "/orders/1"
    with pytest.raises(MalformedBatch):
        decode(
            {"compositeRequest": [{"method": "GET", "url": "/services/data/v59.0/x", "referenceId": "a"}]},
            codec,
        )


def test_atomic_from_the_endpoint_makes_one_group_without_all_or_none() -> None:
    document = {"compositeRequest": [{"method": "GET", "url": "/a", "referenceId": "a"}]}
    assert decode(document).graph.items[0].group is None
    batch = decode(document, atomic=True)
    assert batch.graph.items[0].group == ALL_OR_NONE_GROUP and not batch.all_or_none


# --- bad input -----------------------------------------------------------------------------------


def sub(**fields: Any) -> dict[str, Any]:
    return {"compositeRequest": [{"method": "GET", "url": "/a", "referenceId": "a", **fields}]}


TWO = [{"method": "GET", "url": "/a", "referenceId": "a"}]


@pytest.mark.parametrize(
    ("document", "where"),
    [
        (
            {"compositeRequest": [*TWO, {"method": "GET", "url": "/b", "referenceId": "a"}]},
            "/compositeRequest/1/referenceId",
        ),
        (
            {"compositeRequest": [*TWO, {"method": "GET", "url": "/b/@{nobody.id}", "referenceId": "b"}]},
            "/compositeRequest/1/url",
        ),
        (
            {
                "compositeRequest": [
                    {"method": "GET", "url": "/a/@{b.id}", "referenceId": "a"},
                    {"method": "GET", "url": "/b", "referenceId": "b"},
                ]
            },
            "/compositeRequest/0/url",
        ),
        (
            {"compositeRequest": [{"method": "GET", "url": "/a/@{a.id}", "referenceId": "a"}]},
            "/compositeRequest/0/url",
        ),
        (
            {
                "compositeRequest": [
                    *TWO,
                    {"method": "POST", "url": "/b", "referenceId": "b", "body": {"x": ["@{zz.id}"]}},
                ]
            },
            "/compositeRequest/1/body/x/0",
        ),
        (
            {"compositeRequest": [*TWO, {"method": "GET", "url": "/b/@{a}", "referenceId": "b"}]},
            "/compositeRequest/1/url",
        ),
        (
            {"compositeRequest": [*TWO, {"method": "GET", "url": "/b/@{a.}", "referenceId": "b"}]},
            "/compositeRequest/1/url",
        ),
        (
            {"compositeRequest": [*TWO, {"method": "GET", "url": "/b/@{a.x[y]}", "referenceId": "b"}]},
            "/compositeRequest/1/url",
        ),
        (sub(referenceId="has space"), "/compositeRequest/0/referenceId"),
        (sub(referenceId=""), "/compositeRequest/0/referenceId"),
        (sub(referenceId=5), "/compositeRequest/0/referenceId"),
        (sub(method="GET /"), "/compositeRequest/0/method"),
        (sub(method=None), "/compositeRequest/0/method"),
        (sub(url="sobjects/Account"), "/compositeRequest/0/url"),
        (sub(url=None), "/compositeRequest/0/url"),
        (sub(url="/a\nb"), "/compositeRequest/0/url"),
        (sub(url="/services/data/v58.0/sobjects"), "/compositeRequest/0/url"),
        (sub(httpHeaders={"X A": "1"}), "/compositeRequest/0/httpHeaders/X A"),
        (sub(httpHeaders={"X-A": ["1"]}), "/compositeRequest/0/httpHeaders/X-A"),
        (sub(httpHeaders="x"), "/compositeRequest/0/httpHeaders"),
        (
            sub(httpHeaders={"Transfer-Encoding": "chunked"}),
            "/compositeRequest/0/httpHeaders/Transfer-Encoding",
        ),
        (sub(body={"a": 1}, httpHeaders={"Content-Type": "text/plain"}), "/compositeRequest/0/body"),
        (sub(extra=1), "/compositeRequest/0/extra"),
        ({"compositeRequest": []}, "/compositeRequest"),
        ({"compositeRequest": "x"}, "/compositeRequest"),
        ({"allOrNone": True}, "/compositeRequest"),
        ({"allOrNone": "true", "compositeRequest": TWO}, "/allOrNone"),
        ({"collateSubrequests": 1, "compositeRequest": TWO}, "/collateSubrequests"),
        ({"compositeRequest": TWO, "graphs": []}, "/graphs"),
        ({"compositeRequest": [7]}, "/compositeRequest/0"),
        ([], "/"),
    ],
)
def test_bad_requests_are_refused_with_where(document: Any, where: str) -> None:
    assert refused(document).where == where


@pytest.mark.parametrize("url", ["https://evil.example/x", "//evil.example/x", "mailto:x@y"])
def test_absolute_urls_are_refused(url: str) -> None:
    assert refused(sub(url=url), ForbiddenTarget).where == "/compositeRequest/0/url"


def test_forward_and_unknown_references_say_which() -> None:
    forward = refused(
        {
            "compositeRequest": [
                {"method": "GET", "url": "/a/@{b.id}", "referenceId": "a"},
                {"method": "GET", "url": "/b", "referenceId": "b"},
            ]
        }
    )
    assert "later subrequest" in forward.detail
    unknown = refused(
        {"compositeRequest": [*TWO, {"method": "GET", "url": "/b/@{zz.id}", "referenceId": "b"}]}
    )
    assert "no referenceId" in unknown.detail


def test_more_than_twenty_five_subrequests_is_too_large() -> None:
    requests = [{"method": "GET", "url": "/a", "referenceId": f"r{n}"} for n in range(26)]
    error = refused({"compositeRequest": requests}, PayloadTooLarge)
    assert error.where == "/compositeRequest/25" and error.limit == "batch.composite.max_items"
    assert len(decode({"compositeRequest": requests[:25]}).graph.items) == 25
    with pytest.raises(PayloadTooLarge):
        decode({"compositeRequest": requests[:3]}, CompositeBatchCodec(BatchLimits(max_items=2)))


@pytest.mark.parametrize("body", [b"", b"{", b'{"compositeRequest": [1,]}', b"\xfe", b'{"a":1,"a":1}'])
def test_bodies_that_are_not_strict_json_are_refused(body: bytes) -> None:
    assert refused(body).where == "/"


# --- answers -------------------------------------------------------------------------------------

CHAIN = {
    "compositeRequest": [
        {"method": "POST", "url": "/orders", "referenceId": "order", "body": {"item": "pen"}},
        {"method": "POST", "url": "/orders/@{order.id}/lines", "referenceId": "line", "body": {"qty": 1}},
        {"method": "GET", "url": "/accounts", "referenceId": "accounts"},
        {"method": "GET", "url": "/echo", "referenceId": "echo"},
    ]
}


def answers_of(
    batch: CompositeBatch, *outcomes: ItemResult | Unmet, groups: tuple[tuple[str, BatchOutcome], ...] = ()
) -> list[dict[str, Any]]:
    result = GraphResult(tuple((i.id, o) for i, o in zip(batch.graph.items, outcomes, strict=True)), groups)
    document = json.loads(CODEC.encode(batch, result))
    for answer in document["compositeResponse"]:
        assert set(answer) == {"body", "httpHeaders", "httpStatusCode", "referenceId"}
    found: list[dict[str, Any]] = document["compositeResponse"]
    return found


def test_dependents_of_a_failure_answer_processing_halted() -> None:
    batch = decode(CHAIN)
    answers = answers_of(
        batch,
        ItemResult(
            SubResponse(
                400,
                headers=(("Content-Type", "application/json"),),
                body=b'[{"errorCode": "REQUIRED_FIELD_MISSING", "message": "x"}]',
            )
        ),
        Unmet("subrequest 'order' failed", dependency="order"),
        ItemResult(CallFailure(502, "upstream 'ledger' is unreachable")),
        Unmet("No value for @{order.id}", unresolved=True),
    )
    assert [a["referenceId"] for a in answers] == ["order", "line", "accounts", "echo"]
    assert [a["httpStatusCode"] for a in answers] == [400, 400, 502, 400]
    assert answers[0]["body"] == [{"errorCode": "REQUIRED_FIELD_MISSING", "message": "x"}]
    assert answers[1]["body"] == [{"errorCode": "PROCESSING_HALTED", "message": "subrequest 'order' failed"}]
    assert answers[2]["body"][0]["errorCode"] == "UPSTREAM_UNAVAILABLE"
    assert answers[3]["body"][0]["message"].startswith("Invalid reference specified.")


def test_all_or_none_after_rollback_halts_the_others_and_the_culprit_keeps_its_error() -> None:
    batch = decode({**CHAIN, "allOrNone": True})
    answers = answers_of(
        batch,
        ItemResult(SubResponse(201, body=b'{"id": 1}'), RollbackStatus.ROLLED_BACK),
        ItemResult(SubResponse(201, body=b'{"id": 2}'), RollbackStatus.ROLLBACK_FAILED, "DELETE gave 500"),
        ItemResult(SubResponse(409, body=b'{"error": "conflict"}'), RollbackStatus.FAILED),
        ItemResult(Skipped("not run"), RollbackStatus.SKIPPED),
        groups=((ALL_OR_NONE_GROUP, BatchOutcome.ROLLBACK_INCOMPLETE),),
    )
    assert [a["httpStatusCode"] for a in answers] == [400, 400, 409, 400]
    assert answers[0]["body"] == [
        {
            "errorCode": "PROCESSING_HALTED",
            "message": (
                "The transaction was rolled back since another operation in the same transaction failed."
            ),
        }
    ]
    assert "could NOT be rolled back (DELETE gave 500)" in answers[1]["body"][0]["message"]
    assert answers[1]["httpHeaders"] == {"X-Batch-Item-Status": "rollback_failed"}
    assert answers[2]["body"] == {"error": "conflict"}
    assert answers[3]["httpHeaders"] == {"X-Batch-Item-Status": "skipped"}


def test_non_json_answers_are_text_or_base64_and_empty_ones_null() -> None:
    batch = decode(CHAIN)
    answers = answers_of(
        batch,
        ItemResult(SubResponse(204)),
        ItemResult(SubResponse(200, headers=(("Content-Type", "text/plain"),), body=b"fine")),
        ItemResult(
            SubResponse(200, headers=(("Content-Type", "application/octet-stream"),), body=b"\xff\x00")
        ),
        ItemResult(SubResponse(200, headers=(("Content-Type", "application/json"),), body=b"{bad")),
    )
    assert [a["body"] for a in answers] == [None, "fine", "/wA=", "{bad"]


# --- properties ----------------------------------------------------------------------------------

_REF = st.text(st.characters(codec="ascii", categories=["L", "N"]) | st.just("_"), min_size=1, max_size=8)
_SEGMENT = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=6)
_FIELD = st.text(st.characters(codec="ascii", categories=["L"]), min_size=1, max_size=5)


@st.composite
def composites(draw: st.DrawFn) -> list[dict[str, Any]]:
    refs = draw(st.lists(_REF, min_size=1, max_size=25, unique=True))
    requests = []
    for n, ref in enumerate(refs):
        url = "/" + "/".join(draw(st.lists(_SEGMENT, min_size=1, max_size=3)))
        if n and draw(st.booleans()):
            url += f"/@{{{draw(st.sampled_from(refs[:n]))}.{draw(_FIELD)}}}"
        request: dict[str, Any] = {
            "method": draw(st.sampled_from(["GET", "POST", "PATCH", "DELETE"])),
            "url": PREFIX + url if draw(st.booleans()) else url,
            "referenceId": ref,
        }
        if draw(st.booleans()):
            request["body"] = {
                "plain": draw(st.integers()),
                **({"ref": f"@{{{refs[n - 1]}.{draw(_FIELD)}[0]}}"} if n else {}),
            }
        requests.append(request)
    return requests


@settings(max_examples=200, deadline=None)
@given(requests=composites(), all_or_none=st.booleans())
def test_random_valid_requests_round_trip_into_the_model(
    requests: list[dict[str, Any]], all_or_none: bool
) -> None:
    batch = decode({"allOrNone": all_or_none, "compositeRequest": requests})
    assert batch.all_or_none is all_or_none
    for item, request in zip(batch.graph.items, requests, strict=True):
        assert (item.id, item.request.method) == (request["referenceId"], request["method"])
        assert item.request.target == request["url"].removeprefix(PREFIX)
        texts = [request["url"], *(v for v in request.get("body", {}).values() if isinstance(v, str))]
        expected = [t.split("@{", 1)[1].split(".", 1)[0] for t in texts if "@{" in t]
        assert item.depends_on == tuple(dict.fromkeys(expected))
        assert item.has_references is bool(expected)
        assert item.group == (ALL_OR_NONE_GROUP if all_or_none else None)
        if "body" in request:
            assert json.loads(item.request.body or b"") == request["body"]


_JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.sampled_from(["GET", "/a", "@{a.id}", "/x/@{r.y[0]}", "@{", "a", PREFIX + "/x"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["compositeRequest", "allOrNone", "method", "url", "referenceId", "body", "httpHeaders", "x"]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(document=_JUNK)
def test_random_documents_never_raise_anything_but_a_client_error(document: Any) -> None:
    with contextlib.suppress(ClientError):
        CODEC.decode(json.dumps(document).encode())


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_a_client_error(body: bytes) -> None:
    with contextlib.suppress(ClientError):
        CODEC.decode(body)


@settings(max_examples=200, deadline=None)
@given(
    answer=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["id", "Id", "records", "x"]), inner, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_resolving_against_any_answer_gives_a_request_or_reference_unresolved(answer: Any) -> None:
    item = decode(
        {
            "compositeRequest": [
                {"method": "GET", "url": "/a", "referenceId": "a"},
                {
                    "method": "POST",
                    "url": "/b/@{a.id}",
                    "referenceId": "b",
                    "body": {"x": "@{a.records[0].Id}", "y": "v=@{a.x}"},
                },
            ]
        }
    ).graph.items[1]
    try:
        request = resolve_references(item, answered("a", answer, 200))
    except ReferenceUnresolved:
        return
    assert "@{" not in request.target
    json.loads(request.body or b"")


def test_references_may_not_grow_a_body_past_the_codec_s_limit_nor_a_url_past_8192_bytes() -> None:
    """The limit counts what the references add (each substitution, the same reference again
    too); under it the body is resolved as always."""
    codec = CompositeBatchCodec(BatchLimits(max_body_bytes=1000))
    answer = answered("a", {"text": "y" * 300})
    def item(body: object, url: str = "/orders") -> GraphItem:
        document = {"compositeRequest": [{"method": "GET", "url": "/orders", "referenceId": "a"},
                                         {"method": "POST", "url": url, "referenceId": "b", "body": body}]}
        return codec.decode(json.dumps(document).encode()).graph.items[1]
    graph_resolver = codec.decode(json.dumps({"compositeRequest": [
        {"method": "GET", "url": "/orders", "referenceId": "a"}]}).encode()).graph.resolver
    assert graph_resolver is not None
    assert json.loads(graph_resolver(item(["@{a.text}"] * 3), answer).body or b"") == ["y" * 300] * 3
    with pytest.raises(ReferenceUnresolved, match=r"limits\.max_body_bytes"):
        graph_resolver(item(["@{a.text}"] * 4), answer)
    with pytest.raises(ReferenceUnresolved, match=r"limits\.max_body_bytes"):
        graph_resolver(item(["x @{a.text} @{a.text} @{a.text} @{a.text}"]), answer)
    long_answer = answered("a", {"text": "z" * 9000})
    with pytest.raises(ReferenceUnresolved, match="over 8192"):
        graph_resolver(item(None, "/orders/@{a.text}"), long_answer)
