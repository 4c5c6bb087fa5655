"""The one streaming sha256 of deltahub: files, open streams, and copies hashed on the way (DESIGN §2.1).

Everything stored is addressed by the sha256 of its bytes; hashing streams in 8 MiB chunks so a
multi-GB payload never sits in memory, and a copy is hashed from the bytes it actually wrote.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO, Any

CHUNK = 8 << 20  # 8 MiB: large enough that syscalls are noise, small enough to stay out of the way


def sha256_stream(src: IO[bytes], *, copy_to: IO[bytes] | None = None, callback: Any = None) -> tuple[int, str]:
    """(bytes read, sha256 hex) of the rest of ``src``; each chunk is also written to ``copy_to`` if given,
    and reported to ``callback.relative_update(n)`` (a tqdm-style progress bar) if given."""
    h, n = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
        if callback is not None:
            callback.relative_update(len(chunk))
    return n, h.hexdigest()


def sha256_file(path: str | Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, streamed."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def copy_hashing(src: str | Path, dst: str | Path, callback: Any = None) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` and return (size, sha256) of the bytes actually written."""
    with open(src, "rb") as fin, open(dst, "wb") as out:
        return sha256_stream(fin, copy_to=out, callback=callback)
