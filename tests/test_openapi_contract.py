"""The OpenAPI document is the contract (issue 16): valid OpenAPI 3.1, generated from the code's own
definitions, every real answer of every endpoint valid against it, and schemathesis finding nothing.

Real answers come from a gateway over loopback with the demo upstreams; schemathesis runs its CLI
against `gateway demo` started as a process.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no types-jsonschema in the test deps
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.request.validators import V31RequestParametersValidator
from openapi_core.validation.response.validators import V31ResponseHeadersValidator
from openapi_spec_validator import validate as validate_spec
from schemathesis.generation.modes import GenerationMode

import gateway.app
from gateway.config import GatewayConfig
from gateway.demo.launcher import demo_config
from gateway.errors import ClientError, GatewayError
from gateway.formats._odata import ServiceRoot
from gateway.formats.composite_batch import CompositeBatchCodec, api_prefix
from gateway.formats.graph_batch import GraphBatchCodec, GraphSite
from gateway.formats.json_batch import JsonBatchCodec
from gateway.formats.multipart_batch import MultipartBatchCodec
from gateway.formats.odata_json import ODataJsonCodec
from gateway.formats.odata_multipart import ODataMultipartCodec
from gateway.graph_model import GraphBatch
from gateway.headers import REQUEST_ID_PATTERN, new_request_id
from gateway.model import BatchLimits
from gateway.openapi import BATCH_ERRORS, LOOKUP_ERRORS, NOT_PER_OPERATION, build_document, problem_types
from gateway.openapi_batch import target_pattern
from gateway.planning import OuterRequest, Planner
from gateway.routing import RouteTable, parse_target
from tests.conftest import MakeConfig, MakeGateway
from tests.schemathesis_hooks import _REPAIRS, multipart_parts, serialize_multipart_mixed
from tests.test_shutdown import free_port

Client = TestClient[web.Request, web.Application]
ROOT = Path(__file__).resolve().parent.parent
OTHER_ROUTES = {"routes": [
    {"prefix": "/", "upstream": "legacy"},
    {"prefix": "/orders", "upstream": "legacy", "methods": ["GET", "POST"]},
    {"prefix": "/accounts", "upstream": "ledger"},
]}


def _api(doc: dict[str, Any], *, heads_only: bool = False) -> OpenAPI:
    """openapi-core over the document, strict: a field the document does not list is an error.

    `heads_only`: parameters and headers, not bodies (openapi-core reads every multipart body as
    a form; multipart/mixed parts are checked with jsonschema instead, see `Checked`)."""
    config = Config(
        additional_properties_default_policy="forbid",
        extra_media_type_deserializers={"application/problem+json": _json},
    )
    if heads_only:
        config = Config(
            request_validator_cls=V31RequestParametersValidator,
            response_validator_cls=V31ResponseHeadersValidator,
        )
    return OpenAPI.from_dict(doc, config=config)


def _json(body: bytes, **parameters: str) -> Any:
    return json.loads(body)


# --- the document itself ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, OTHER_ROUTES, {"gateway": {"prefix": "/ops"}}],
                         ids=["demo", "root-and-method-routes", "prefix"])
def test_the_document_is_valid_openapi_3_1(make_config: MakeConfig, overrides: dict[str, Any]) -> None:
    doc = build_document(make_config(overrides))
    validate_spec(doc)  # the OpenAPI 3.1 meta-schema, and every $ref resolves
    assert doc["openapi"] == "3.1.0"


def test_a_broken_document_is_caught_by_the_meta_schema(make_config: MakeConfig) -> None:
    doc = build_document(make_config())
    doc["paths"]["/batch/v1"]["post"]["responses"]["200"].pop("description")
    with pytest.raises(Exception, match="description"):
        validate_spec(doc)


async def test_the_document_lists_exactly_the_gateway_s_routes(make_gateway: MakeGateway) -> None:
    """Every route app.py adds for the gateway's own endpoints is documented, and nothing else."""
    client = await make_gateway({"gateway": {"prefix": "/ops"}})
    async with client.get("/ops/openapi.json") as response:
        documented = {(path, method) for path, item in (await response.json())["paths"].items()
                      for method in item}
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in client.app.router.routes()
        if route.method in ("GET", "POST") and route.resource is not None
        and not route.resource.canonical.startswith("/{tail")
    }
    assert documented == routed


