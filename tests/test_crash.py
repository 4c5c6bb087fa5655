"""R7: SIGKILL at random points of push, pull and gc leaves every registry verifiable (tests/crash_battery.py).

The default run kills each verb 8 times; ``DELTAHUB_CRASH_RUNS=200`` gives the full battery of RELIABILITY.md.
"""

from __future__ import annotations

import os
import shutil

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


class Killed(BaseException):
    """Stands in for SIGKILL at one exact point (nothing after it runs, no except clause catches it)."""


def test_gc_killed_right_after_deleting_a_manifest_leaves_no_orphan_folder(tmp_path, monkeypatch):
    """Found by the battery (2 of 200 local gc runs): the folder built from a manifest outlived the manifest blob."""
    from _registry_fixtures import make_artifact

    from deltahub.registry import Registry
    from deltahub.registry.backends import LocalBackend

    monkeypatch.setenv("DELTAHUB_HOME", str(tmp_path / "home"))
    keep, doomed = make_artifact(tmp_path, "keep", 1), make_artifact(tmp_path, "doomed", 2)
    reg = Registry()
    reg.push(keep.folder)
    reg.push(doomed.folder)
    reg.resolve("doomed")  # materialized: artifacts/<id>/ exists
    shutil.rmtree(reg.local.root / "refs" / "doomed")
    real = LocalBackend.delete

    def delete(self, rel):
        real(self, rel)
        if rel.endswith(doomed.id):
            raise Killed
    monkeypatch.setattr(LocalBackend, "delete", delete)
    with pytest.raises(Killed):
        reg.gc(grace_seconds=0)
    monkeypatch.setattr(LocalBackend, "delete", real)
    assert Registry().verify() == []
    assert Registry().resolve("keep").id == keep.id
