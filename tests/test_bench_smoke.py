"""Smoke test of the benchmark script (bench/run.py): a tiny run of figure 1 prints its table.

The benchmark itself is not part of the test suite; this only checks that it still starts its
processes, drives a batch through the gateway and reports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_prints_the_table(tmp_path: Path) -> None:
    output = tmp_path / "latest.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", "1",
         "--no-install", "--output", str(output)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| fig | measure | median | min - max | runs | target | met |" in done.stdout
    assert "Unordered batch of 10 x 20 ms / one direct call" in done.stdout
    assert output.read_text().strip() == done.stdout.strip()
