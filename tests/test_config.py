"""Config validation (SPEC section 2): a good file loads; each kind of bad file is refused with one
message naming the file, the key path and the problem, by `load_config` and by the CLI (exit 2).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_config
from gateway.demo.launcher import demo_config_data
from gateway.errors import ConfigError

Data = dict[str, Any]


def demo_data() -> Data:
    return demo_config_data("http://127.0.0.1:9001", "http://127.0.0.1:9002", journal="j.sqlite3")


def demo_yaml(edit: Callable[[Data], None] = lambda data: None) -> str:
    data = demo_data()
    edit(data)
    return yaml.safe_dump(data, sort_keys=False)


def at(data: Data, dotted: str) -> tuple[Any, str | int]:
    """The container holding a dotted key path (list indexes as numbers) and the last key."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, int(last) if isinstance(node, list) else last


def setting(dotted: str, value: Any) -> Callable[[Data], None]:
    def edit(data: Data) -> None:
        node, key = at(data, dotted)
        node[key] = value

    return edit


def removing(dotted: str) -> Callable[[Data], None]:
    def edit(data: Data) -> None:
        node, key = at(data, dotted)
        del node[key]

    return edit


def adding_route(route: Data, *more: Callable[[Data], None]) -> Callable[[Data], None]:
    def edit(data: Data) -> None:
        data["routes"].append(route)
        for other in more:
            other(data)

    return edit


@dataclass(frozen=True)
class Bad:
    kind: str
    text: str | None
    """The file's content; None: the file does not exist."""
    key_path: str
    problem: str
    """A fragment the problem must contain."""


GET_ONLY = {"prefix": "/orders", "upstream": "legacy", "methods": ["GET"]}
BAD = [
    Bad("unknown key", demo_yaml(setting("listen.prot", 8080)), "listen.prot", "unknown key"),
    Bad("unknown top-level key", demo_yaml(setting("route", [])), "route", "unknown key"),
    Bad(
        "bad URL scheme",
        demo_yaml(setting("upstreams.legacy.url", "ftp://legacy.internal")),
        "upstreams.legacy.url",
        "must be an absolute http(s) URL",
    ),
    Bad(
        "URL without host",
        demo_yaml(setting("upstreams.ledger.url", "legacy:9000")),
        "upstreams.ledger.url",
        "must be an absolute http(s) URL",
    ),
    Bad(
        "URL with query",
        demo_yaml(setting("upstreams.legacy.url", "http://127.0.0.1:1/?a=1")),
        "upstreams.legacy.url",
        "must not carry a query",
    ),
    Bad(
        "route to a missing upstream",
        demo_yaml(setting("routes.1.upstream", "billing")),
        "routes.1.upstream",
        "unknown upstream 'billing' (known: ledger, legacy)",
    ),
    Bad(
        "overlapping routes",
        demo_yaml(adding_route({"prefix": "/orders/", "upstream": "ledger"})),
        "routes.6.prefix",  # after the demo's six routes
        "overlaps routes.0 (same prefix '/orders' and method)",
    ),
    Bad(
        "overlapping routes with a method, the first at index 0",
        demo_yaml(setting("routes", [GET_ONLY, {**GET_ONLY, "methods": ["get", "POST"]}])),
        "routes.1.prefix",
        "overlaps routes.0",
    ),
    Bad(
        "route shadowed by the gateway's endpoints",
        demo_yaml(adding_route({"prefix": "/_gateway/metrics", "upstream": "legacy"})),
        "routes.6.prefix",
        "shadowed by the gateway's own endpoint '/_gateway' (gateway.prefix)",
    ),
    Bad(
        "route shadowed by a moved gateway prefix",
        demo_yaml(setting("gateway", {"prefix": "/orders"})),
        "routes.0.prefix",
        "shadowed by the gateway's own endpoint '/orders'",
    ),
    Bad(
        "route shadowed by the JSON batch endpoint",
        demo_yaml(adding_route({"prefix": "/batch/v1", "upstream": "legacy"})),
        "routes.6.prefix",
        "'/batch/v1' (batch.json.path)",
    ),
    Bad(
        "route shadowed by the multipart batch endpoint",
        demo_yaml(adding_route({"prefix": "/v1/api/batch/x", "upstream": "ledger"})),
        "routes.6.prefix",
        "'/v1/api/batch' (batch.multipart.path)",
    ),
    Bad("missing required key", demo_yaml(removing("routes")), "routes", "required key is missing"),
    Bad(
        "missing upstream URL",
        demo_yaml(removing("upstreams.legacy.url")),
        "upstreams.legacy.url",
        "required key is missing",
    ),
    Bad(
        "no upstreams",
        demo_yaml(lambda d: d.update(upstreams={}, routes=[])),
        "upstreams",
        "at least one upstream is required",
    ),
    Bad("wrong type", demo_yaml(setting("listen.port", "eighty")), "listen.port", "valid integer"),
    Bad("wrong container type", demo_yaml(setting("upstreams", ["legacy"])), "upstreams", "valid dictionary"),
    Bad(
        "out of range", demo_yaml(setting("listen.port", 70000)), "listen.port", "less than or equal to 65535"
    ),
    Bad(
        "relative route prefix",
        demo_yaml(setting("routes.0.prefix", "orders")),
        "routes.0.prefix",
        "must be an absolute path",
    ),
    Bad(
        "unknown route method",
        demo_yaml(setting("routes.0.methods", ["FETCH"])),
        "routes.0.methods",
        "unknown HTTP method 'FETCH'",
    ),
    Bad(
        "gateway prefix /", demo_yaml(setting("gateway", {"prefix": "/"})), "gateway.prefix", "must not be /"
    ),
    Bad("invalid YAML", "upstreams: [a,\n  b: 1\n", "(file)", "not valid YAML: "),
    Bad("non-mapping root", "- upstreams\n- routes\n", "(root)", "must be a mapping"),
    Bad("empty file", "", "(root)", "must be a mapping"),
    Bad("file not found", None, "(file)", "cannot read"),
]
IDS = [bad.kind for bad in BAD]
CLI_KINDS = {
    "unknown key",
    "bad URL scheme",
    "route to a missing upstream",
    "overlapping routes",
    "route shadowed by the gateway's endpoints",
    "route shadowed by the JSON batch endpoint",
    "missing required key",
    "wrong type",
    "invalid YAML",
    "non-mapping root",
    "file not found",
}
"""Through the CLI too (each run starts Python, so one of each kind the spec names)."""
CLI_BAD = [bad for bad in BAD if bad.kind in CLI_KINDS]
EXAMPLES = sorted((Path(__file__).parent.parent / "config").glob("*.yaml"))


