"""R7 of the reliability battery: ``kill -9`` at random points of push, pull and gc, then check the registry.

Each run starts the verb as a user does (a fresh ``deltahub`` process) on a fresh copy of a prepared
state, sends SIGKILL after a uniformly drawn delay in [T/3, T) (T: the verb's uninterrupted wall time; the
first third is mostly interpreter start-up, where a kill can hit nothing),
then, in this process:

1. ``verify`` of the registry the verb wrote to finds no problem (no damaged blob, every ref resolves);
2. every ref it lists materializes into a complete, verified artifact;
3. the same verb run again to completion succeeds, and ``verify`` is still clean (debris does not block).

    python tests/crash_battery.py [--runs 200]      # the table in RELIABILITY.md

(``tests/test_crash.py`` runs it with fewer runs in the default suite.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

CLI = [sys.executable, "-c", "from deltahub.cli import main; main()"]


def make_state(tmp: Path) -> dict[str, Any]:
    """Two dense artifacts of ~8 MB each; a remote holding both; a local registry ready for gc."""
    import torch
    from safetensors.torch import save_file

    import deltahub
    from deltahub.registry import Registry

    gen = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(320, 320, generator=gen) for i in range(20)}
    (tmp / "base").mkdir()
    save_file(base, str(tmp / "base" / "model.safetensors"))
    arts = []
    for k in range(2):
        ft = tmp / f"ft{k}"
        ft.mkdir()
        save_file({n: v + 0.01 * torch.randn(v.shape, generator=gen) for n, v in base.items()},
                  str(ft / "model.safetensors"))
        arts.append(deltahub.compress(str(ft), base=str(tmp / "base"), codec="dense", out=tmp / f"art{k}",
                                      name=f"expert{k}"))
    remote = tmp / "remote"
    for a in arts:
        Registry(f"file://{remote}").push(a.folder)
    gc_home = tmp / "gc-home"  # both pushed, then expert0's ref removed: gc has 8 MB of blobs to delete
    with _home(gc_home):
        for a in arts:
            Registry().push(a.folder)
    shutil.rmtree(gc_home / "registry" / "refs" / "expert0")
    gc_remote = tmp / "gc-remote"
    shutil.copytree(remote, gc_remote)
    shutil.rmtree(gc_remote / "refs" / "expert0")
    return {"arts": [str(a.folder) for a in arts], "remote": remote, "gc_home": gc_home, "gc_remote": gc_remote}


def _home(path: Path) -> Any:
    """DELTAHUB_HOME set to ``path`` for a ``with`` block (restored after)."""
    return mock.patch.dict(os.environ, {"DELTAHUB_HOME": str(path)})


def operations(state: dict[str, Any]) -> dict[str, tuple]:
    """name -> (prepare(work) -> (argv, registry URL or None), what verify checks)."""
    remote, art = state["remote"], state["arts"][1]

    def push_local(work: Path):
        return ["push", art, "--tag", "v1"], None

    def push_file(work: Path):
        return ["push", art, "--to", f"file://{work / 'remote'}"], f"file://{work / 'remote'}"

    def pull_file(work: Path):
        return ["pull", f"file://{remote}/expert1"], None

    def gc_local(work: Path):
        shutil.copytree(state["gc_home"], work / "home")
        return ["gc", "--grace", "0"], None

    def gc_file(work: Path):
        shutil.copytree(state["gc_remote"], work / "remote")
        return ["gc", "--registry", f"file://{work / 'remote'}", "--grace", "0"], f"file://{work / 'remote'}"

    return {"push → local": push_local, "push → file://": push_file, "pull file:// → local": pull_file,
            "gc local": gc_local, "gc file://": gc_file}


def _run(argv: list[str], home: Path, kill_after: float | None) -> tuple[float, bool]:
    env = {**os.environ, "DELTAHUB_HOME": str(home), "DELTAHUB_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([*CLI, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv}: exit {proc.returncode}: {err.decode()[-2000:]}")
        return time.perf_counter() - t0, False
    try:
        proc.wait(timeout=kill_after)
        return time.perf_counter() - t0, False  # it finished first
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return time.perf_counter() - t0, True


def check(url: str | None, home: Path) -> list[str]:
    """Problems of the registry at ``url`` (or the local one under ``home``): verify, then every ref in full."""
    from deltahub.errors import DeltaHubError
    from deltahub.registry import Registry

    with _home(home):
        reg = Registry(url)
        problems = list(reg.verify())
        for ref in reg.ls():
            try:
                if url is None:
                    reg.local.resolve(f"{ref.name}:{ref.tag}")
                else:
                    Registry().pull(f"{url}/{ref.name}:{ref.tag}")
            except DeltaHubError as exc:
                problems.append(f"{ref.name}:{ref.tag}: {exc}")
    return problems


def battery(tmp: Path, runs: int, *, seed: int = 0) -> list[dict[str, Any]]:
    state = make_state(tmp)
    rng = random.Random(seed)
    rows = []
    for name, prepare in operations(state).items():
        work = tmp / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        argv, _ = prepare(work)
        full = _run(argv, work / "home", None)[0]  # T, on a fresh state
        killed = problems = recovered = 0
        first_problem = ""
        for _ in range(runs):
            shutil.rmtree(work)
            work.mkdir()
            argv, url = prepare(work)
            _, was_killed = _run(argv, work / "home", rng.uniform(full / 3, full))
            killed += was_killed
            found = check(url, work / "home")
            _run(argv, work / "home", None)  # the same verb again, to completion
            found += check(url, work / "home")
            recovered += not found
            problems += bool(found)
            first_problem = first_problem or "; ".join(found)[:300]
        rows.append({"op": name, "runs": runs, "killed": killed, "T": full, "problems": problems,
                     "recovered": recovered, "first_problem": first_problem})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| operation | runs | killed mid-run | uninterrupted s | runs with a problem | re-run clean |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['op']} | {r['runs']} | {r['killed']} | {r['T']:.2f} | {r['problems']} | {r['recovered']} |")
    return "\n".join(out)


if __name__ == "__main__":
    n = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 200
    with tempfile.TemporaryDirectory() as d:
        result = battery(Path(d), n)
    print(table(result))
    for r in result:
        if r["first_problem"]:
            print(f"{r['op']}: {r['first_problem']}")