def test_the_request_id_pattern_is_the_one_the_middleware_applies() -> None:
    assert gateway.app._REQUEST_ID_RE.pattern == REQUEST_ID_PATTERN
    assert re.fullmatch(REQUEST_ID_PATTERN, new_request_id())


def test_every_problem_type_is_in_the_catalogue_and_the_readme(make_config: MakeConfig) -> None:
    doc = build_document(make_config())
    catalogue = {(p["type"], p["status"], p["title"]) for p in doc["x-problem-types"]}
    assert catalogue == {(p.type, p.status, p.title) for p in problem_types()}
    assert {status for _, status, _ in catalogue} >= {400, 404, 405, 408, 413, 415, 422, 431, 500,
                                                      502, 503, 504, 505}
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Problem types", 1)[1].split("\n## ", 1)[0]
    rows = [f"| {status} | `{t.rsplit('/', 1)[-1]}` | {title} |" for t, status, title in catalogue]
    missing = [row for row in rows if row not in section]
    assert not missing, f"rows missing from the README's Problem types table: {missing}"


# --- the document's patterns say what the code accepts ----------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_target_the_document_offers_is_routed(make_config: MakeConfig, data: st.DataObject) -> None:
    for config in (make_config(), make_config(OTHER_ROUTES)):
        target = data.draw(st.from_regex(target_pattern(config), fullmatch=True))
        parsed = parse_target(target, "/SingleItem/operation")  # raises ForbiddenTarget if refused
        RouteTable(config).route("GET", parsed, "/SingleItem/operation")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_item_the_document_offers_is_decoded(make_config: MakeConfig, data: st.DataObject) -> None:
    """The SingleItem schema (method, operation, headers) against the JSON codec and the router."""
    config: GatewayConfig = make_config()
    schemas = build_document(config)["components"]["schemas"]
    item = schemas["BatchRequestItem"]
    names = item["properties"]["headers"]["propertyNames"]
    method = data.draw(st.from_regex(item["properties"]["method"]["pattern"], fullmatch=True).filter(
        lambda m: not re.fullmatch(item["properties"]["method"]["not"]["pattern"], m)))
    name = data.draw(st.from_regex(names["pattern"], fullmatch=True).filter(
        lambda n: not re.fullmatch(names["not"]["pattern"], n)))
    value_pattern = item["properties"]["headers"]["additionalProperties"]["oneOf"][0]["pattern"]
    value = data.draw(st.from_regex(value_pattern, fullmatch=True))
    headers = data.draw(st.sampled_from([{name: value}, {name: [value, value]}, {}, None]))
    document = {"SingleItem": {"method": method, "operation": "/orders", "headers": headers}}
    jsonschema.validate(document["SingleItem"], {**item, "components": {}})
    JsonBatchCodec().decode(json.dumps(document).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_multipart_batch_the_document_offers_is_planned(
    make_config: MakeConfig, data: st.DataObject
) -> None:
    """Parts drawn from the document's part pattern, framed as schemathesis frames them: the
    multipart codec decodes them and the planner routes every call (nothing refused)."""
    config: GatewayConfig = make_config()
    operation = build_document(config)["paths"]["/v1/api/batch"]["post"]
    pattern = operation["requestBody"]["content"]["multipart/mixed"]["schema"]["items"]["pattern"]
    parts = data.draw(st.lists(st.from_regex(pattern, fullmatch=True), min_size=1, max_size=3))
    wire = serialize_multipart_mixed(None, parts)  # type: ignore[arg-type]
    batch = MultipartBatchCodec().decode(wire["data"], wire["headers"]["Content-Type"])
    outer = OuterRequest(headers=CIMultiDict(), raw_query="", client_ip=None, proto="http", host=None,
                         request_id="r")
    assert len(Planner(RouteTable(config)).plan(batch, outer).calls) == len(parts)


DEMO = demo_config("http://127.0.0.1:9", "http://127.0.0.1:9", port=8080, journal="unused.sqlite3")
DIALECT_PATHS = ("/v1.0/$batch", "/services/data/v59.0/composite", "/odata/$batch")


def _dialect_graph(path: str, case: Any) -> GraphBatch:
    """The case's batch as its endpoint decodes it (demo config)."""
    limits = BatchLimits(max_items=1000)
    if path == "/v1.0/$batch":
        return GraphBatchCodec(limits).decode(json.dumps(case.body).encode(), GraphSite.of(path))
    if path.endswith("/composite"):
        codec = CompositeBatchCodec(limits, prefix=api_prefix(path))
        return codec.decode(json.dumps(case.body).encode()).graph
    root = ServiceRoot.of(path)
    if case.media_type == "application/json":
        return ODataJsonCodec(limits).decode(json.dumps(case.body).encode(), root).graph
    wire = serialize_multipart_mixed(None, case.body)  # type: ignore[arg-type]
    content_type = wire["headers"]["Content-Type"]
    return ODataMultipartCodec(limits).decode(wire["data"], content_type, root, version=2).graph


@pytest.mark.parametrize("path", DIALECT_PATHS)
def test_every_dialect_batch_the_document_offers_is_planned(path: str) -> None:
    """Batches schemathesis draws from the document, made to obey the operation's `x-batch-rules`
    (the hook the CLI run uses): the dialect's codec decodes them and the planner routes every call
    (nothing refused). The rules are real: the raw draws are often refused (duplicate ids)."""
    operation = schemathesis.openapi.from_dict(build_document(DEMO))[path]["POST"]
    outer = OuterRequest(headers=CIMultiDict(), raw_query="", client_ip=None, proto="http", host=None,
                         request_id="r")
    planner = Planner(RouteTable(DEMO)).bind(outer)
    drawn: list[int] = []

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=GenerationMode.POSITIVE))  # map_case hook applied
    def planned(case: Any) -> None:
        graph = _dialect_graph(path, case)
        for position, item in enumerate(graph.items):
            if not item.has_references:
                planner.call(item.request, position)
        drawn.append(len(graph.items))

    planned()
    assert len(drawn) >= 50 and max(drawn) > 1


