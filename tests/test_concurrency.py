"""Several processes pushing, pulling and collecting the same names at once leave a consistent registry.

Run with file locks on and off (DELTAHUB_NO_LOCKS=1): locks only save duplicate work, correctness comes
from unique temp files, atomic renames and create-only ref entries (reliability.md §2, HF #4306).
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from deltahub.registry import Registry

from _registry_fixtures import local_blobs_ok, make_artifact, worker

# processes racing each other; DELTAHUB_TEST_WORKERS="2,8,16" runs the battery's full range (RELIABILITY.md)
WORKER_COUNTS = [int(n) for n in os.environ.get("DELTAHUB_TEST_WORKERS", "2,4").split(",")]
ROUNDS = int(os.environ.get("DELTAHUB_TEST_ROUNDS", "6"))


@pytest.fixture(scope="module")
def pool():
    """One pool of spawned processes for every run (each spawn imports torch: pay for it once)."""
    with mp.get_context("spawn").Pool(max(WORKER_COUNTS)) as p:
        yield p


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("conc-arts")
    return [str(make_artifact(d, "expert", seed).folder) for seed in (1, 2, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("locks", [True, False], ids=["locks", "no-locks"])
@pytest.mark.parametrize("target", ["local", "file"])
@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_concurrent_push_pull_gc(pool, folders, tmp_path, monkeypatch, target, locks, workers):
    home = tmp_path / "home"
    env = {"DELTAHUB_HOME": str(home), "DELTAHUB_NO_LOCKS": "" if locks else "1",
           "DELTAHUB_NO_PROGRESS": "1", "DELTAHUB_LOAD_PLUGINS": ""}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    url = None if target == "local" else (tmp_path / "shared").as_uri()
    results = pool.map(worker, [(url, folders, i, ROUNDS, env) for i in range(workers)], chunksize=1)
    assert [p for ps in results for p in ps] == []

    from deltahub.artifact import Artifact

    expected = {Artifact.load(f).id for f in folders}
    for reg in ([Registry()] if url is None else [Registry(url), Registry()]):
        assert reg.verify() == []
        refs = reg.ls()
        assert {r.ref for r in refs} >= {"shared:latest"}
        for r in refs:
            assert r.id in expected
            assert reg.resolve(r.ref).id == r.id  # on Registry(url) this pulls it into the local registry
    root = home / "registry"
    assert local_blobs_ok(root)
    leftovers = [p for p in (root / "tmp").rglob("*") if p.is_file()] if (root / "tmp").is_dir() else []
    assert leftovers == []