def write(directory: Path, bad: Bad) -> Path:
    path = directory / (re.sub(r"[^a-z0-9]+", "-", bad.kind) + ".yaml")
    if bad.text is not None:
        path.write_text(bad.text, encoding="utf-8")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30
    )


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """The CLI kinds of bad file through `check-config` and `serve --config`, concurrently."""
    directory = tmp_path_factory.mktemp("bad-configs")
    jobs: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
    for bad in CLI_BAD:
        path = str(write(directory, bad))
        jobs[(bad.kind, "check-config")] = (path, ("check-config", path))
        jobs[(bad.kind, "serve")] = (path, ("serve", "--config", path))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(run_cli, *args) for key, (_, args) in jobs.items()}
        return {key: (jobs[key][0], future.result()) for key, future in futures.items()}


def test_the_demo_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(demo_yaml())
    config = load_config(path)
    assert set(config.upstreams) == {"legacy", "ledger"}
    assert [route.prefix for route in config.routes][:2] == ["/orders", "/echo"]
    assert config.upstreams["ledger"].transactions is not None
    assert config.gateway.prefix == "/_gateway"
    assert config.batch.json_endpoint.path == "/batch/v1"
    assert config.batch.multipart_endpoint.path == "/v1/api/batch"


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_shipped_example_configs_load(path: Path) -> None:
    assert load_config(path).routes


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(demo_yaml())
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: OK"
    assert result.stderr == ""


def test_method_specific_routes_on_one_prefix_are_not_an_overlap(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(demo_yaml(setting("routes", [GET_ONLY, {**GET_ONLY, "methods": ["POST"]}])))
    assert [route.methods for route in load_config(path).routes] == [("GET",), ("POST",)]


@pytest.mark.parametrize("bad", BAD, ids=IDS)
def test_load_config_names_file_key_path_and_problem(tmp_path: Path, bad: Bad) -> None:
    path = write(tmp_path, bad)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert (error.file, error.key_path) == (str(path), bad.key_path)
    assert bad.problem in error.problem
    assert str(error) == f"{path}: {bad.key_path}: {error.problem}"
    assert "\n" not in str(error)


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("bad", CLI_BAD, ids=[bad.kind for bad in CLI_BAD])
def test_cli_refuses_with_one_line_and_exit_code_2(
    cli_runs: dict[tuple[str, str], Any], bad: Bad, command: str
) -> None:
    path, result = cli_runs[(bad.kind, command)]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"gateway: invalid config: {path}: {bad.key_path}: ")
    assert bad.problem in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
