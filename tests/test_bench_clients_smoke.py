"""Smoke test of the client comparison (bench/clients.py): a tiny run prints its tables.

The comparison is not part of the test suite; this only checks that it still starts its upstream,
drives the installed candidates (at least the two aiohttp ones; the others are skipped with a
message when their library is missing) and probes behaviour.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *args: str) -> str:
    output = tmp_path / "clients.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.clients", *args, "--output", str(output)],
        capture_output=True, text=True, timeout=40, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert output.read_text().strip() == done.stdout.strip()
    return done.stdout


def test_quick_measurement_prints_the_table(tmp_path: Path) -> None:
    out = _run(tmp_path, "--quick", "--loops", "asyncio", "--no-probes")
    assert "| loop | scenario | candidate | rate, median (min-max) |" in out
    for scenario in ("100 sequential GETs (1 KiB)", "200 GETs, 10 concurrent", "1 MiB stream x1"):
        for candidate in ("aiohttp-gateway", "aiohttp-tuned"):
            assert f"| asyncio | {scenario}" in out
            assert f"| {candidate} |" in out


def test_strictness_probes_fill_the_matrix(tmp_path: Path) -> None:
    out = _run(tmp_path, "--strictness", "--candidates", "aiohttp-tuned,no-such-client")
    assert "| requirement | aiohttp-tuned |" in out
    assert "| no redirects | **yes**" in out
    assert "| no auto-decompression | **yes**" in out
    assert "| bad Content-Length | rejected |" in out
    assert "- no-such-client: unknown candidate" in out
