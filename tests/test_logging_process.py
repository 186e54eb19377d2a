"""Logs as an operator reads them: a real process's stdout and stderr, every line JSON.

`python -m gateway --log-json serve` runs as a subprocess routed to the in-process demo upstreams;
a request aiohttp cannot parse (Content-Length with Transfer-Encoding: chunked) is sent as raw
bytes. Then `configure_logging` in a bare process: what Python and aiohttp would print to stderr
themselves (a logged exception, a thread's, an unraisable one, a warning, an asyncio error) is one
JSON line each on stdout, the traceback inside a field.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp.test_utils import TestServer

from gateway.demo.launcher import demo_config_data
from tests.test_logging import raw_exchange
from tests.test_shutdown import STARTED, free_port

CL_TE = (
    b"POST /echo/x HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n"
)


def json_lines(text: str, stream: str) -> list[dict[str, Any]]:
    """Every non-empty line must be one JSON object."""
    lines = []
    for line in text.splitlines():
        if line.strip():
            try:
                entry = json.loads(line)
            except ValueError:
                raise AssertionError(f"not a JSON line on {stream}: {line!r}") from None
            assert isinstance(entry, dict), line
            lines.append(entry)
    return lines


async def start_gateway(
    config: dict[str, Any], tmp_path: Path
) -> tuple[asyncio.subprocess.Process, Path, Path]:
    """Like tests.test_shutdown.start_gateway, but stdout and stderr kept apart."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--log-json", "serve", "--config", str(path),
            stdout=out, stderr=err,
        )
    STARTED.append(process)  # tests/conftest.py kills it if this test fails first
    url = f"http://127.0.0.1:{config['listen']['port']}/_gateway/readyz"
    async with aiohttp.ClientSession() as session:
        for _ in range(150):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return process, stdout, stderr
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"gateway did not become ready: {stderr.read_text()!r}")


async def test_a_cl_te_request_yields_one_json_log_line_and_no_traceback(
    legacy: TestServer, ledger: TestServer, tmp_path: Path
) -> None:
    port = free_port()
    config = demo_config_data(
        str(legacy.make_url("")).rstrip("/"), str(ledger.make_url("")).rstrip("/"),
        port=port, journal=str(tmp_path / "journal.sqlite3"),
    )
    process, stdout_file, stderr_file = await start_gateway(config, tmp_path)
    status, headers, body = await raw_exchange(port, CL_TE)
    assert status == 400, body
    assert json.loads(body)["type"].endswith("bad-http")
    request_id = headers["x-request-id"]
    # then a well-formed request on a new connection: its access line, from the real process
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{port}/orders?token=s3cr3t&page=2", headers={"User-Agent": "probe/2"}
    ) as response:
        assert response.status == 200
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 20) == 0

    stdout, stderr = stdout_file.read_text(), stderr_file.read_text()
    events = json_lines(stdout, "stdout") + json_lines(stderr, "stderr")
    assert "Traceback" not in stdout + stderr
    about_it = [line for line in (stdout + stderr).splitlines()
                if request_id in line or "Transfer-Encoding" in line or "/echo/x" in line]
    assert len(about_it) == 1, about_it
    (line,) = [event for event in events if event.get("request_id") == request_id]
    assert (line["event"], line["level"], line["status"]) == ("protocol_error", "warning", 400)
    assert (line["client"], line["status_origin"]) == ("127.0.0.1", "gateway")
    assert "Transfer-Encoding" in line["detail"]

    (orders,) = [e for e in events if e["event"] == "request" and e["path"] == "/orders"]
    assert orders["query"] == "token=REDACTED&page=2" and "s3cr3t" not in stdout + stderr
    assert (orders["client"], orders["user_agent"], orders["route"]) == ("127.0.0.1", "probe/2", "/orders")
    assert (orders["status"], orders["status_origin"], orders["bytes_in"]) == (200, "upstream", 0)
    assert {"listening", "stopping", "stopped"} <= {event["event"] for event in events}


BARE_PROCESS = textwrap.dedent("""
    import asyncio, gc, logging, threading, warnings
    from gateway.log import configure_logging

    configure_logging(level="INFO")  # stdout is a pipe: JSON
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "peer")

    def in_thread():
        {}["key"]

    thread = threading.Thread(target=in_thread, name="worker")
    thread.start()
    thread.join()

    class Finalized:
        def __del__(self):
            raise OSError("in __del__")

    Finalized()
    gc.collect()
    warnings.warn("an old API", UserWarning)

    async def main():
        asyncio.get_running_loop().call_soon(lambda: [][1])
        await asyncio.sleep(0.01)

    asyncio.run(main())
    logging.getLogger("aiohttp.access").info("not shown: the gateway writes its own access line")
    logging.getLogger("asyncio").debug("not shown at INFO")
""")


def test_what_python_and_aiohttp_would_print_to_stderr_is_one_json_line_each() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BARE_PROCESS], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = json_lines(done.stdout, "stdout")
    assert len(lines) == len(done.stdout.splitlines()) == 5, done.stdout
    server, thread, finalizer, warned, loop = lines
    assert (server["logger"], server["level"]) == ("aiohttp.server", "error")
    assert server["exception"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError" in server["exception"]
    assert (thread["event"], thread["thread"]) == ("thread_failed", "worker")
    assert "KeyError: 'key'" in thread["exception"]
    assert finalizer["event"] == "exception_ignored" and "OSError: in __del__" in finalizer["exception"]
    assert warned["logger"] == "py.warnings" and "UserWarning: an old API" in warned["event"]
    assert loop["logger"] == "asyncio" and "IndexError" in loop["exception"]
