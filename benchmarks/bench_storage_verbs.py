"""Wall time of the storage verbs (push, pull, ls, verify, gc) as a user runs them: one fresh process each.

    python benchmarks/bench_storage_verbs.py [--mb 20] [--repeats 5]

The artifact is a ``dense`` expert of about ``--mb`` MB (20 tensors). Every verb runs through the console
entry point in a new interpreter, interleaved round by round with two baselines in the same rounds:
``deltahub --help`` (the CLI's fixed cost) and ``python -c "import torch"`` (what the verbs no longer pay).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DELTAHUB_NO_PROGRESS", "1")

from _common import header, interleaved, median, table

CLI = [sys.executable, "-c", "from deltahub.cli import main; main()"]  # the console script, on this interpreter


def _artifact(tmp: Path, mb: int) -> Path:
    import torch
    from safetensors.torch import save_file

    import deltahub

    side = int((mb * 1e6 / 4 / 20) ** 0.5)
    gen = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(side, side, generator=gen) for i in range(20)}
    for name, tensors in (("base", base), ("ft", {k: v + 0.01 * torch.randn(v.shape, generator=gen)
                                                 for k, v in base.items()})):
        (tmp / name).mkdir()
        save_file(tensors, str(tmp / name / "model.safetensors"))
    return deltahub.compress(str(tmp / "ft"), base=str(tmp / "base"), codec="dense", out=tmp / "expert").folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-verbs-"))
    try:
        folder = _artifact(tmp, args.mb)
        size = sum(p.stat().st_size for p in folder.iterdir())
        remote = f"file://{tmp / 'remote'}"
        env = {**os.environ, "DELTAHUB_HOME": str(tmp / "home")}

        def run(*argv: str, home: Path | None = None) -> None:
            e = env if home is None else {**env, "DELTAHUB_HOME": str(home)}
            subprocess.run([*CLI, *argv], env=e, check=True, stdout=subprocess.DEVNULL)

        run("push", str(folder), "--to", remote)  # the remote holds it before the rounds start
        fns = {
            "`deltahub --help` (baseline)": lambda: run("--help"),
            '`python -c "import torch"`': lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True),
            "push folder → local registry": lambda: run("push", str(folder), home=tmp / "h-push"),
            "push folder → file://": lambda: run("push", str(folder), "--to", f"file://{tmp / 'r-push'}"),
            "pull file:// → empty local registry": lambda: run("pull", f"{remote}/expert", home=tmp / "h-pull"),
            "ls file://": lambda: run("ls", remote),
            "verify file://": lambda: run("verify", "--registry", remote),
            "gc file:// (dry run)": lambda: run("gc", "--registry", remote, "--dry-run"),
        }

        def fresh(name: str) -> None:  # every push and pull starts from an empty target
            for d in ("h-push", "h-pull", "r-push"):
                shutil.rmtree(tmp / d, ignore_errors=True)

        times = interleaved(fns, repeats=args.repeats, setup=fresh)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = median(times["`deltahub --help` (baseline)"])
    rows = [(name, f"{median(ts):.2f}", f"{median(ts) / base:.2f}x") for name, ts in times.items()]
    print(header("Storage verbs, one process each", [f"dense artifact of {size / 1e6:.1f} MB, 20 tensors; "
                                                     f"median of {args.repeats} interleaved rounds"]))
    print(table(["command", "median s", "vs --help"], rows))


if __name__ == "__main__":
    main()
