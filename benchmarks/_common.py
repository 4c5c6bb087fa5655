"""Shared helpers for the benchmark scripts: interleaved timing, the machine/versions header, tables.

Timing protocol (used by every script that compares paths): one *round* calls every path once, in an
order rotated from round to round, and each call is preceded by its ``setup`` (outside the timed
region: e.g. restoring a fresh copy of the weight). Medians are taken over rounds. Benchmarks report
ratios against a baseline timed in the same rounds, since absolute figures on a shared machine move
with the neighbours' load while the paths being compared see the same conditions.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "neon", "sve")  # what the dense kernels can use


def cpu_model() -> str:
    """CPU model name, family/model and notable SIMD flags from /proc/cpuinfo (Linux), else ``platform``'s."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    extra = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    extra += [f"cache {info['cache size']}"] if "cache size" in info else []
    flags = set(info.get("flags", info.get("features", "")).split())
    extra += [", ".join(f for f in SIMD_FLAGS if f in flags)] if flags & set(SIMD_FLAGS) else []
    return name + (f" ({'; '.join(extra)})" if extra else "")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions of the interpreter and the libraries the timings depend on."""
    return {"python": platform.python_version(),
            **{d: _version(d) for d in ("torch", "numpy", "safetensors", "zstandard", "deltahub")}}


def git_commit() -> str:
    """Short commit of the checkout, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def header(title: str, notes: Sequence[str] = ()) -> str:
    """A markdown block naming the machine, the versions and the date: paste it beside the figures."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    v = versions()
    lines = [
        f"## {title}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.platform()}; CPU: {cpu_model()}; {os.cpu_count()} logical cores "
        f"({usable} usable); torch threads: {torch.get_num_threads()}",
        f"- load average (1/5/15 min) at start: {load_average()}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- commit: {git_commit()}",
        *(f"- {n}" for n in notes),
    ]
    return "\n".join(lines)


def interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int,
                setup: Callable[[str], object] | None = None, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of ``repeats`` calls of every function, interleaved round by round.

    Round r calls the functions in insertion order rotated by r; ``setup(name)`` runs before each
    call, outside the timed region. ``warmup`` untimed rounds come first (first-touch page faults,
    lazy initialisation). The garbage collector is paused while a call is timed.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if setup is not None:
                setup(name)
            gc_was = gc.isenabled()
            gc.disable()
            try:
                t0 = time.perf_counter()
                fns[name]()
                dt = time.perf_counter() - t0
            finally:
                if gc_was:
                    gc.enable()
            if r >= warmup:
                times[name].append(dt)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def mark(ok: bool | None) -> str:
    """✅ / ❌ for a target, "—" where there is none."""
    return "—" if ok is None else ("✅" if ok else "❌")