RULE_BREAKERS = {
    "/v1.0/$batch": {"requests": [
        {"id": "a", "method": "GET", "url": "/orders", "dependsOn": ["B"]},
        {"id": "A", "method": "GET", "url": "/orders"}, {"id": "b", "method": "GET", "url": "/orders"}]},
    "/services/data/v59.0/composite": {"compositeRequest": [
        {"method": "POST", "url": "/orders", "referenceId": "r", "body": {"x": "@{r.id}"}},
        {"method": "GET", "url": "/orders", "referenceId": "r"}]},
    "/odata/$batch": {"requests": [
        {"id": "g", "method": "get", "url": "/orders", "atomicityGroup": "x"},
        {"id": "h", "method": "get", "url": "/orders"},
        {"id": "x", "method": "get", "url": "/orders", "atomicityGroup": "x", "dependsOn": ["g", "zz"],
         "headers": {"A": "1", "a": "2"}}]},
}


@pytest.mark.parametrize("path", DIALECT_PATHS)
def test_the_hook_repairs_what_no_schema_states_and_nothing_else(path: str) -> None:
    """Each batch is schema-valid and refused for a cross-item rule (duplicate ids, a forward or
    unknown dependency, a reference, a group split up); the hook's repair makes it accepted."""
    operation = build_document(DEMO)["paths"][path]["post"]
    body = copy.deepcopy(RULE_BREAKERS[path])
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)
    case = SimpleNamespace(body=body, media_type="application/json")
    with pytest.raises(ClientError):
        _dialect_graph(path, case)
    _REPAIRS[operation["operationId"]](body)
    jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)
    assert len(_dialect_graph(path, case).items) == len(RULE_BREAKERS[path][next(iter(body))])


def test_a_route_s_methods_are_the_document_s(make_config: MakeConfig) -> None:
    config = make_config({"routes": [{"prefix": "/orders", "upstream": "legacy", "methods": ["GET"]},
                                      {"prefix": "/accounts", "upstream": "ledger"}]})
    schema = {"$ref": "#/components/schemas/BatchRequestItem", **build_document(config)}
    validator, routes = jsonschema.Draft202012Validator(schema), RouteTable(config)
    for method, target, routed in (("GET", "/orders/1", True), ("get", "/orders", True),
                                   ("DELETE", "/orders/1", False), ("DELETE", "/accounts/1", True)):
        assert validator.is_valid({"method": method, "operation": target}) == routed, (method, target)
        if not routed:
            with pytest.raises(ClientError):
                routes.route(method.upper(), parse_target(target), "w")


