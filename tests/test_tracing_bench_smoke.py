"""Smoke test of the tracing cost benchmark (bench/tracing_cost.py): a tiny run prints its table.

The figures themselves are not checked (a run this small is all noise); only that the script still
starts its processes, drives batches through the three gateways, gets every span of the traced one
to its OTLP sink and reports.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_tracing_bench_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tracing_cost.py"), "--rounds", "1", "--batches", "2",
         "--items", "3", "--warmup", "1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "| side | median µs CPU / sub-request | min - max |" in out
    labels = ("tracing off", "tracing on, every span exported (OTLP/HTTP)", "tracing on, sampler always_off")
    for label in labels:
        assert re.search(rf"^\| {re.escape(label)} \| \d+\.\d \| ", out, re.MULTILINE), out
    # (1 warm-up + 2 measured batches) x (server + batch + 3 client spans), all at the sink
    assert "The sink received 15 spans (expected 15)." in out
    assert "round 1: µs CPU per sub-request: off" in done.stderr
