"""Base models known to the local registry, by reference (never copied) and by fingerprint.

``bases/<fingerprint>.json`` says where a base lives on this machine. A record written by
:func:`register_base` without a delta in hand carries every tensor's hashes, so later deltas that touch
any subset of the base find it; a record written for a delta (automatically on push, or after a
successful lookup) is an alias under that delta's fingerprint. Records are hints: a base is returned only
after :func:`deltahub.fingerprint.verify_base` has checked its bytes (hashes are cached by path, size and
mtime, so this is cheap after the first time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deltahub.errors import BaseMismatchError, BaseNotFoundError, CheckpointError, DeltaHubError, RemoteError
from deltahub.manifest import BaseInfo
from deltahub.registry.backends import LocalBackend
from deltahub.registry.refs import is_hex_id

HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.txt", "*.model", "*.tiktoken"]
MAX_RECORD_BYTES = 64 << 20


def _rel(fingerprint: str) -> str:
    return f"bases/{fingerprint}.json"


def _write(backend: LocalBackend, record: dict[str, Any]) -> None:
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    backend.put_bytes(_rel(record["fingerprint"]), data, create_only=False)


def _read(backend: LocalBackend, rel: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(backend.read(rel, MAX_RECORD_BYTES))
    except (OSError, ValueError, DeltaHubError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("path"), str) else None


def register_base(backend: LocalBackend, path: str | os.PathLike[str], base_info: BaseInfo | None = None) -> str:
    """Record the base at ``path`` (by reference) and return the fingerprint it is filed under.

    With ``base_info`` the base is first checked against it and filed under its fingerprint; without,
    every tensor is hashed and the base is filed under the root hash of all of them.

    Raises:
        CheckpointError: no readable safetensors checkpoint at ``path``.
        BaseMismatchError: ``base_info`` given and the weights do not match it.
    """
    from deltahub.checkpoint import Checkpoint
    from deltahub.fingerprint import hash_tensors, root_hash, verify_base

    p = Path(path).expanduser().resolve()
    ckpt = Checkpoint.open(p)
    if base_info is not None:
        verify_base(ckpt, base_info.tensors, artifact="the delta's recorded base")
        _write(backend, {"fingerprint": base_info.fingerprint, "path": str(p), "name": base_info.name})
        return base_info.fingerprint
    entries = hash_tensors(ckpt, ckpt.keys())
    fp = root_hash(entries)
    tensors = {e.name: [e.dtype, list(e.shape), e.sha256, e.sha256_bf16, e.sha256_fp16] for e in entries}
    _write(backend, {"fingerprint": fp, "path": str(p), "tensors": tensors})
    return fp


def _covers(rec: dict[str, Any], base_info: BaseInfo) -> bool:
    """Cheap pre-check from a full record's hashes, before the real verification."""
    tensors = rec.get("tensors")
    if not isinstance(tensors, dict):
        return False
    for t in base_info.tensors:
        row = tensors.get(t.name)
        if not isinstance(row, list) or len(row) != 5 or row[1] != list(t.shape):
            return False
        if row[2] not in (t.sha256, t.sha256_bf16, t.sha256_fp16):
            return False
    return True


def _candidates(backend: LocalBackend, base_info: BaseInfo) -> list[tuple[str, bool]]:
    """(path, is it already filed under this fingerprint) in the order worth trying."""
    out: list[tuple[str, bool]] = []
    if is_hex_id(base_info.fingerprint):
        rec = _read(backend, _rel(base_info.fingerprint))
        if rec is not None:
            out.append((rec["path"], True))
    for rel in sorted(backend.walk("bases")):
        if rel != _rel(base_info.fingerprint) and rel.endswith(".json"):
            rec = _read(backend, rel)
            if rec is not None and _covers(rec, base_info):
                out.append((rec["path"], False))
    if base_info.location.get("path"):
        out.append((base_info.location["path"], False))  # where compress saw it: often still there
    return out