@pytest.mark.parametrize("max_depth", [1, 3, 8])
def test_the_document_s_nesting_limit_is_the_codec_s(make_config: MakeConfig, max_depth: int) -> None:
    config = make_config({"batch": {"limits": {"max_depth": max_depth}}})
    schema = {"$ref": "#/components/schemas/BatchRequest", **build_document(config)}
    codec = JsonBatchCodec(config.batch.limits.batch_limits())
    for depth in (max_depth, max_depth + 1):
        document: dict[str, Any] = {"SingleItem": {"method": "GET", "operation": "/orders"}}
        for _ in range(depth):
            document = {"Batch": {"batch_execution_type": "Serial", "items": [document]}}
        valid = jsonschema.Draft202012Validator(schema).is_valid(document)
        try:
            codec.decode(json.dumps(document).encode())
            accepted = True
        except ClientError:
            accepted = False
        assert valid == accepted == (depth <= max_depth), depth


def test_a_method_the_document_refuses_is_refused_by_the_gateway(make_config: MakeConfig) -> None:
    item = build_document(make_config())["components"]["schemas"]["BatchRequestItem"]
    for method in ("", "GET /", "tRaCe", "CONNECT"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"method": method, "operation": "/orders"}, item)
    for target in ("", "orders", "//evil.example/x", "/orders/../x", "/orders/%2e%2e/x", "/nowhere",
                   "/orders#x", "/orders/a b"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"method": "GET", "operation": target}, item)
        with pytest.raises(ClientError):
            RouteTable(make_config()).route("GET", parse_target(target, "w"), "w")


# --- real answers of every endpoint --------------------------------------------------------------


class Checked:
    """Sends real requests to the gateway and validates request and answer with openapi-core."""

    def __init__(self, client: Client, doc: dict[str, Any]) -> None:
        self.client, self.doc, self.api, self.heads = client, doc, _api(doc), _api(doc, heads_only=True)
        self.statuses: set[tuple[str, int]] = set()

    async def call(
        self, method: str, path: str, *, body: bytes | None = None, content_type: str = "application/json",
        headers: dict[str, str] | None = None, valid_request: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        sent = {**({"Content-Type": content_type} if body is not None else {}), **(headers or {})}
        async with self.client.request(method, path, data=body, headers=sent) as response:
            data, status, got = await response.read(), response.status, dict(response.headers)
        url_path, _, query = path.partition("?")
        args = dict(pair.split("=", 1) for pair in query.split("&")) if query else None
        request = MockRequest("http://gateway.test", method.lower(), url_path, args=args, headers=sent,
                              data=body, content_type=content_type)
        answer = MockResponse(data, status_code=status, headers=got,
                              content_type=got.get("Content-Type", ""))
        multipart = content_type.startswith("multipart/mixed") and body is not None
        if valid_request:
            (self.heads if multipart else self.api).validate_request(request)
        if multipart and valid_request:
            self._parts(body or b"", content_type, self._operation(url_path)["requestBody"])
        if got.get("Content-Type", "").startswith("multipart/mixed"):
            self.heads.validate_response(request, answer)
            self._parts(data, got["Content-Type"], self._operation(url_path)["responses"][str(status)])
        else:
            self.api.validate_response(request, answer)
        self._headers_documented(method, url_path, status, got)
        self.statuses.add((url_path, status))
        return status, got, data

    def _headers_documented(self, method: str, path: str, status: int, got: dict[str, str]) -> None:
        """openapi-core checks the documented headers; this, that the gateway sends no other."""
        template = next(t for t in self.doc["paths"]
                        if re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(t)), path))
        answer = self.doc["paths"][template][method.lower()]["responses"][str(status)]
        documented = {name.lower() for name in answer.get("headers", {})}
        assert {name.lower() for name in got} & GATEWAY_HEADERS <= documented, (path, status, got)

    def _operation(self, path: str) -> dict[str, Any]:
        operation: dict[str, Any] = self.doc["paths"][path]["post"]
        return operation

    @staticmethod
    def _parts(body: bytes, content_type: str, documented: dict[str, Any]) -> None:
        media = documented["content"]["multipart/mixed"]
        boundary = content_type.split("boundary=", 1)[1]
        assert re.fullmatch(media["x-media-type-parameters"]["boundary"]["pattern"], boundary)
        jsonschema.validate(multipart_parts(body, content_type), media["schema"],
                            cls=jsonschema.Draft202012Validator)


