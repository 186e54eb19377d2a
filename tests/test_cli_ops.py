"""Operations (issue 12, parts 3 and 8): `${VAR}` in the config, GATEWAY_CONFIG, `check-config`
reporting every problem, `--version` and the log options, `healthcheck`, the demo's temporary
journal, the Dockerfile's constraints and the Kubernetes example.

Real files and real processes: `gateway.cli.main` in this process (with capsys) where nothing
serves, `python -m gateway` subprocesses where something does. Sync tests throughout.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from gateway import cli
from gateway.config import load_config, problems_of
from gateway.demo.launcher import demo_config_data
from gateway.errors import ConfigError

ROOT = Path(__file__).parent.parent
K8S = ROOT / "examples" / "kubernetes"
Data = dict[str, Any]
Cli = Callable[..., tuple[int, str, str]]


def config_data(tmp_path: Path, **top: Any) -> Data:
    data = demo_config_data("http://127.0.0.1:9001", "http://127.0.0.1:9002",
                            journal=str(tmp_path / "journal" / "j.sqlite3"))
    data.update(top)
    return data


def write_yaml(path: Path, data: Data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _uncache_gateway_loggers() -> None:
    """`main` configures structlog with cache_logger_on_first_use: loggers bound during the call
    would keep its settings (and this test's stdout) in later tests."""
    for name, module in list(sys.modules.items()):
        if name == "gateway" or name.startswith("gateway."):
            for value in list(vars(module).values()):
                if isinstance(value, structlog._config.BoundLoggerLazyProxy):
                    vars(value).pop("bind", None)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    """`gateway <argv>` in this process: (exit code, stdout, stderr)."""
    saved = structlog.get_config()

    def call(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = cli.main(list(argv))
        finally:
            structlog.configure(**saved)
            _uncache_gateway_loggers()
        out, err = capsys.readouterr()
        return code, out, err

    yield call


def gateway_process(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                    ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
    )


def read_events(process: subprocess.Popen[str], until: str, timeout: float = 20) -> list[dict[str, Any]]:
    """JSON log lines of `process` up to and including the first `until` event."""
    assert process.stdout is not None
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        event = json.loads(line)
        events.append(event)
        if event["event"] == until:
            return events
    process.kill()
    raise AssertionError(f"no {until!r} event; got {events}, stderr {process.communicate()[1]!r}")


def wait_until_serving(port: int, timeout: float = 10) -> None:
    """The "listening" line is logged just before the stop signals are handled: a request answered
    means the event loop ran past that point, so SIGTERM now stops the gateway gracefully."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_gateway/healthz", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)
    return process.returncode, out, err


# --- ${VAR} expansion ---------------------------------------------------------------------------


def test_env_vars_are_expanded_in_string_values(tmp_path: Path) -> None:
    text = """
listen: {host: 127.0.0.1, port: "${GW_PORT}"}
upstreams:
  legacy: {url: "http://${GW_HOST}:${GW_UPSTREAM_PORT:-9000}"}
  other: {url: "http://${GW_EMPTY:-fallback.internal}:1"}
routes:
  - {prefix: /orders, upstream: legacy}
  - {prefix: "/x$${y}", upstream: other}
journal: {path: "${GW_DIR}/j.sqlite3"}
"""
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    environ = {"GW_PORT": "8181", "GW_HOST": "orders.internal", "GW_EMPTY": "", "GW_DIR": str(tmp_path)}
    with pytest.raises(ConfigError) as caught:  # `$${` is a literal `${`, which no path may hold
        load_config(path, environ=environ)
    assert (caught.value.key_path, caught.value.problem) == (
        "routes.1.prefix", "must be an absolute path such as /api, got '/x${y}'"
    )
    path.write_text(text.replace('"/x$${y}"', "/x"))
    config = load_config(path, environ=environ)
    assert config.listen.port == 8181  # a string from the environment, validated as the int it names
    assert config.upstreams["legacy"].url == "http://orders.internal:9000"  # the default
    assert config.upstreams["other"].url == "http://fallback.internal:1"  # empty takes the default too
    assert config.journal.path == f"{tmp_path}/j.sqlite3"


def test_escaped_reference_stays_literal_in_a_free_text_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_TOKEN_NAME", "X-Tx")
    data = config_data(tmp_path)
    data["upstreams"]["ledger"]["transactions"]["header"] = "${GW_TOKEN_NAME}"
    data["journal"]["key_file"] = "$${HOME}/${GW_TOKEN_NAME}.key"
    config = load_config(write_yaml(tmp_path / "gateway.yaml", data))  # os.environ by default
    transactions = config.upstreams["ledger"].transactions
    assert transactions is not None
    assert transactions.header == "X-Tx"
    assert config.journal.key_file == "${HOME}/X-Tx.key"


def test_an_unset_variable_names_the_variable_and_the_key_path(tmp_path: Path) -> None:
    data = config_data(tmp_path)
    data["upstreams"]["legacy"]["url"] = "http://${GW_NOT_SET_ANYWHERE}:9000"
    data["routes"][2]["prefix"] = "/${GW_ALSO_NOT_SET}"
    path = write_yaml(tmp_path / "gateway.yaml", data)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    found = [(p.file, p.key_path, p.problem) for p in problems_of(caught.value)]
    assert [key for _, key, _ in found] == ["upstreams.legacy.url", "routes.2.prefix"]  # not also as bad URLs
    assert all(file == str(path) for file, _, _ in found)
    assert "environment variable GW_NOT_SET_ANYWHERE is not set" in found[0][2]
    assert "GW_ALSO_NOT_SET" in found[1][2]


def test_a_malformed_reference_is_an_error(tmp_path: Path) -> None:
    data = config_data(tmp_path)
    data["upstreams"]["legacy"]["url"] = "http://${GW_HOST:9000"
    with pytest.raises(ConfigError) as caught:
        load_config(write_yaml(tmp_path / "gateway.yaml", data), environ={"GW_HOST": "h"})
    assert caught.value.key_path == "upstreams.legacy.url"
    assert "malformed '${GW_HOST:9000'" in caught.value.problem


# --- GATEWAY_CONFIG -----------------------------------------------------------------------------


def test_gateway_config_names_the_file_when_no_argument_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Cli
) -> None:
    path = write_yaml(tmp_path / "gateway.yaml", config_data(tmp_path))
    monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    assert run("check-config") == (0, f"{path}: OK\n", "")
    code, _, err = run("--log-level", "critical", "batches", "list")
    assert (code, err) == (0, "")
    monkeypatch.setenv("GATEWAY_CONFIG", str(tmp_path / "missing.yaml"))  # an argument still wins
    assert run("check-config", str(path))[0] == 0


@pytest.mark.parametrize("argv", [["serve"], ["check-config"], ["recover"], ["batches", "list"],
                                  ["batches", "show", "b-1"], ["healthcheck"]])
def test_no_config_anywhere_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, run: Cli, argv: list[str]
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    code, out, err = run(*argv)
    assert (code, out) == (2, "")
    assert err == "gateway: no config file: give --config FILE (check-config: FILE) or set GATEWAY_CONFIG\n"


# --- check-config -------------------------------------------------------------------------------


def test_check_config_lists_every_problem_one_line_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Cli
) -> None:
    monkeypatch.delenv("GW_UNSET", raising=False)
    monkeypatch.delenv("GW_NO_KEY", raising=False)
    data = config_data(tmp_path)
    data["listen"].update(port="eighty", prot=1)
    data["upstreams"]["legacy"]["url"] = "ftp://legacy"
    data["upstreams"]["ledger"]["url"] = "${GW_UNSET}"
    data["routes"][0]["methods"] = ["FETCH"]
    data["journal"]["key_env"] = "GW_NO_KEY"  # the journal section is valid: its key is checked too
    path = write_yaml(tmp_path / "gateway.yaml", data)
    code, out, err = run("check-config", str(path))
    assert (code, out) == (2, "")
    lines = err.splitlines()
    keys = [line.removeprefix(f"gateway: invalid config: {path}: ").split(": ")[0] for line in lines]
    assert keys == [
        "upstreams.ledger.url", "listen.port", "listen.prot", "upstreams.legacy.url",
        "routes.0.methods", "journal.key_env",
    ]
    assert all(line.startswith(f"gateway: invalid config: {path}: ") for line in lines)
    assert "environment variable GW_UNSET is not set" in lines[0]
    assert "environment variable GW_NO_KEY is not set" in lines[-1]


def test_serve_also_prints_every_problem(tmp_path: Path, run: Cli) -> None:
    data = config_data(tmp_path)
    data["listen"].update(port="eighty", workers=0)
    code, _, err = run("serve", "--config", str(write_yaml(tmp_path / "gateway.yaml", data)))
    assert code == 2
    assert [line.split(": ")[3] for line in err.splitlines()] == ["listen.port", "listen.workers"]


def test_check_config_refuses_a_duplicate_key_with_its_line(tmp_path: Path, run: Cli) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "listen:\n  host: 127.0.0.1\n  port: 8080\nupstreams:\n  a: {url: 'http://127.0.0.1:1'}\n"
        "routes: [{prefix: /a, upstream: a}]\nlisten:\n  port: 9090\n"
    )
    code, _, err = run("check-config", str(path))
    assert code == 2
    assert err == (f"gateway: invalid config: {path}: (file): not valid YAML: duplicate key 'listen' "
                   "at line 7, column 1 (first at line 1)\n")
    path.write_text("upstreams:\n  a: {url: 'http://127.0.0.1:1', url: 'http://127.0.0.1:2'}\nroutes: []\n")
    assert "duplicate key 'url' at line 2, column 34" in run("check-config", str(path))[2]


def test_merge_keys_may_still_override(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "base: &t {connect: 1, total: 5}\n"
        "upstreams:\n  a: {url: 'http://127.0.0.1:1', timeouts: {<<: *t, total: 9}}\n"
        "routes: [{prefix: /a, upstream: a}]\n"
    )
    with pytest.raises(ConfigError) as caught:  # `base` itself is an unknown key; the merge is fine
        load_config(path)
    assert [p.key_path for p in problems_of(caught.value)] == ["base"]


def test_check_config_prints_the_warnings_serve_logs(tmp_path: Path, run: Cli) -> None:
    data = config_data(tmp_path)
    data["routes"].append({"prefix": "/", "upstream": "legacy"})
    data["listen"]["port"] = free_port()
    path = write_yaml(tmp_path / "gateway.yaml", data)
    code, out, err = run("check-config", str(path))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{path}: warning: route '/' (upstream legacy) is partly shadowed: "
        "/_gateway, /batch/v1, /v1/api/batch answered by the gateway",
        f"{path}: OK",
    ]
    process = gateway_process("--log-json", "serve", "--config", str(path))
    try:
        events = read_events(process, "listening")
        wait_until_serving(data["listen"]["port"])
    finally:
        stop(process)
    (warning,) = [e for e in events if e["event"] == "route_partly_shadowed"]
    assert warning["detail"] in out


def test_check_config_refuses_an_unwritable_journal_directory(tmp_path: Path, run: Cli) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root?) may write into a mode 0500 directory")
        for journal in (locked / "j.sqlite3", locked / "sub" / "j.sqlite3"):
            data = config_data(tmp_path)
            data["journal"]["path"] = str(journal)
            code, _, err = run("check-config", str(write_yaml(tmp_path / "gateway.yaml", data)))
            assert code == 2
            assert ": journal.path: " in err and "not writable" in err
            assert not journal.exists()
    finally:
        locked.chmod(0o700)


def test_check_config_refuses_an_unwritable_journal_directory_as_root_too(
    tmp_path: Path, run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check where root may write anywhere: access(2) says no for one directory."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    data = config_data(tmp_path)
    data["journal"]["path"] = str(locked / "j.sqlite3")
    code, out, err = run("check-config", str(write_yaml(tmp_path / "gateway.yaml", data)))
    assert (code, out) == (2, "")
    assert err == (f"gateway: invalid config: {tmp_path}/gateway.yaml: journal.path: the directory {locked} "
                   f"is not writable by this user (uid {os.getuid()}); the journal and its -wal and -shm "
                   "files are created there\n")


def test_check_config_refuses_a_journal_that_cannot_be_created(tmp_path: Path, run: Cli) -> None:
    """Runs as root too: no permission bits stop root, but a file where a directory must be does."""
    (tmp_path / "plain-file").write_text("")
    cases = {
        tmp_path / "plain-file" / "j.sqlite3": "is not a directory",
        tmp_path: "is a directory; name the journal file",
    }
    for journal, problem in cases.items():
        data = config_data(tmp_path)
        data["journal"]["path"] = str(journal)
        code, out, err = run("check-config", str(write_yaml(tmp_path / "gateway.yaml", data)))
        assert code == 2, out
        assert f"{tmp_path}/gateway.yaml: journal.path: " in err and problem in err
    data = config_data(tmp_path)  # a missing directory is fine (serve creates it) and is not created
    data["journal"]["path"] = str(tmp_path / "new" / "dirs" / "j.sqlite3")
    assert run("check-config", str(write_yaml(tmp_path / "gateway.yaml", data)))[0] == 0
    assert not (tmp_path / "new").exists()


# --- --version, log options, no tracebacks ------------------------------------------------------


def test_version(run: Cli) -> None:
    code, out, err = run("--version")
    assert (code, err) == (0, "")
    assert re.fullmatch(r"gateway \d+\.\d+\.\d+\S*\n", out)


def test_log_options_before_or_after_the_command_in_any_case() -> None:
    parse = cli._parser().parse_args
    assert parse(["check-config", "f", "--log-level", "debug"]).log_level == "DEBUG"
    assert parse(["--log-level", "Error", "batches", "list"]).log_level == "ERROR"
    assert parse(["batches", "list", "--log-level", "warn", "--log-json"]).log_level == "WARNING"
    after = parse(["--log-level", "debug", "--log-json", "serve", "--config", "f"])
    assert (after.log_level, after.log_json) == ("DEBUG", True)  # the command's copies don't reset them
    assert (parse(["serve"]).log_level, parse(["serve"]).log_json) == ("INFO", False)


GARBAGE = [
    [], ["nope"], ["--log-level", "LOUD", "serve"], ["serve", "--config"], ["batches"],
    ["batches", "show"], ["demo", "--port", "x"], ["demo", "--port", "70000"],
    ["check-config", "a.yaml", "b.yaml"], ["--config", "x", "serve"], ["check-config", "/"],
    ["check-config", "/dev/null"], ["serve", "--config", "/nonexistent/gateway.yaml"],
    ["recover", "--config", "/dev/null"], ["healthcheck", "--config", "/dev/null"], ["\udcff"],
    ["check-config", "\udcff.yaml"],
]


@pytest.mark.parametrize("argv", GARBAGE, ids=[" ".join(argv) or "nothing" for argv in GARBAGE])
def test_garbage_arguments_never_give_a_traceback(
    argv: list[str], run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    code, out, err = run(*argv)  # an exception would escape main: that is what prints a traceback
    assert code in (1, 2), (code, out, err)
    assert (out + err).strip()
    if code == 2 and not err.startswith("gateway:"):
        assert err.startswith("usage: "), err


def test_argv_that_is_not_utf8_in_a_real_process(tmp_path: Path) -> None:
    """Bytes that are no UTF-8 reach argv as surrogates; printing them must not fail either."""
    write_yaml(tmp_path / os.fsdecode(b"\xff.yaml"), config_data(tmp_path))

    def run_one(*args: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable.encode(), b"-m", b"gateway", *args], capture_output=True,
                              timeout=30, cwd=tmp_path, env={**os.environ, "GATEWAY_CONFIG": ""})

    with ThreadPoolExecutor(max_workers=3) as pool:
        bad_command, missing, good = pool.map(
            lambda args: run_one(*args),
            [(b"\xff",), (b"check-config", b"\xfe.yaml"), (b"check-config", b"\xff.yaml")],
        )
    for result in (bad_command, missing, good):
        assert b"Traceback" not in result.stdout + result.stderr, result.stderr
    assert bad_command.returncode == 2 and bad_command.stderr.startswith(b"usage: ")
    assert missing.returncode == 2 and b"\\udcfe.yaml: (file): cannot read" in missing.stderr
    assert (good.returncode, good.stdout) == (0, b"\\udcff.yaml: OK\n")


# --- healthcheck --------------------------------------------------------------------------------


def test_healthcheck_against_a_real_gateway(tmp_path: Path, run: Cli) -> None:
    port = free_port()
    data = config_data(tmp_path, listen={"host": "0.0.0.0", "port": port},
                       gateway={"prefix": "/ops"})
    path = write_yaml(tmp_path / "gateway.yaml", data)
    # serve by GATEWAY_CONFIG, log options after the command and in lower case
    process = gateway_process("serve", "--log-level", "warning", "--log-json",
                              env={"GATEWAY_CONFIG": str(path)})
    try:
        deadline = time.monotonic() + 20
        code, out, err = run("healthcheck", "--config", str(path))
        while code != 0 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
            code, out, err = run("healthcheck", "--config", str(path))
        assert (code, out, err) == (0, f"ready: http://127.0.0.1:{port}/ops/readyz\n", "")
    finally:
        returncode, logs, errors = stop(process)
    assert returncode == 0, errors
    levels = {json.loads(line)["level"] for line in logs.splitlines()}
    assert levels <= {"warning", "error"}, "--log-level warning: no info lines (such as listening)"


def test_healthcheck_on_a_closed_port_is_1(tmp_path: Path, run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    path = write_yaml(tmp_path / "gateway.yaml", config_data(tmp_path, listen={"port": port}))
    monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    started = time.monotonic()
    code, out, err = run("healthcheck")
    assert (code, err) == (1, "")
    assert out.startswith(f"unhealthy: http://127.0.0.1:{port}/_gateway/readyz: ")
    assert len(out.splitlines()) == 1
    assert time.monotonic() - started < 3.5


def test_healthcheck_not_ready_is_1(tmp_path: Path, run: Cli) -> None:
    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503 if self.path == "/_gateway/readyz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        path = write_yaml(tmp_path / "gateway.yaml", config_data(tmp_path, listen={"port": port}))
        assert run("healthcheck", "--config", str(path)) == (
            1, f"not ready: http://127.0.0.1:{port}/_gateway/readyz answered 503\n", ""
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_healthcheck_with_an_invalid_config_is_1_not_2(tmp_path: Path, run: Cli) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: [\n")
    code, out, err = run("healthcheck", "--config", str(path))
    assert (code, err) == (1, "")  # Docker reserves exit code 2
    assert out.startswith(f"unhealthy: invalid config: {path}: (file): not valid YAML")


# --- demo ---------------------------------------------------------------------------------------


def test_demo_removes_its_temporary_journal_directory(tmp_path: Path) -> None:
    port = free_port()
    process = gateway_process("demo", "--port", str(port), "--log-json", cwd=tmp_path)
    try:
        events = read_events(process, "listening")
        wait_until_serving(port)
    finally:
        returncode, _, errors = stop(process)
    (demo,) = [e for e in events if e["event"] == "demo_upstreams"]
    directory = Path(demo["journal"]).parent
    assert directory.name.startswith("gateway-demo-")
    assert returncode == 0, errors
    assert not directory.exists()


def test_demo_keeps_a_journal_it_was_given(tmp_path: Path) -> None:
    journal, port = tmp_path / "mine" / "journal.sqlite3", free_port()
    process = gateway_process("demo", "--port", str(port), "--journal", str(journal), "--log-json")
    try:
        read_events(process, "listening")
        wait_until_serving(port)
    finally:
        returncode, _, errors = stop(process)
    assert returncode == 0, errors
    assert journal.exists()


# --- packaging and the Kubernetes example -------------------------------------------------------


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]).lower()


def test_constraints_pin_every_runtime_dependency_and_the_image_uses_them() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==\S+", line) for line in lines), lines
    pinned = {_name(line) for line in lines}
    extras = project["optional-dependencies"]
    runtime = {_name(dep) for dep in [*project["dependencies"], *extras["postgres"]]}
    assert runtime <= pinned  # the image installs the [postgres] extra too
    assert not {_name(dep) for dep in extras["test"]} & pinned - runtime, (
        "test tools are not runtime dependencies"
    )
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'pip install --no-cache-dir --prefix=/install -c constraints.txt ".[postgres]"' in dockerfile
    assert 'CMD ["gateway", "healthcheck"]' in dockerfile


def k8s_objects() -> dict[str, Any]:
    objects: dict[str, Any] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            objects[document["kind"]] = document
    return objects


def test_kubernetes_example_is_valid_yaml_with_a_valid_gateway_config(tmp_path: Path) -> None:
    objects = k8s_objects()
    assert set(objects) == {"ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"}
    config_text = objects["ConfigMap"]["data"]["gateway.yaml"]
    config = load_config(write_text(tmp_path / "gateway.yaml", config_text), environ={})
    assert config.upstreams["app"].url == "http://127.0.0.1:9000"

    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_grace + config.drain_delay
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"app", "gateway"}
    gateway = containers["gateway"]
    prefix = config.gateway.prefix
    assert gateway["readinessProbe"]["httpGet"]["path"] == f"{prefix}/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == f"{prefix}/healthz"
    port_names = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert port_names[gateway["readinessProbe"]["httpGet"]["port"]] == config.listen.port
    env = {e["name"]: e for e in gateway["env"]}
    assert env["GATEWAY_CONFIG"]["value"] == "/etc/gateway/gateway.yaml"
    assert config.journal.key_env in env
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    assert Path(config.journal.path).parent == Path(mounts["journal"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["journal"]["persistentVolumeClaim"]["claimName"] == (
        objects["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert volumes["config"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_check_config_checks_what_tracing_needs_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Cli
) -> None:
    data = config_data(tmp_path)
    data["tracing"] = {"enabled": True}
    path = write_yaml(tmp_path / "gateway.yaml", data)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert run("check-config", str(path)) == (0, f"{path}: OK\n", "")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    code, _, err = run("check-config", str(path))
    assert code == 2
    assert "OTEL_TRACES_EXPORTER" in err and "zipkin" in err
