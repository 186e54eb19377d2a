"""The Grafana dashboard (examples/grafana/batch-gateway.json, issue 13) against the real exposition.

Fast, no bench run: the JSON is checked for what Grafana needs to import it (unique panel ids, grid
positions, a Prometheus target with an expression on every panel, the datasource variable), then a
real gateway serves a proxied request and a batch, and every metric the panels' PromQL names must
be in its /_gateway/metrics with the right type (`rate()` only over counters and histogram series),
and every label the queries group or filter by must be a label of that metric. The screenshot
script (bench/dashboard.py) must draw exactly the dashboard's panels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.metrics import MetricWrapperBase

from gateway.metrics import GatewayMetrics
from tests.conftest import MakeGateway

Client = TestClient[web.Request, web.Application]
DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana" / "batch-gateway.json"
METRIC = re.compile(r"\b((?:gateway|process|python)_[a-z_]+)\b")
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")
SELECTOR = re.compile(r"\b((?:gateway|process|python)_[a-z_]+)\{([^}]*)\}")
GROUPED = re.compile(r"\bby \(([^)]*)\) \((?:(?:rate|increase)\()?((?:gateway|process|python)_[a-z_]+)")
OVER_TIME = re.compile(r"\b(?:rate|increase)\(((?:gateway|process|python)_[a-z_]+)")
TARGET_LABELS = {"job", "instance"}
"""Added by Prometheus to every scraped series (the dashboard's filter variables)."""


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows too."""
    for item in items:
        yield item
        yield from panels(item.get("panels", []))


def expressions(document: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    found = [t["expr"] for p in panels(document["panels"]) for t in p.get("targets", [])]
    for variable in document["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


def family(name: str) -> str:
    """The metric family a series name belongs to: `x_bucket` -> `x` (a histogram's series)."""
    for suffix in HISTOGRAM_PARTS:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def declared_labels() -> dict[str, tuple[str, ...]]:
    """Each gateway metric's label names, as the exposition names it (counters end in `_total`)."""
    metrics = GatewayMetrics()
    labels: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            labels[name] = tuple(value._labelnames)
    return labels


def exposed_types(text: str) -> dict[str, str]:
    """`# TYPE name type` lines of an exposition: the families and their types."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


# --- the JSON is a dashboard Grafana can import --------------------------------------------------


def test_the_dashboard_is_importable_json_for_grafana() -> None:
    document = dashboard()
    assert document["uid"] and document["title"]
    assert 36 <= document["schemaVersion"] <= 41
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    every = list(panels(document["panels"]))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in every:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), panel["title"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                   for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not covered & cells, f"{panel['title']!r} overlaps another panel"
        cells |= covered
        assert panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel["targets"]
        assert targets, f"{panel['title']!r} has no targets"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["expr"].count("{") == target["expr"].count("}"), target["expr"]
    titles = [p["title"] for p in every if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles must be unique (the screenshot goes by title)"


def test_every_query_filters_by_the_job_and_instance_variables() -> None:
    for expr in expressions(dashboard()):
        if expr.startswith("label_values("):
            continue
        for name, matchers in SELECTOR.findall(expr):
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (name, expr)
        assert len(SELECTOR.findall(expr)) == len(METRIC.findall(expr)), f"a bare metric in {expr}"


def test_grouping_and_filter_labels_belong_to_their_metric() -> None:
    labels = declared_labels()
    checked = 0
    for expr in expressions(dashboard()):
        for name, matchers in SELECTOR.findall(expr):
            if family(name) in labels or name in labels:
                own = labels.get(name, labels.get(family(name), ()))
                used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)) - TARGET_LABELS
                assert used <= set(own), f"{name} has no label {used - set(own)} ({expr})"
                checked += 1
        for by, name in GROUPED.findall(expr):
            declared = labels.get(name, labels.get(family(name)))
            if declared is None:
                continue  # process_* series: no labels of the gateway's
            extra = {"le"} if name.endswith("_bucket") else set()
            grouped = {label.strip() for label in by.split(",") if label.strip()}
            assert grouped <= set(declared) | extra | TARGET_LABELS, f"{name} has no label {grouped} ({expr})"
    assert checked > 20


def test_the_screenshot_script_draws_every_panel() -> None:
    from bench.dashboard import PANELS, layout

    drawn = [panel.title for _, row in layout() for panel, _ in row]  # SystemExit if one is missing
    assert sorted(drawn) == sorted(panel.title for panel in PANELS)


# --- every metric it uses is in a real gateway's exposition --------------------------------------


async def test_every_metric_the_dashboard_uses_is_exposed(make_gateway: MakeGateway) -> None:
    client: Client = await make_gateway()
    async with client.get("/orders") as response:  # proxied to the legacy upstream
        assert response.status == 200
    document = {"Batch": {"batch_execution_type": "Unordered", "items": [
        {"SingleItem": {"method": "GET", "operation": "/echo/a"}},
        {"SingleItem": {"method": "GET", "operation": "/accounts"}},
    ]}}
    async with client.post("/batch/v1", json=document) as response:
        assert response.status == 200, await response.text()
    async with client.get("/_gateway/metrics") as response:
        assert response.status == 200
        text = await response.text()
    types = exposed_types(text)

    exprs = expressions(dashboard())
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert len(used) >= 20
    missing = sorted(name for name in used if family(name) not in types)
    assert not missing, f"the dashboard names metrics the gateway does not export: {missing}"
    for name in used:
        kind = types[family(name)]
        if name != family(name):
            assert kind == "histogram", f"{name}: {family(name)} is a {kind}, not a histogram"
        elif name.endswith("_total"):
            assert kind == "counter", f"{name} is a {kind}"
        else:
            assert kind != "histogram", f"{name} is a histogram: use its _bucket, _sum or _count"
    for expr in exprs:
        for name in OVER_TIME.findall(expr):
            kind = types[family(name)]
            assert kind == "counter" or (kind == "histogram" and name != family(name)), (
                f"rate()/increase() over {name}, a {kind}: {expr}"
            )
    # the two requests are there, under the labels the traffic panels group by
    assert re.search(r'^gateway_http_requests_total\{[^}]*kind="proxy"[^}]*upstream="legacy"', text, re.M)
    assert re.search(r'^gateway_http_requests_total\{[^}]*kind="batch_json"', text, re.M)
    assert re.search(r'^gateway_upstream_requests_total\{[^}]*purpose="subrequest"', text, re.M)


@pytest.mark.parametrize("name", ["gateway_upstream_up", "gateway_batch_subrequests_bucket"])
def test_the_checks_see_the_metrics_they_should(name: str) -> None:
    """The extraction finds gauges and histogram series (a regex that found nothing checks nothing)."""
    used = {n for expr in expressions(dashboard()) for n in METRIC.findall(expr)}
    assert name in used