GATEWAY_HEADERS = {"x-request-id", "x-batch-id", "x-batch-outcome", "x-batch-groups", "allow",
                   "cache-control", "vary"}
"""The answer headers the gateway itself sets (the rest are aiohttp's framing and Date, Server)."""

JSON_BATCH = {"Batch": {"batch_execution_type": "Serial", "items": [
    {"SingleItem": {"method": "POST", "operation": "/orders", "body": {"item": "pen"},
                    "headers": {"X-Mine": ["1", "2"]}}},
    {"Batch": {"batch_execution_type": "Unordered", "items": [
        {"SingleItem": {"method": "GET", "operation": "/echo/a?x=1"}},
        {"SingleItem": {"method": "GET", "operation": "/accounts"}}]}},
    {"SingleItem": {"method": "GET", "operation": "/orders/404"}},
    {"SingleItem": {"method": "GET", "operation": "/orders"}},
]}}
ATOMIC_FAILING = {"Batch": {"batch_execution_type": "Serial", "items": [
    {"SingleItem": {"method": "POST", "operation": "/orders", "body": {"item": "ink"}}},
    {"SingleItem": {"method": "POST", "operation": "/accounts", "body": {"owner": "ann"}}},
    {"SingleItem": {"method": "GET", "operation": "/orders/404"}},
]}}
MULTIPART = (
    b"--b\r\nContent-Type: application/http\r\nContent-ID: <1>\r\n\r\n"
    b"POST /accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{\"owner\":\"bo\"}\r\n"
    b"--b\r\nContent-Type: application/http\r\n\r\nGET /orders/404 HTTP/1.1\r\n\r\n\r\n"
    b"--b\r\nContent-Type: application/http\r\n\r\nGET /accounts HTTP/1.1\r\n\r\n\r\n--b--\r\n"
)


async def _doc(client: Client, prefix: str = "/_gateway") -> dict[str, Any]:
    async with client.get(f"{prefix}/openapi.json") as response:
        doc: dict[str, Any] = await response.json()
        return doc


async def test_real_answers_of_the_batch_endpoints_match_the_document(gateway: Client) -> None:
    checked = Checked(gateway, await _doc(gateway))
    status, headers, data = await checked.call("POST", "/batch/v1", body=json.dumps(JSON_BATCH).encode())
    assert status == 200 and "X-Batch-Outcome" not in headers
    assert json.loads(data)["Batch"]["items"][3]["SingleItem"]["Skipped"]
    status, headers, data = await checked.call(
        "POST", "/batch/v1", body=json.dumps(ATOMIC_FAILING).encode(),
        headers={"X-Batch-Atomic": "true", "Authorization": "Bearer t1"})
    assert (status, headers["X-Batch-Outcome"]) == (200, "rolled_back")
    assert json.loads(data)["atomic"]["outcome"] == "rolled_back"
    committed = {"SingleItem": {"method": "POST", "operation": "/orders", "body": {"item": "ok"}}}
    status, headers, _ = await checked.call("POST", "/batch/v1", body=json.dumps(committed).encode(),
                                            headers={"X-Batch-Atomic": "yes"})
    assert (status, headers["X-Batch-Outcome"]) == (200, "committed")
    status, headers, data = await checked.call(
        "POST", "/v1/api/batch", body=MULTIPART, content_type="multipart/mixed; boundary=b",
        headers={"X-Batch-Atomic": "false"})
    assert status == 200 and len(multipart_parts(data, headers["Content-Type"])) == 3


ODATA_CHANGESET = (
    b"--batch\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n"
    b"--cs\r\nContent-Type: application/http\r\nContent-ID: 1\r\n\r\n"
    b"POST orders HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{\"item\":\"cup\"}\r\n"
    b"--cs\r\nContent-Type: application/http\r\nContent-ID: 2\r\n\r\n"
    b"GET $1 HTTP/1.1\r\n\r\n\r\n--cs--\r\n"
    b"--batch\r\nContent-Type: application/http\r\n\r\nGET /orders/404 HTTP/1.1\r\n\r\n\r\n--batch--\r\n"
)


