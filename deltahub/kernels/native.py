"""The compiled CPU path: ``cpu_kernels.c`` built once with the system C compiler, loaded with ctypes.

Why not torch alone: the one-rounding rule makes a pure-torch apply of a packed layout into bf16 cost about
six passes over each block (index cast, table gather, int8 → fp32, bf16 → fp32, add, fp32 → bf16), where the
fused C loop makes one (BENCHMARKS.md, kernels). Why not a torch C++ extension: building against torch's
headers takes ~1 minute; this file compiles in ~1-2 s and needs no Python headers.

The library is cached under ``$DELTAHUB_KERNEL_CACHE`` (default ``<DELTAHUB_HOME>/kernels``), keyed by the
sha256 of the source, the compiler's version and the CPU's flags (``-march=native``), and written through a
temporary file and an atomic rename so concurrent processes never load a half-written library.
``DELTAHUB_KERNEL_CFLAGS`` adds compiler flags (``-mno-avx512f`` builds the portable loops only). No compiler,
a failed build or ``DELTAHUB_KERNEL_BACKEND=torch``: the torch paths serve, and the reason is logged once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from deltahub.constants import home

logger = logging.getLogger(__name__)

ENV_CACHE = "DELTAHUB_KERNEL_CACHE"
ENV_CFLAGS = "DELTAHUB_KERNEL_CFLAGS"  # extra compiler flags, e.g. "-mno-avx512f" (part of the cache key)
SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC"]
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.int8: 4,
               torch.uint16: 5, torch.int32: 6}
MIN_SPLIT = 1 << 18  # elements per thread below which splitting costs more than it saves (~50 µs a task)

_state: dict[str, Any] = {}
i64, f64, ptr, cint = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "dh_apply_codes": [ptr, ptr, i64, cint, i64, i64, i64, i64, ptr, cint, ptr, i64, f64],
    "dh_apply_mask": [ptr, ptr, i64, cint, i64, i64, i64, ptr, ptr, i64, ptr, f64, f64],
    "dh_apply_csr": [ptr, ptr, i64, cint, i64, i64, i64, ptr, ptr, cint, ptr, cint, f64, f64],
    "dh_apply_dense": [ptr, ptr, cint, ptr, cint, i64, i64, f64],
}


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or home() / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    """$CC when set (and only it), else cc, gcc or clang on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _flags() -> list[str]:
    return [*FLAGS, *os.environ.get(ENV_CFLAGS, "").split()]


def _build(cc: str) -> Path:
    flags = _flags()
    version = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(flags), platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"deltahub_cpu_{key}.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=lib.parent)
    os.close(fd)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], check=False, capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        os.replace(tmp, lib)
        logger.info("compiled deltahub CPU kernels in %.2f s: %s", time.perf_counter() - t0, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (the reason is in :func:`unavailable_reason` and logged once)."""
    if "lib" in _state:
        return _state["lib"]
    lib, reason = None, None
    cc = _compiler()
    if cc is None:
        reason = f"no C compiler found ({'CC=' + os.environ['CC'] if os.environ.get('CC') else 'cc, gcc, clang'})"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            lib, reason = None, f"building the CPU kernels failed ({exc})"
    if reason:
        logger.warning("deltahub: %s; using the slower torch CPU paths.", reason)
    _state["lib"], _state["reason"] = lib, reason
    return lib


def unavailable_reason() -> str | None:
    library()
    return _state.get("reason")


def _pool() -> ThreadPoolExecutor:
    if "pool" not in _state:
        _state["pool"] = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="deltahub")
    return _state["pool"]


def run_split(fn: Any, lo: int, hi: int, work: int, args: tuple[Any, ...]) -> None:
    """Call ``fn(*args)`` with the ``...`` in ``args`` replaced by (start, stop), over [lo, hi) in up to
    ``torch.get_num_threads()`` parts (ctypes releases the GIL, so the parts run in parallel)."""
    units = hi - lo
    parts = max(1, min(torch.get_num_threads(), units, work // MIN_SPLIT))
    bounds = [lo + units * i // parts for i in range(parts + 1)]
    calls = [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]
    if len(calls) == 1:
        _check(fn(*_place(args, *calls[0])))
        return
    for rc in _pool().map(lambda se: fn(*_place(args, *se)), calls):
        _check(rc)


def _place(args: tuple[Any, ...], start: int, stop: int) -> tuple[Any, ...]:
    """Insert (start, stop) where the signature wants them: marked by the ``...`` placeholder in ``args``."""
    i = args.index(Ellipsis)
    return (*args[:i], start, stop, *args[i + 1:])


def _check(rc: int) -> None:
    if rc != 0:
        raise TypeError(f"the compiled CPU kernel refused these dtypes (code {rc})")


def addr(t: torch.Tensor) -> int:
    return t.data_ptr()
