"""Helpers shared by the registry tests: tiny real artifacts, blob surgery, and a CLI boundary runner.

Imported by test_registry*.py and test_concurrency.py (and by spawned worker processes, so nothing
here may depend on pytest fixtures at import time).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any


def make_pair(folder: Path, seed: int = 0, *, noise: float = 0.01) -> tuple[Path, Path]:
    """A tiny base checkpoint and a "fine-tune" (base + noise) as safetensors files in ``folder``."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1000)  # the base is the same for every seed
    base = {"layer.0.weight": torch.randn(16, 8, generator=g), "layer.0.bias": torch.randn(16, generator=g),
            "layer.1.weight": torch.randn(4, 16, generator=g)}
    g2 = torch.Generator().manual_seed(seed)
    ft = {k: v + noise * torch.randn(v.shape, generator=g2) for k, v in base.items()}
    base_path, ft_path = folder / "base.safetensors", folder / f"ft-{seed}.safetensors"
    if not base_path.exists():
        save_file(base, str(base_path))
    save_file(ft, str(ft_path))
    return base_path, ft_path


def make_artifact(folder: Path, name: str = "expert", seed: int = 0) -> Any:
    """A real dense artifact named ``name`` (fine-tune ``seed`` of the shared tiny base) in ``folder/name``."""
    import deltahub

    base, ft = make_pair(folder / "models", seed)
    out = folder / f"{name}-{seed}" / name
    return deltahub.compress(str(ft), base=str(base), codec="dense", out=out)


def blob_path(root: Path, hex_: str) -> Path:
    return root / "blobs" / "sha256" / hex_


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip one byte of a (read-only) stored file in place."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int | None = None) -> None:
    os.chmod(path, 0o644)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def local_blobs_ok(root: Path) -> bool:
    """Every file under blobs/sha256 hashes to its own name (no bad bytes were ever installed)."""
    folder = root / "blobs" / "sha256"
    if not folder.is_dir():
        return True
    return all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in folder.iterdir())


def cli(args: list[str]) -> Any:
    """Run ``deltahub ARGS`` through the real entry point (its error boundary) with click's CliRunner."""
    from click.testing import CliRunner

    from deltahub.cli import main

    class _Boundary:
        name = "deltahub"

        def main(self, args: Any = None, prog_name: Any = None, **_kw: Any) -> Any:
            return main(list(args or ()))

    return CliRunner().invoke(_Boundary(), args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- concurrency
def worker(args: tuple[str | None, list[str], int, int, dict[str, str]]) -> list[str]:
    """One task of the concurrency test: push and pull the same names, resolve and decode what it sees.

    args: (registry url or None for the local one, artifact folders, worker index, rounds, environment)
    Returns the problems it saw (a typed error is a problem too: nothing may fail here).
    """
    url, folders, index, rounds, env = args
    os.environ.update(env)  # pool processes are reused across runs with different homes and lock settings
    if not env.get("DELTAHUB_NO_LOCKS"):
        os.environ.pop("DELTAHUB_NO_LOCKS", None)
    from deltahub.registry import Registry

    rng = random.Random(index)
    reg = Registry(url)
    problems: list[str] = []
    for r in range(rounds):
        folder = folders[rng.randrange(len(folders))]
        try:
            info = reg.push(folder, name="shared", tag="latest")
            reg.push(folder, name=f"w{index % 2}", tag=f"r{r % 2}")  # two workers share each of these names too
            art = reg.resolve("shared") if url is None else Registry().pull(f"{url}/shared:latest")
            if len(art.id) != 64 or len(info.id) != 64:
                problems.append(f"worker {index}: bad id")
            art.decode()
            if r == rounds // 2:
                reg.gc(grace_seconds=3600)  # must never delete anything an in-flight push needs
        except Exception as exc:  # noqa: BLE001 - report every failure to the parent
            problems.append(f"worker {index} round {r}: {type(exc).__name__}: {exc}")
    return problems
