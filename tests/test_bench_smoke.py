"""The benchmarks run (quick mode): a smoke test, never a timing assertion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", ["sync_basics.py", "templates_bytes.py", "compression.py"])
def test_benchmark_runs_in_quick_mode(script: str) -> None:
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()
