"""R7: SIGKILL at random points of push, pull and gc leaves every registry verifiable (tests/crash_battery.py).

The default run kills each verb 8 times; ``DELTAHUB_CRASH_RUNS=200`` gives the full battery of RELIABILITY.md.
"""

from __future__ import annotations

import os

import crash_battery
import pytest


@pytest.mark.slow
def test_kill_9_during_push_pull_and_gc_loses_nothing(tmp_path):
    runs = int(os.environ.get("DELTAHUB_CRASH_RUNS", "8"))
    rows = crash_battery.battery(tmp_path, runs)
    assert {r["op"] for r in rows} == {"push → local", "push → file://", "pull file:// → local", "gc local", "gc file://"}
    for r in rows:
        assert r["problems"] == 0, f"{r['op']}: {r['first_problem']}"
        assert r["recovered"] == runs
    assert sum(r["killed"] for r in rows) >= len(rows) * runs // 2  # most runs really died mid-way
