"""Base fingerprints (DESIGN §2.2): prove which weights a delta belongs to.

Each touched base tensor is hashed as stored (sha256 of its raw little-endian bytes) and after a cast to
bf16 and to fp16, so a base loaded in half precision for serving is still recognised. The root hash
covers (name, dtype, shape, sha256) of every touched tensor. Hashes of file-backed tensors are cached
by (path, size, mtime) so a 14 GB base is hashed once, not on every call.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import torch

from deltahub.checkpoint import Checkpoint, dtype_name
from deltahub.constants import home
from deltahub.errors import BaseMismatchError
from deltahub.manifest import BaseTensor


def _sha(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def tensor_hashes(t: torch.Tensor) -> tuple[str, str | None, str | None]:
    """sha256 of the tensor as stored, and after a cast to bf16 and fp16 (None for non-float tensors)."""
    if not t.is_floating_point():
        return _sha(t), None, None
    own = _sha(t)
    bf16 = own if t.dtype == torch.bfloat16 else _sha(t.to(torch.bfloat16))
    fp16 = own if t.dtype == torch.float16 else _sha(t.to(torch.float16))
    return own, bf16, fp16


class _Cache:
    """(file, size, mtime_ns, tensor) -> hashes, in DELTAHUB_HOME/cache/fingerprints.sqlite."""

    def __init__(self) -> None:
        path = home() / "cache" / "fingerprints.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30)
        self.db.execute("CREATE TABLE IF NOT EXISTS h (k TEXT PRIMARY KEY, v TEXT)")

    @staticmethod
    def key(file: Path, name: str) -> str:
        st = file.stat()
        return json.dumps([str(file.resolve()), st.st_size, st.st_mtime_ns, name])

    def get(self, key: str) -> tuple[str, str | None, str | None] | None:
        row = self.db.execute("SELECT v FROM h WHERE k = ?", (key,)).fetchone()
        return tuple(json.loads(row[0])) if row else None  # type: ignore[return-value]

    def close(self) -> None:
        self.db.close()

    def put(self, key: str, value: tuple[str, str | None, str | None]) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO h VALUES (?, ?)", (key, json.dumps(value)))


def hash_tensors(ckpt: Checkpoint, names: Iterable[str]) -> list[BaseTensor]:
    """Fingerprint entries for ``names`` of ``ckpt`` (cached for file-backed checkpoints)."""
    out = []
    with closing(_Cache()) if ckpt.files else _nullcache() as cache:
        for name in names:
            dtype, shape = ckpt.info(name)
            file = ckpt.file_of(name)
            key = _Cache.key(file, name) if (file is not None and cache is not None) else None
            hashes = cache.get(key) if key else None
            if hashes is None:
                hashes = tensor_hashes(ckpt.get(name))
                if key:
                    cache.put(key, hashes)
            out.append(BaseTensor(name=name, dtype=dtype_name(dtype), shape=list(shape), sha256=hashes[0],
                                  sha256_bf16=hashes[1], sha256_fp16=hashes[2]))
    return out


class _nullcache:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def root_hash(entries: Iterable[BaseTensor]) -> str:
    """sha256 over the sorted (name, dtype, shape, sha256) of the touched tensors."""
    rows = sorted([e.name, e.dtype, list(e.shape), e.sha256] for e in entries)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _matches(recorded: BaseTensor, given: BaseTensor) -> bool:
    if list(recorded.shape) != list(given.shape):
        return False
    if given.dtype == recorded.dtype:
        return given.sha256 == recorded.sha256
    if given.dtype == "bfloat16":
        return given.sha256 == recorded.sha256_bf16
    if given.dtype == "float16":
        return given.sha256 == recorded.sha256_fp16
    return False


def verify_base(ckpt: Checkpoint, recorded: list[BaseTensor], *, artifact: str = "the delta") -> None:
    """Check that ``ckpt`` holds exactly the weights ``recorded`` (in their dtype or a bf16/fp16 cast).

    Raises:
        BaseMismatchError: any touched tensor is missing or differs; the message says how many matched.
    """
    present = [r for r in recorded if r.name in ckpt]
    given = {g.name: g for g in hash_tensors(ckpt, [r.name for r in present])}
    good = sum(1 for r in present if _matches(r, given[r.name]))
    if good == len(recorded):
        return
    bad = [r.name for r in recorded if r.name not in given or not _matches(r, given[r.name])]
    what = "none" if good == 0 else f"only {good}"
    raise BaseMismatchError(
        f"This base does not match {artifact}: {what} of its {len(recorded)} touched tensors match "
        f"(first mismatch: {bad[0]!r}). Use the base it was made from (see `deltahub inspect`)."
    )
