"""Real OData clients against the gateway's `$batch` on loopback: pyodata's V2 batch with a change set.

A small OData V2 service (a `$metadata` document and an `Orders` entity set speaking V2 JSON,
`{"d": ...}`) runs as an aiohttp upstream behind a gateway route; pyodata's `Client` fetches the
metadata through the gateway's proxy and posts its `$batch` to the gateway (in a thread: pyodata
uses `requests`, which blocks), so the multipart it writes and the one it parses are its own.

office365-rest-python-client's `execute_batch` (3.3.0, read for this) is not exercised. Its OData
batches are SharePoint's (`ODataBatchV3Request` to `{site}/_api/$batch`): before a batch it must get
a form digest from `/_api/contextinfo`, it reads answers into SharePoint's entity model, and its
reader takes only the top-level `application/http` parts of the answer: it skips the nested
change-set multipart that OData prescribes (and the gateway sends), because SharePoint answers change
sets flat. Pointing it at the gateway would test an imitation of SharePoint's deviations, not the
gateway; its Graph `execute_batch` speaks Graph JSON batching (the Graph dialect's tests).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import MakeConfig

pyodata = pytest.importorskip("pyodata")
requests = pytest.importorskip("requests")
HttpError = pytest.importorskip("pyodata.exceptions").HttpError

Client = TestClient[web.Request, web.Application]
SERVICE = "/svc"

METADATA = """<?xml version="1.0" encoding="utf-8"?>
<edmx:Edmx Version="1.0" xmlns:edmx="http://schemas.microsoft.com/ado/2007/06/edmx"
    xmlns:m="http://schemas.microsoft.com/ado/2007/08/dataservices/metadata">
  <edmx:DataServices m:DataServiceVersion="2.0">
    <Schema Namespace="Shop" xmlns="http://schemas.microsoft.com/ado/2008/09/edm">
      <EntityType Name="Order">
        <Key><PropertyRef Name="Id"/></Key>
        <Property Name="Id" Type="Edm.String" Nullable="false"/>
        <Property Name="Item" Type="Edm.String"/>
      </EntityType>
      <EntityContainer Name="ShopContainer" m:IsDefaultEntityContainer="true">
        <EntitySet Name="Orders" EntityType="Shop.Order"/>
      </EntityContainer>
    </Schema>
  </edmx:DataServices>
</edmx:Edmx>
"""

ORDERS: web.AppKey[dict[str, Any]] = web.AppKey("orders")
CALLS: web.AppKey[list[tuple[str, str]]] = web.AppKey("calls")


def odata_v2_app() -> web.Application:
    """`$metadata`, POST/GET/DELETE on `Orders`; an `Item` of "fail" is refused with 400."""

    async def metadata(request: web.Request) -> web.Response:
        return web.Response(text=METADATA, content_type="application/xml")

    async def create(request: web.Request) -> web.Response:
        request.app[CALLS].append(("POST", request.path))
        data = await request.json()
        if data.get("Item") == "fail":
            return web.json_response(
                {"error": {"code": "BAD", "message": {"lang": "en", "value": "no"}}}, status=400
            )
        request.app[ORDERS][data["Id"]] = data
        location = f"{SERVICE}/Orders('{data['Id']}')"
        return web.json_response({"d": data}, status=201, headers={"Location": location})

    async def read(request: web.Request) -> web.Response:
        order = request.app[ORDERS].get(request.match_info["key"])
        if order is None:
            return web.json_response(
                {"error": {"code": "404", "message": {"lang": "en", "value": "none"}}}, status=404
            )
        return web.json_response({"d": order})

    async def delete(request: web.Request) -> web.Response:
        request.app[CALLS].append(("DELETE", request.path))
        request.app[ORDERS].pop(request.match_info["key"], None)
        return web.Response(status=204)

    app = web.Application()
    app[ORDERS] = {}
    app[CALLS] = []
    entity = SERVICE + "/Orders('{key}')"
    app.add_routes(
        [
            web.get(f"{SERVICE}/$metadata", metadata),
            web.post(f"{SERVICE}/Orders", create),
            web.get(entity, read),
            web.delete(entity, delete),
        ]
    )
    return app


def orders_of(server: TestServer) -> dict[str, Any]:
    return server.app[ORDERS]


@pytest.fixture
async def odata_upstream(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(odata_v2_app())
    return server


@pytest.fixture
async def gw(aiohttp_client: Any, make_config: MakeConfig, odata_upstream: TestServer) -> Client:
    from gateway.app import create_app

    config = make_config(
        {
            "upstreams": {"odata": {"url": str(odata_upstream.make_url("")).rstrip("/")}},
            "routes": [{"prefix": SERVICE, "upstream": "odata"}, {"prefix": "/orders", "upstream": "legacy"}],
            "batch": {"odata": {"path": f"{SERVICE}/$batch"}},
        }
    )
    client: Client = await aiohttp_client(create_app(config))
    return client


def _service(base_url: str) -> Any:
    session = requests.Session()
    return pyodata.Client(base_url, session)


def _batch_with_change_set(service: Any, *orders: dict[str, str], read: str | None = None) -> list[Any]:
    batch = service.create_batch()
    changeset = service.create_changeset()
    for order in orders:
        changeset.add_request(service.entity_sets.Orders.create_entity().set(**order))
    batch.add_request(changeset)
    if read is not None:
        batch.add_request(service.entity_sets.Orders.get_entity(read))
    result: list[Any] = batch.execute()
    return result


async def test_pyodata_v2_batch_with_a_change_set(gw: Client, odata_upstream: TestServer) -> None:
    service = await asyncio.to_thread(_service, str(gw.make_url(SERVICE + "/")))
    result = await asyncio.to_thread(
        _batch_with_change_set, service, {"Id": "1", "Item": "book"}, {"Id": "2", "Item": "pen"}
    )
    created = result[0]
    assert [order.Id for order in created] == ["1", "2"]
    assert [order.Item for order in created] == ["book", "pen"]
    assert set(orders_of(odata_upstream)) == {"1", "2"}


async def test_pyodata_reads_in_the_same_batch(gw: Client, odata_upstream: TestServer) -> None:
    orders_of(odata_upstream)["7"] = {"Id": "7", "Item": "lamp"}
    service = await asyncio.to_thread(_service, str(gw.make_url(SERVICE + "/")))
    result = await asyncio.to_thread(_batch_with_change_set, service, {"Id": "3", "Item": "cup"}, read="7")
    assert result[0][0].Item == "cup"
    assert result[1].Item == "lamp"


async def test_pyodata_failed_change_set_is_rolled_back_and_reported(
    gw: Client, odata_upstream: TestServer
) -> None:
    service = await asyncio.to_thread(_service, str(gw.make_url(SERVICE + "/")))
    with pytest.raises(HttpError) as caught:
        await asyncio.to_thread(
            _batch_with_change_set, service, {"Id": "1", "Item": "book"}, {"Id": "2", "Item": "fail"}
        )
    assert caught.value.response.status_code == 400  # pyodata: "single response received"
    error = json.loads(caught.value.response.content)["error"]
    assert "change set failed" in error["message"]["value"]
    assert orders_of(odata_upstream) == {}  # the first create was undone by the gateway
    assert ("DELETE", "/svc/Orders('1')") in odata_upstream.app[CALLS]
