"""Write codec payloads into safetensors shards, with an optional zstd stage per payload tensor."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import zstandard
from safetensors.torch import save_file

from deltahub.checkpoint import dtype_name
from deltahub.codecs import Encoded
from deltahub.manifest import PayloadKey

SHARD_BYTES = 2 << 30  # 2 GiB per payload file: one safetensors file is built in memory before writing
ZSTD_MIN_BYTES = 4096  # below this the frame overhead eats the gain
ZSTD_MIN_GAIN = 0.97  # keep zstd only if it saves at least 3%: Golomb streams and signs are incompressible
ZSTD_LEVEL = 3  # ~115 MB/s here; level 19 is 1-2 MB/s and gains little (research/perf.md §4.2)


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class PayloadWriter:
    """Collects payload tensors and flushes them to ``payload-NNNNN.safetensors`` shards in ``folder``."""

    def __init__(self, folder: Path, *, zstd: bool = True):
        self.folder = folder
        self.zstd = zstd
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._index = 0
        self.files: list[str] = []
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    @property
    def current_file(self) -> str:
        return f"payload-{self._index + 1:05d}.safetensors"

    def add(self, name: str, enc: Encoded) -> tuple[str, dict[str, PayloadKey], str]:
        """Store one tensor's payload; returns (file, role -> PayloadKey, sha256 over stored bytes)."""
        if self._pending_bytes >= SHARD_BYTES:
            self.flush()
        keys: dict[str, PayloadKey] = {}
        h = hashlib.sha256()
        for role in sorted(enc.tensors):
            t = enc.tensors[role].detach().cpu().contiguous()
            raw = _bytes(t)
            key = f"{name}::{role}"
            stored, stage = t, "raw"
            if self.zstd and len(raw) >= ZSTD_MIN_BYTES:
                packed = self._cctx.compress(raw)
                if len(packed) < ZSTD_MIN_GAIN * len(raw):
                    stored, stage = torch.frombuffer(bytearray(packed), dtype=torch.uint8), "zstd"
            if stage == "raw" and t.dim() == 0:
                stored = t.reshape(1)  # safetensors keeps 0-d, but a 1-element vector is simpler to validate
            self._pending[key] = stored
            self._pending_bytes += stored.numel() * stored.element_size()
            h.update(_bytes(stored))
            # dtype/shape/nbytes are the logical tensor's (after undoing the stage); `stored` is what the file holds
            keys[role] = PayloadKey(key=key, dtype=dtype_name(t.dtype), shape=list(stored.shape if stage == "raw" else t.shape),
                                    stage=stage, nbytes=len(raw), stored=stored.numel() * stored.element_size())
        return self.current_file, keys, h.hexdigest()

    def flush(self) -> None:
        if not self._pending:
            return
        save_file(self._pending, str(self.folder / self.current_file))
        self.files.append(self.current_file)
        self._pending, self._pending_bytes = {}, 0
        self._index += 1