async def test_real_answers_of_the_batch_dialects_match_the_document(gateway: Client) -> None:
    """Graph, Composite and OData (JSON, multipart V4 with a change set, V2) as the demo serves
    them: every answer, plain, atomic, failed and refused, is what the document says, strictly."""
    checked = Checked(gateway, await _doc(gateway))
    graph = {"requests": [
        {"id": "1", "method": "POST", "url": "/orders", "body": {"item": "pen"}},
        {"id": "2", "method": "GET", "url": "orders/404", "dependsOn": ["1"]},
        {"id": "3", "method": "GET", "url": "/accounts", "dependsOn": ["2"]},
    ]}
    status, _, data = await checked.call("POST", "/v1.0/$batch", body=json.dumps(graph).encode())
    assert status == 200 and [r["status"] for r in json.loads(data)["responses"]] == [201, 404, 424]
    status, headers, _ = await checked.call("POST", "/v1.0/$batch", body=json.dumps(graph).encode(),
                                            headers={"X-Batch-Atomic": "true"})
    assert (status, headers["X-Batch-Outcome"]) == (200, "rolled_back")
    composite = {"allOrNone": True, "compositeRequest": [
        {"method": "POST", "url": "/services/data/v59.0/orders", "referenceId": "order",
         "body": {"item": "ink"}},
        {"method": "GET", "url": "/orders/@{order.id}", "referenceId": "again"},
    ]}
    status, headers, data = await checked.call(
        "POST", "/services/data/v59.0/composite", body=json.dumps(composite).encode(), valid_request=False)
    assert (status, headers["X-Batch-Outcome"]) == (200, "committed"), data  # (a reference: not offered)
    odata = {"requests": [
        {"id": "a", "method": "post", "url": "orders", "body": {"item": "mug"}, "atomicityGroup": "g"},
        {"id": "b", "method": "get", "url": "/orders/404", "atomicityGroup": "g"},
        {"id": "c", "method": "get", "url": "/accounts", "dependsOn": ["g"]},
    ]}
    status, _, data = await checked.call("POST", "/odata/$batch", body=json.dumps(odata).encode(),
                                         headers={"Prefer": "continue-on-error"})
    assert status == 200 and [r["status"] for r in json.loads(data)["responses"]] == [424, 404, 424]
    multipart = "multipart/mixed; boundary=batch"
    status, _, data = await checked.call("POST", "/odata/$batch", body=ODATA_CHANGESET,
                                         content_type=multipart, headers={"OData-Version": "4.0"},
                                         valid_request=False)
    assert status == 200 and len(multipart_parts(data, checked_type(data))) == 2
    status, _, data = await checked.call("POST", "/odata/$batch", body=ODATA_CHANGESET,
                                         content_type=multipart, headers={"DataServiceVersion": "2.0"},
                                         valid_request=False)
    assert status == 202
    refusals = [
        ("/v1.0/$batch", b'{"requests": [{"id": "a", "method": "GET", "url": "/orders"}, '
                         b'{"id": "A", "method": "GET", "url": "/orders"}]}', "application/json", 400),
        ("/services/data/v59.0/composite", b'{"compositeRequest": []}', "application/json", 400),
        ("/odata/$batch", b'{"requests": [{"id": "a", "method": "get", "url": "$b"}]}', "application/json",
         400),
        ("/odata/$batch", json.dumps({"requests": [{"id": str(n), "method": "get", "url": "/orders"}
                                                   for n in range(101)]}).encode(), "application/json", 413),
        ("/odata/$batch", b"{}", "text/plain", 415),
        ("/v1.0/$batch", b"{}", "text/plain", 415),
    ]
    for path, body, content_type, expected in refusals:
        status, _, data = await checked.call("POST", path, body=body, content_type=content_type,
                                             valid_request=False)
        assert status == expected, (path, data)


def checked_type(data: bytes) -> str:
    """The boundary of a multipart answer, read from its first line (the test has no headers)."""
    return "multipart/mixed; boundary=" + data.split(b"\r\n", 1)[0][2:].decode()


