"""The benchmark scripts still run (their --quick modes), so BENCHMARKS.md can always be regenerated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [("bench_kernels.py", ["--quick"]),
                                         ("bench_compeft.py", ["--quick", "--only", "size,encode"]),
                                         ("bench_lora.py", ["--quick"]), ("bench_pool.py", ["--quick"]),
                                         ("bench_merge_sparse.py", ["--quick"])])
def test_benchmark_quick_mode_runs(script: str, args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Machine" in proc.stdout and "| " in proc.stdout
