"""Compensation and transaction templates are compiled and checked at config load (issue 9, finding 6):
a bad match path or a placeholder naming nothing is a ConfigError with its key path, not a 500 later.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.atomicity import templates
from gateway.config import GatewayConfig, load_config, parse_config
from gateway.demo.launcher import demo_config_data
from gateway.errors import ConfigError

Data = dict[str, Any]
ROOT = Path(__file__).parent.parent
UNDO = {"method": "POST", "path": "/orders/{path.id}/reopen"}
TX = {
    "begin": {"method": "POST", "path": "/tx"},
    "token": {"json_field": "token"},
    "commit": {"method": "POST", "path": "/tx/{token}/commit"},
    "rollback": {"method": "POST", "path": "/tx/{token}/rollback"},
}


def config(*rules: Data, transactions: Data | None = None) -> Data:
    """Two upstreams: `legacy` with these compensation rules, `ledger` with these transactions."""
    return {
        "upstreams": {
            "legacy": {"url": "http://127.0.0.1:9001", "compensations": list(rules)},
            "ledger": {"url": "http://127.0.0.1:9002", "transactions": transactions or TX},
        },
        "routes": [
            {"prefix": "/orders", "upstream": "legacy"},
            {"prefix": "/tx", "upstream": "ledger"},
        ],
    }


def rule(path: str = "/orders/{id}/cancel", undo: Data = UNDO, snapshot: Data | None = None) -> Data:
    data: Data = {"method": "POST", "path": path, "undo": undo}
    if snapshot is not None:
        data["snapshot"] = snapshot
    return data


def tx(**calls: Data) -> Data:
    return {**TX, **calls}


@dataclass(frozen=True)
class Bad:
    kind: str
    data: Data
    key_path: str
    problem: str
    """A fragment the problem must contain."""


RULE = "upstreams.legacy.compensations.0"
TXS = "upstreams.ledger.transactions"
BAD = [
    Bad(
        "a parameter named twice",
        config(rule("/orders/{id}/x/{id}")),
        f"{RULE}.path",
        "{id} appears twice in '/orders/{id}/x/{id}'",
    ),
    Bad("a stray {", config(rule("/orders/{id")), f"{RULE}.path", "stray '{' at character 9 of"),
    Bad("a stray }", config(rule("/orders/id}")), f"{RULE}.path", "stray '}' at character 11 of"),
    Bad(
        "a dotted name in the match path",
        config(rule("/orders/{path.id}")),
        f"{RULE}.path",
        "{path.id} in a match path must be a simple name such as {id}",
    ),
    Bad(
        "a parameter spanning segments",
        config(rule("/orders/{a/b}")),
        f"{RULE}.path",
        "'{a/b}' in '/orders/{a/b}' is not a placeholder",
    ),
    Bad("a relative match path", config(rule("orders/{id}")), f"{RULE}.path", "must start with /"),
    Bad(
        "the second rule is named by its index",
        config(rule(), rule("/orders/{id}/{id}")),
        "upstreams.legacy.compensations.1.path",
        "{id} appears twice",
    ),
    Bad(
        "an undo path parameter the match path lacks",
        config(rule(undo={"method": "POST", "path": "/orders/{path.nope}/reopen"})),
        f"{RULE}.undo.path",
        "{path.nope} names nothing available here (allowed: {path.id}, {request.path},",
    ),
    Bad(
        "an undo placeholder with an unknown root",
        config(rule(undo={"method": "DELETE", "path": "/orders/{foo}"})),
        f"{RULE}.undo.path",
        "{foo} names nothing",
    ),
    Bad(
        "response headers without a header name",
        config(rule(undo={"method": "DELETE", "path": "/orders/{response.headers}"})),
        f"{RULE}.undo.path",
        "{response.headers} names nothing",
    ),
    Bad(
        "a stray } in the undo path",
        config(rule(undo={"method": "POST", "path": "/orders/{path.id}}/reopen"})),
        f"{RULE}.undo.path",
        "stray '}' at character 18 of '/orders/{path.id}}/reopen'",
    ),
    Bad(
        "an empty placeholder",
        config(rule(undo={"method": "POST", "path": "/orders/{}"})),
        f"{RULE}.undo.path",
        "'{}' in '/orders/{}' is not a placeholder",
    ),
    Bad(
        "snapshot.body without a snapshot",
        config(rule(undo={"method": "PUT", "path": "/orders/{path.id}", "body": "{snapshot.body.x}"})),
        f"{RULE}.undo.body",
        "{snapshot.body.x} names nothing",
    ),
    Bad(
        "snapshot.status without a snapshot",
        config(rule(undo={"method": "POST", "path": "/orders/{path.id}/{snapshot.status}"})),
        f"{RULE}.undo.path",
        "{snapshot.status} names nothing",
    ),
    Bad(
        "a bad placeholder deep in the undo body",
        config(rule(undo={
            "method": "POST",
            "path": "/orders/{path.id}/reopen",
            "body": {
                "reason": "undo",
                "items": [{"id": "{response.body.id}", "note": "{reponse.body.note}"}],
            },
        })),
        f"{RULE}.undo.body",
        "at items.0.note: {reponse.body.note} names nothing",
    ),
    Bad(
        "an unbalanced brace in the undo body",
        config(rule(undo={"method": "POST", "path": "/orders/{path.id}", "body": ["{path.id"]})),
        f"{RULE}.undo.body",
        "at 0: stray '{' at character 1 of '{path.id'",
    ),
    Bad(
        "a snapshot path naming the response",
        config(rule(snapshot={"method": "GET", "path": "/orders/{response.body.id}"})),
        f"{RULE}.snapshot.path",
        "{response.body.id} names nothing available here (allowed: {path.id})",
    ),
    Bad(
        "a misspelt token in the commit path",
        config(transactions=tx(commit={"method": "POST", "path": "/tx/{tokn}/commit"})),
        f"{TXS}.commit.path",
        "{tokn} names nothing available here (allowed: {token})",
    ),
    Bad(
        "an unbalanced brace in the rollback path",
        config(transactions=tx(rollback={"method": "POST", "path": "/tx/{token/rollback"})),
        f"{TXS}.rollback.path",
        "stray '{' at character 5",
    ),
    Bad(
        "a token in the begin path (there is none yet)",
        config(transactions=tx(begin={"method": "POST", "path": "/tx/{token}"})),
        f"{TXS}.begin.path",
        "{token} names nothing available here (allowed: {timeout})",
    ),
    Bad(
        "a bad placeholder in a commit body",
        config(transactions=tx(commit={"method": "POST", "path": "/tx/{token}", "body": {"tx": "{batch}"}})),
        f"{TXS}.commit.body",
        "at tx: {batch} names nothing",
    ),
]


@pytest.mark.parametrize("bad", BAD, ids=[bad.kind for bad in BAD])
def test_a_bad_template_is_refused_at_load_with_its_key_path(bad: Bad) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(bad.data, "gateway.yaml")
    error = caught.value
    assert (error.file, error.key_path) == ("gateway.yaml", bad.key_path)
    assert bad.problem in error.problem
    assert "\n" not in str(error)


GOOD_RULES = {
    "every undo placeholder the context offers": rule(
        "/orders/{id}/items/{item_2}",
        undo={
            "method": "POST",
            "path": "/orders/{path.id}/items/{path.item_2}/{response.body.id}/{response.headers.X-Id}",
            "body": {
                "status": "{response.status}",
                "was": ["{request.body}", "{request.body.lines.0.sku}", "{request.path}", 3, None, True],
                "text": "restored {path.id} after {response.body}",
            },
        },
    ),
    "snapshot names with a snapshot": rule(
        "/orders/{id}",
        undo={
            "method": "PUT",
            "path": "/orders/{path.id}",
            "body": {"s": "{snapshot.status}", "b": "{snapshot.body.name}"},
        },
        snapshot={"method": "GET", "path": "/orders/{path.id}"},
    ),
    "lookups are case-insensitive, like at render time": rule(
        "/orders/{id}", undo={"method": "DELETE", "path": "/orders/{Path.id}/{Response.Headers.location}"}
    ),
    "a parameter inside a segment": rule(
        "/files/v{version}.json", undo={"method": "DELETE", "path": "/files/{path.version}"}
    ),
    "no placeholders at all": rule(
        "/reset", undo={"method": "POST", "path": "/unreset", "body": {"all": True}}
    ),
    "the fault matrix's rule": {
        "method": "POST", "path": "/orders",
        "undo": {"method": "DELETE", "path": "/orders/{response.body.id}"},
    },
}


@pytest.mark.parametrize("good", GOOD_RULES.values(), ids=list(GOOD_RULES))
def test_good_rules_still_load(good: Data) -> None:
    loaded = parse_config(config(good))
    assert loaded.upstreams["legacy"].compensations[0].path == good["path"]


def test_begin_may_name_timeout_and_templates_may_be_plain_json() -> None:
    begin = {"method": "POST", "path": "/tx/{timeout}", "body": {"ttl": "{timeout}", "n": 1}}
    commit = {"method": "POST", "path": "/tx/{token}/commit", "body": {"token": "{token}"}}
    assert parse_config(config(transactions=tx(begin=begin, commit=commit))).upstreams["ledger"].transactions


def shipped_configs() -> list[Path]:
    return sorted([*(ROOT / "config").glob("*.yaml"), *(ROOT / "examples").glob("*/gateway.yaml")])


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda path: str(path.relative_to(ROOT)))
def test_shipped_configs_still_load(path: Path) -> None:
    assert isinstance(load_config(path), GatewayConfig)


def test_the_demo_config_still_loads() -> None:
    data = demo_config_data("http://127.0.0.1:9001", "http://127.0.0.1:9002", journal="j.sqlite3")
    assert parse_config(data).upstreams["ledger"].transactions is not None


def test_match_paths_are_compiled_once_and_match_as_before() -> None:
    pattern = templates.compile_path_pattern("/orders/{id}/items/{item}")
    assert templates.compile_path_pattern("/orders/{id}/items/{item}") is pattern
    assert templates.match_path("/orders/{id}/items/{item}", "/orders/7/items/x/") == {"id": "7", "item": "x"}
    assert templates.match_path("/orders/{id}", "/orders/7/items") is None
    assert templates.match_path("/a.b/{id}", "/aXb/1") is None
    assert templates.match_path("/", "/") == {}


@pytest.mark.parametrize("template", ["/orders/{id}/x/{id}", "/orders/{id", "/orders/{path.id}"])
def test_a_bad_match_path_raises_template_error_not_re_error(template: str) -> None:
    with pytest.raises(templates.TemplateError):
        templates.compile_path_pattern(template)


def edit_yaml(path: Path, edit: Callable[[Data], None]) -> None:
    data = config(rule())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def test_check_config_refuses_a_bad_rule_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    edit_yaml(path, lambda data: data["upstreams"]["legacy"]["compensations"].append(rule("/o/{id}/x/{id}")))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    key_path = "upstreams.legacy.compensations.1.path"
    assert lines[0].startswith(f"gateway: invalid config: {path}: {key_path}: {{id}} appears twice")
    assert "Traceback" not in result.stderr + result.stdout