async def test_real_problem_answers_match_the_document(make_gateway: MakeGateway) -> None:
    client = await make_gateway({"batch": {"limits": {"max_body_bytes": 400, "max_part_headers": 2}}})
    checked = Checked(client, await _doc(client))
    cases = [
        (400, b'{"SingleItem": {"method": "GET", "operation": "http://evil.example/x"}}', {}),
        (400, b'{"SingleItem": {"method": "", "operation": "/orders"}}', {}),
        (413, json.dumps({"SingleItem": {"method": "GET", "operation": "/", "body": "x" * 500}}).encode(),
         {}),
        (431, b'{"SingleItem": {"method": "GET", "operation": "/orders", "headers": {"A": "1", "B": "2", '
              b'"C": "3"}}}', {}),
        (422, b'{"SingleItem": {"method": "FROB", "operation": "/orders"}}', {"X-Batch-Atomic": "true"}),
    ]
    for expected, body, headers in cases:
        status, _, data = await checked.call("POST", "/batch/v1", body=body, headers=headers,
                                               valid_request=False)
        assert status == expected, data
    status, _, _ = await checked.call("POST", "/batch/v1", body=b"{}", content_type="text/plain",
                                      valid_request=False)
    assert status == 415
    status, _, _ = await checked.call("POST", "/v1/api/batch", body=b"--b--\r\n",
                                      content_type="multipart/form-data; boundary=b", valid_request=False)
    assert status == 415
    assert {s for _, s in checked.statuses} == {400, 413, 415, 422, 431}


async def test_a_405_is_a_documented_problem_with_allow(gateway: Client) -> None:
    doc = await _doc(gateway)
    problem = {**doc["components"]["schemas"]["Problem"], "components": doc["components"]}
    for path, allow in (("/batch/v1", "POST"), ("/_gateway/readyz", "GET, HEAD")):
        async with gateway.request("TRACE", path) as response:
            assert (response.status, response.headers["Allow"]) == (405, allow)
            body = await response.json()
        jsonschema.validate(body, problem)
        assert body["type"] in {p["type"] for p in doc["x-problem-types"] if p["status"] == 405}


async def test_every_undeclared_method_on_every_documented_path_is_405_with_allow(gateway: Client) -> None:
    """RFC 9110 section 15.5.6, on every path of the document: `Allow` lists the documented methods."""
    doc = await _doc(gateway)
    for template, item in doc["paths"].items():
        path = template.replace("{batch_id}", "b0123")
        declared = {method.upper() for method in item}
        allow = ", ".join(sorted(declared)) if "POST" in declared else "GET, HEAD"
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"} - declared):
            async with gateway.request(method, path) as response:
                assert (response.status, response.headers.get("Allow")) == (405, allow), (method, path)
                assert response.headers["X-Request-ID"]


async def test_real_answers_of_the_gateway_endpoints_match_the_document(gateway: Client) -> None:
    checked = Checked(gateway, await _doc(gateway))
    for name in ("healthz", "readyz", "metrics", "openapi.json"):
        status, _, _ = await checked.call("GET", f"/_gateway/{name}")
        assert status == 200, name
    atomic = {"SingleItem": {"method": "POST", "operation": "/accounts", "body": {"owner": "cy"}}}
    _, headers, _ = await checked.call(
        "POST", "/batch/v1", body=json.dumps(atomic).encode(),
        headers={"X-Batch-Atomic": "true", "Authorization": "Bearer t2", "X-Request-ID": "lookup-me"})
    owner = {"Authorization": "Bearer t2"}
    status, _, data = await checked.call("GET", f"/_gateway/batches/{headers['X-Batch-Id']}", headers=owner)
    assert (status, json.loads(data)["state"]) == (200, "committed")
    status, _, _ = await checked.call("GET", "/_gateway/batches?request_id=lookup-me", headers=owner)
    assert status == 200
    status, _, _ = await checked.call("GET", f"/_gateway/batches/{headers['X-Batch-Id']}")
    assert status == 404  # without credentials: the same 404 as an unknown batch
    status, _, _ = await checked.call("GET", f"/_gateway/batches/{headers['X-Batch-Id']}",
                                      headers={"Authorization": "Bearer someone-else"})
    assert status == 404