def find_base(backend: LocalBackend, base_info: BaseInfo) -> Path | None:
    """The registered (or recorded) base whose bytes match ``base_info``, or None."""
    from deltahub.checkpoint import Checkpoint
    from deltahub.fingerprint import verify_base

    tried: set[str] = set()
    for path, filed in _candidates(backend, base_info):
        if path in tried or not Path(path).exists():
            continue
        tried.add(path)
        try:
            verify_base(Checkpoint.open(path), base_info.tensors)
        except (BaseMismatchError, CheckpointError):
            continue  # moved, edited or replaced since it was recorded
        if not filed and is_hex_id(base_info.fingerprint):
            _write(backend, {"fingerprint": base_info.fingerprint, "path": str(Path(path).resolve()),
                             "name": base_info.name})
        return Path(path)
    return None


def find_base_named(backend: LocalBackend, name: str) -> Path | None:
    """A registered base recorded under ``name`` (or whose folder is called so) that still exists, or None.

    For adapters whose config names their base (PEFT's ``base_model_name_or_path``): names are hints, so the
    adapter is then bound to that base's bytes by fingerprint, as with ``--base``.
    """
    for rel in sorted(backend.walk("bases")):
        rec = _read(backend, rel) if rel.endswith(".json") else None
        if rec is not None and name in (rec.get("name"), Path(rec["path"]).name) and Path(rec["path"]).exists():
            return Path(rec["path"])
    return None


def auto_register(backend: LocalBackend, base_info: BaseInfo) -> Path | None:
    """On push: note the base's recorded local path under the delta's fingerprint, unless one is filed.

    Nothing is read or hashed here (push moves bytes and stays free of torch): the note is a candidate,
    and :func:`find_base` verifies it before any use, replacing it when it no longer matches.
    """
    loc = base_info.location
    if not loc.get("path") or not Path(loc["path"]).exists() or not is_hex_id(base_info.fingerprint):
        return None
    if _read(backend, _rel(base_info.fingerprint)) is None:
        _write(backend, {"fingerprint": base_info.fingerprint, "path": str(Path(loc["path"]).resolve()),
                         "name": base_info.name})
    return Path(loc["path"])


def fetch_base(backend: LocalBackend, base_info: BaseInfo) -> Path:
    """Find, or fetch and verify, the base ``base_info`` names (``pull --with-base``), and register it.

    Raises:
        BaseNotFoundError: it is not here and its recorded location is missing or unknown.
        BaseMismatchError: the recorded location holds different weights.
        RemoteError: the Hub download failed.
    """
    found = find_base(backend, base_info)
    if found is not None:
        return found
    loc = base_info.location
    if loc.get("type") == "path" and loc.get("path"):
        p = Path(loc["path"])
        if not p.exists():
            raise BaseNotFoundError(f"The base was recorded at {p}, which does not exist here; copy it there, "
                                    "or register it with `deltahub.Registry().register_base(PATH)`.")
        register_base(backend, p, base_info)
        return p
    if loc.get("type") == "hub" and loc.get("repo"):
        folder = _download_hub(loc["repo"], loc.get("revision"))
        register_base(backend, folder, base_info)
        return folder
    raise BaseNotFoundError("The artifact records no location for its base; pass --base BASE to `deltahub apply`.")


def _download_hub(repo: str, revision: str | None) -> Path:
    """snapshot_download of the weights, config and tokenizer files only.

    Raises:
        BaseNotFoundError: no such repo or revision (or offline without a cached copy). RemoteError: other failures.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types; map by name
        kind = type(exc).__name__
        where = f"{repo}@{revision}" if revision else repo
        if kind in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError",
                    "LocalEntryNotFoundError", "GatedRepoError", "OfflineModeIsEnabled"):
            raise BaseNotFoundError(f"Cannot download base {where} from the Hub ({kind}); check the repo, your "
                                    "token (HF_TOKEN) and HF_HUB_OFFLINE, or pass --base.") from None
        raise RemoteError(f"Downloading base {where} from the Hub failed ({kind}: {str(exc)[:200]}); "
                          "retry later.") from None
