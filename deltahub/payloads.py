"""Reading payload bytes safely: the checks safetensors leaves out, and the zstd stage undone with caps.

Both run after the file's size and sha256 matched the manifest, so they guard against a hostile writer
(who can always make the hashes agree), not against damage in transit.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import zstandard

from deltahub.errors import IntegrityError

if TYPE_CHECKING:
    import torch


def check_safetensors_header(data: bytes, name: str) -> None:
    """What the safetensors parser lets through (measured with 0.8.0): duplicate keys, text before the ``{``.

    The parser keeps the last of two equal keys, so a file could show one tensor to a hash-less reader and
    another to us; both are refused, as the safetensors format says.

    Raises:
        IntegrityError: a duplicate key or a header that does not start with ``{``.
    """
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if len(data) < 8 or 8 + n > len(data):
        return  # the parser reports these with its own message
    head = data[8:8 + n]
    if not head.startswith(b"{"):
        raise IntegrityError(f"{name}: the safetensors header does not start with '{{'; the artifact is corrupt.")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise IntegrityError(f"{name}: the safetensors header names a tensor twice; the artifact is corrupt.")
        return dict(items)

    try:
        json.loads(head, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return  # not JSON: the parser says so


def _unzstd(data: bytes, pk: Any) -> bytes:
    """One zstd frame that declares exactly ``pk.nbytes`` of content, with nothing after it (DESIGN §2.1).

    The declared size is checked before any decoding (a frame cannot then inflate past it: zstd stops at
    the declared content size), and trailing bytes or a second frame are refused.
    """
    try:
        declared = zstandard.get_frame_parameters(data).content_size
        if declared != pk.nbytes:
            raise IntegrityError(f"Payload {pk.key!r} is a zstd frame of {declared} bytes, the manifest says {pk.nbytes}.")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        raw = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"Payload {pk.key!r} is not valid zstd ({exc}); the artifact is corrupt.") from None
    if not dobj.eof or dobj.unused_data:
        raise IntegrityError(f"Payload {pk.key!r} has bytes after its zstd frame; the artifact is corrupt.")
    if len(raw) != pk.nbytes:
        raise IntegrityError(f"Payload {pk.key!r} decompressed to {len(raw)} bytes, the manifest says {pk.nbytes}.")
    return raw


def unwrap(t: torch.Tensor, pk: Any) -> torch.Tensor:
    """Undo a payload key's lossless stage; check dtype, shape and decoded size against the manifest."""
    import torch

    from deltahub.checkpoint import dtype_from_name

    dtype = dtype_from_name(pk.dtype)
    if t.numel() * t.element_size() != pk.stored:
        raise IntegrityError(f"Payload {pk.key!r} holds {t.numel() * t.element_size()} bytes, the manifest says {pk.stored}.")
    if pk.stage == "zstd":
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise IntegrityError(f"Payload {pk.key!r} should hold zstd bytes; the artifact is corrupt.")
        raw = _unzstd(t.numpy().tobytes(), pk)
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
        t = t.reshape(pk.shape)
    if t.dtype != dtype or list(t.shape) != list(pk.shape) or t.numel() * t.element_size() != pk.nbytes:
        raise IntegrityError(f"Payload {pk.key!r} is {t.dtype} {list(t.shape)}, the manifest says {pk.dtype} {pk.shape}.")
    return t