async def test_readyz_503_matches_the_document(make_gateway: MakeGateway) -> None:
    """A required upstream that is down: readyz answers 503 with the same documented body."""
    closed = f"http://127.0.0.1:{free_port()}"
    client = await make_gateway({"upstreams": {"legacy": {"url": closed,
                                                          "health": {"required": True, "failures": 1}}}})
    async with client.get("/orders") as response:
        assert response.status == 502
    checked = Checked(client, await _doc(client))
    status, _, data = await checked.call("GET", "/_gateway/readyz")
    assert status == 503 and json.loads(data)["upstreams"]["legacy"]["state"] == "down"


def test_an_undocumented_answer_field_fails_the_strict_validation(make_config: MakeConfig) -> None:
    """What makes the tests above able to fail: a field the document does not list is an error."""
    doc = build_document(make_config())
    request = MockRequest("http://gateway.test", "get", "/_gateway/healthz")
    answer = MockResponse(b'{"status": "ok", "uptime": 3}', headers={"X-Request-ID": "abc"})
    with pytest.raises(Exception, match="uptime"):
        _api(doc).validate_response(request, answer)


def test_every_gateway_error_class_is_catalogued_and_placed() -> None:
    """A new error class fails here until it is documented on the operations that answer with it
    (openapi.py BATCH_ERRORS, LOOKUP_ERRORS) or declared an answer of no operation."""
    catalogue = {(p.type, p.status) for p in problem_types()}
    placed = {*BATCH_ERRORS, *LOOKUP_ERRORS}
    stack: list[type[GatewayError]] = [GatewayError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("gateway."):
            assert (f"https://batch-gateway.dev/problems/{cls.type_suffix}", cls.status) in catalogue
            assert cls in placed or issubclass(cls, NOT_PER_OPERATION), cls


# --- schemathesis, every check, against a real gateway --------------------------------------------


SCHEMATHESIS_SEED = 1
SCHEMATHESIS_EXAMPLES = 25


def _wait_ready(base: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(150):
        if process.poll() is not None:
            raise AssertionError(f"gateway demo exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/_gateway/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("gateway demo did not become ready")


@pytest.mark.slow
def test_schemathesis_with_every_check_finds_nothing(tmp_path: Path) -> None:
    """`schemathesis run ... --checks all` against `gateway demo`: any failure fails the test."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "demo.log").open("wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port),
             "--journal", str(tmp_path / "journal.sqlite3")],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(base, demo)
        command = [
            str(Path(sys.executable).parent / "schemathesis"), "--config-file",
            str(ROOT / "tests" / "schemathesis.toml"), "run", f"{base}/_gateway/openapi.json",
            "--checks", "all", "--seed", str(SCHEMATHESIS_SEED), "--max-examples",
            str(SCHEMATHESIS_EXAMPLES), "--generation-database", "none", "--no-color",
            "--request-timeout", "10",
        ]
        # our `tests` package first: a test dependency (pyodata) installs a top-level `tests` too
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": path}
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        demo.terminate()
        demo.wait(timeout=30)
    summary = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert run.returncode == 0 and summary, run.stdout[-6000:] + run.stderr[-2000:]
    assert int(summary[1]) == int(summary[2]) > 100
    assert "10 selected / 10 total" in run.stdout  # the three dialects are in the demo


# --- found by the schemathesis runs --------------------------------------------------------------


async def test_a_call_whose_snapshot_path_is_refused_is_not_sent_and_the_batch_rolls_back(
    gateway: Client,
) -> None:
    """`/legacy//x` (a strip_prefix route) is a valid target, but its snapshot path `//x` is refused:
    the PUT was never sent, so the batch rolls back cleanly. It used to end `rollback_incomplete`,
    the PUT reported `maybe_executed` and `rollback_failed` ("no snapshot was taken")."""
    batch = {"Batch": {"batch_execution_type": "Serial", "items": [
        {"SingleItem": {"method": "POST", "operation": "/orders", "body": {"item": "a"}}},
        {"SingleItem": {"method": "PUT", "operation": "/legacy//x", "body": {"item": "b"}}},
    ]}}
    async with gateway.post("/batch/v1", json=batch, headers={"X-Batch-Atomic": "true"}) as response:
        assert response.status == 200
        answer = await response.json()
    put = answer["Batch"]["items"][1]["SingleItem"]["Result"]
    assert answer["atomic"]["outcome"] == "rolled_back", answer
    assert (put["status"], put["rollback"], put.get("maybe_executed")) == (502, "failed", None), put
    async with gateway.get("/orders") as response:
        assert await response.json() == []
