"""The registry layout on any backend: content-addressed blobs, create-only refs, in-flight intents.

::

    blobs/sha256/<hex>                    every artifact file, and the canonical manifest (its hex = the artifact id)
    refs/<name>/<tag>/<time_ns>-<id>      create-only; the newest entry of a tag wins; a small JSON summary inside
    intents/<time_ns>-<nonce>.json        "a push is using these blobs": gc keeps them while the intent is young
    bases/<fingerprint>.json              (local registry only) where a base model lives, by reference

A push writes its intent, then the blobs (skipping those already there with the right size), then the
manifest blob, then the ref entry, so a reader never sees a ref whose blobs are not all stored yet.
Every read checks size, then sha256, before anything is parsed or installed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deltahub.errors import ArtifactNotFoundError, DeltaHubError, IntegrityError, RegistryError
from deltahub.hashing import copy_hashing, sha256_file, sha256_stream
from deltahub.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from deltahub.registry import backends
from deltahub.registry.backends import Backend, LocalBackend, backoff, tmp_file
from deltahub.registry.refs import (
    RefEntry,
    RefInfo,
    check_name,
    entry_bytes,
    intent_path,
    looks_like_id,
    newest,
    parse_ref_path,
    ref_info,
    split_name_tag,
    summary,
)

MAX_ENTRY_BYTES = 64 << 10


def blob_rel(hex_: str) -> str:
    return f"blobs/sha256/{hex_}"


def progress(total: int, desc: str) -> Any:
    """A byte progress bar on stderr (hidden when piped or with DELTAHUB_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    from deltahub.constants import progress_disabled

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False, disable=progress_disabled())


def bar_callback(bar: Any) -> Any:
    """An fsspec callback that feeds ``bar`` (fsspec reports absolute and relative progress)."""
    from fsspec.callbacks import Callback

    class _Cb(Callback):
        reported = 0

        def call(self, *args: Any, **kwargs: Any) -> None:
            step, self.reported = self.value - self.reported, self.value
            if step > 0:
                bar.update(step)

    return _Cb()


class Store:
    """One registry on one backend. ``clock`` (seconds, like ``time.time``) is injectable for gc tests."""

    def __init__(self, backend: Backend, *, clock: Any = None):
        import time

        self.backend = backend
        self.clock = clock or time.time
        self.problems: list[str] = []  # invalid names seen by the last listing (hostile or damaged store)
        self.label = backend.url  # how messages name this registry
        self._ls_arg = f" {backend.url}"

    @property
    def url(self) -> str:
        return self.backend.url

    def now_ns(self) -> int:
        return int(self.clock() * 1e9)

    # ---------------------------------------------------------------------------------------- blobs
    def has_blob(self, hex_: str, size: int, *, deep: bool = False) -> bool:
        """Present with the right size (and, if ``deep``, the right sha256)."""
        info = self.backend.info(blob_rel(hex_))
        if info is None or info.size != size:
            return False
        try:
            return not deep or self.hash_blob(hex_) == (size, hex_)
        except FileNotFoundError:
            return False  # deleted (by a concurrent gc) since we looked

    def hash_blob(self, hex_: str) -> tuple[int, str]:
        """(size, sha256) of a stored blob, streamed; a remote mismatch is re-read before it is believed."""
        def once() -> tuple[int, str]:
            with self.backend.open(blob_rel(hex_)) as f:
                return sha256_stream(f)

        tries = 1 if self.backend.is_local else backends.ATTEMPTS
        for attempt in range(tries):
            got = self.backend.call(f"read {blob_rel(hex_)}", once)
            if got[1] == hex_ or attempt == tries - 1:
                return got
            backoff(attempt)  # a flipped byte in transit is not corruption at rest
        raise AssertionError("unreachable")

    def put_blob(self, hex_: str, size: int, src: Path, callback: Any = None) -> bool:
        """Store the file ``src`` as blob ``hex_``; False if it was already there (then only its age is refreshed).

        Raises:
            IntegrityError: ``src`` does not hash to ``hex_`` (it changed after it was verified).
        """
        rel, b = blob_rel(hex_), self.backend
        if self.has_blob(hex_, size, deep=b.is_local):  # local hashing is cheap and repairs a damaged blob
            b.touch(rel)
            return False
        if isinstance(b, LocalBackend):
            with b.lock(f"blob-{hex_[:16]}"), tmp_file(b) as tmp:
                got = copy_hashing(src, tmp, callback)
                if got != (size, hex_):
                    raise IntegrityError(f"{src} changed while it was being stored (sha256 mismatch); "
                                         "verify the artifact and push again.")
                b.install(tmp, rel)
            return True
        if not b.upload(rel, src, create_only=True, callback=callback):
            info = b.info(rel)  # a lost response to our own PUT also lands here (see test_s3server)
            if info is None or info.size != size:
                b.upload(rel, src, create_only=False, callback=callback)  # repair a truncated object
        return True

    def get_blob(self, hex_: str, size: int, dst: Path, callback: Any = None) -> None:
        """Download blob ``hex_`` to the local file ``dst``; it is complete and verified when this returns.

        Raises:
            ArtifactNotFoundError: the blob is missing. IntegrityError: wrong size or sha256 on every try.
        """
        rel, last = blob_rel(hex_), ""
        tries = 1 if self.backend.is_local else backends.ATTEMPTS
        for attempt in range(tries):
            info = self.backend.info(rel)
            if info is None:
                raise ArtifactNotFoundError(
                    f"Blob {hex_[:12]} is missing from {self.url}: the registry is damaged. "
                    f"Run `deltahub verify --registry {self.url}` and push the artifact again.")
            if info.size != size:  # checked before downloading: a 100-byte blob must not stream 1 TB
                last = f"it has {info.size} bytes, expected {size}"
                break
            self.backend.download(rel, dst, callback)
            got = dst.stat().st_size
            if got == size and sha256_file(dst)[1] == hex_:
                return
            last = f"received {got} of {size} bytes" if got != size else "sha256 mismatch"
            if attempt < tries - 1:
                backoff(attempt)
        raise IntegrityError(f"Blob {hex_[:12]} from {self.url} is corrupted ({last}); nothing was stored. "
                             f"Run `deltahub verify --registry {self.url}`.")

    # ---------------------------------------------------------------------------------------- manifests
    def read_manifest(self, id_: str) -> tuple[bytes, Manifest]:
        """The canonical manifest bytes stored under ``id_``, checked by size cap and sha256, then parsed.

        Raises:
            ArtifactNotFoundError: no such manifest blob. IntegrityError: it does not hash to ``id_``.
            ManifestError, FormatVersionError, UnsafePathError: a bad manifest.
        """
        rel = blob_rel(id_)
        missing = ArtifactNotFoundError(f"Artifact {id_[:12]} has no manifest in {self.url}; it was deleted or never "
                                        f"fully pushed. Run `deltahub verify --registry {self.url}`.")
        tries = 1 if self.backend.is_local else backends.ATTEMPTS
        for attempt in range(tries):
            info = self.backend.info(rel)
            if info is None:
                raise missing
            if info.size > MAX_MANIFEST_BYTES:
                raise IntegrityError(f"Manifest blob {id_[:12]} in {self.url} is {info.size} bytes; "
                                     "it is not a manifest.")
            try:
                raw = self.backend.read(rel, MAX_MANIFEST_BYTES)
            except FileNotFoundError:
                raise missing from None
            if hashlib.sha256(raw).hexdigest() == id_:
                manifest = parse_manifest(raw)
                if manifest.id != id_:
                    raise IntegrityError(f"Manifest blob {id_[:12]} in {self.url} is not in canonical form; "
                                         "push it again.")
                return raw, manifest
            if attempt < tries - 1:
                backoff(attempt)
        raise IntegrityError(f"Manifest blob {id_[:12]} in {self.url} is corrupted (sha256 mismatch); "
                             "push the artifact again.")

    def put_manifest(self, raw: bytes) -> bool:
        id_ = hashlib.sha256(raw).hexdigest()
        if self.has_blob(id_, len(raw), deep=self.backend.is_local):
            self.backend.touch(blob_rel(id_))
            return False
        if not self.backend.put_bytes(blob_rel(id_), raw, create_only=not self.backend.is_local):
            info = self.backend.info(blob_rel(id_))
            if info is None or info.size != len(raw):
                self.backend.put_bytes(blob_rel(id_), raw, create_only=False)
        return True

    # ---------------------------------------------------------------------------------------- refs
    def entries(self, name: str | None = None, tag: str | None = None) -> list[RefEntry]:
        """Every valid ref entry (or those of ``name:tag``, one listing of that folder only).

        Invalid (possibly hostile) names are skipped; a full listing notes them in ``problems``.
        """
        prefix = "refs"
        if name is not None and tag is not None:
            prefix = f"refs/{check_name(name)}/{check_name(tag, 'tag')}"
        out, problems = [], []
        for rel in sorted(self.backend.walk(prefix)):
            e = parse_ref_path(rel) if rel.startswith(prefix + "/") else None
            if e is None:
                problems.append(f"{rel!r}: not a valid ref entry (ignored); remove it from {self.url}")
            else:
                out.append(e)
        if prefix == "refs":
            self.problems = problems
        return out

    def read_entry(self, e: RefEntry) -> bytes | None:
        try:
            return self.backend.read(e.path, MAX_ENTRY_BYTES)
        except (FileNotFoundError, DeltaHubError):
            return None

    def ls(self) -> list[RefInfo]:
        best = newest(self.entries())
        return [ref_info(e, self.read_entry(e), self.url) for _, e in sorted(best.items())]

    def write_ref(self, name: str, tag: str, id_: str, info: dict[str, Any]) -> RefEntry:
        """Point ``name:tag`` at ``id_`` with a new create-only entry (none if it already points there)."""
        cur = newest(self.entries(name, tag)).get((name, tag))
        if cur is not None and cur.id == id_:
            return cur
        ns = max(self.now_ns(), cur.time_ns + 1 if cur else 0)  # our own move always sorts after what we saw
        entry = RefEntry(check_name(name), check_name(tag, "tag"), ns, id_)
        self.backend.put_bytes(entry.path, entry_bytes(entry, info), create_only=True)
        return entry

    def lookup(self, ref: str, extra_ids: Iterable[str] = ()) -> tuple[str, RefEntry | None]:
        """(id, winning entry or None) for ``name[:tag]``, ``sha256:HEX`` or a unique id prefix.

        Raises:
            UnsafePathError, RegistryError: a bad name; an ambiguous id prefix.
            ArtifactNotFoundError: nothing matches.
        """
        if not ref.startswith("sha256:"):
            try:
                name, tag = split_name_tag(ref)
            except DeltaHubError:
                if not looks_like_id(ref):
                    raise
            else:
                hit = newest(self.entries(name, tag)).get((name, tag))
                if hit is not None:
                    return hit.id, hit
        prefix = looks_like_id(ref)
        if prefix:
            ids = sorted({e.id for e in self.entries()} | set(extra_ids))
            found = [i for i in ids if i.startswith(prefix)]
            if len(found) > 1:
                raise RegistryError(f"Id prefix {prefix!r} matches {len(found)} artifacts; give more digits.")
            if found:
                return found[0], None
        raise ArtifactNotFoundError(f"No artifact {ref!r} in {self.label}{self._other_tags(ref)}; see `deltahub ls{self._ls_arg}`.")

    def _other_tags(self, ref: str) -> str:
        """`` (tags of NAME: v1, v2)`` when the name exists under other tags: the usual `:latest` surprise."""
        try:
            name, _ = split_name_tag(ref)
            tags = sorted({e.tag for e in self.entries() if e.name == name})
        except DeltaHubError:
            return ""
        return f" (tags of {name}: {', '.join(tags)})" if tags else ""

    # ---------------------------------------------------------------------------------------- push
    def push(self, art: Any, name: str, tag: str) -> RefInfo:
        """Store a loaded, verified :class:`~deltahub.artifact.Artifact` and point ``name:tag`` at it.

        Raises:
            UnsafePathError, RegistryError: a bad name or tag. IntegrityError: a file changed under us.
            RemoteError, AuthError: the store failed.
        """
        check_name(name)
        check_name(tag, "tag")
        self.backend.check()
        raw = art.manifest.canonical_bytes()
        id_ = hashlib.sha256(raw).hexdigest()
        files = {f.sha256: (f.size, art.folder / f.path) for f in art.manifest.files}
        intent = self.begin_intent([*files, id_])
        try:
            with progress(sum(s for s, _ in files.values()), f"push {name}:{tag}") as bar:
                for h, (size, src) in files.items():
                    if not self.put_blob(h, size, src, bar_callback(bar)):
                        bar.update(size)
            self.put_manifest(raw)
            entry = self.write_ref(name, tag, id_, summary(art.manifest, len(raw)))
            self._post_check(files, raw)
        finally:
            self.end_intent(intent)
        return ref_info(entry, entry_bytes(entry, summary(art.manifest, len(raw))), self.url)

    def _post_check(self, files: dict[str, tuple[int, Path]], raw: bytes) -> None:
        """Re-store anything a concurrent gc deleted between our existence check and our ref write."""
        for h, (size, src) in files.items():
            if not self.has_blob(h, size):
                self.put_blob(h, size, src)
        if not self.has_blob(hashlib.sha256(raw).hexdigest(), len(raw)):
            self.put_manifest(raw)

    def begin_intent(self, blobs: list[str]) -> str:
        rel = intent_path(self.now_ns(), uuid.uuid4().hex[:16])
        self.backend.put_bytes(rel, json.dumps({"blobs": sorted(set(blobs))}).encode(), create_only=True)
        return rel

    def end_intent(self, rel: str) -> None:
        try:
            self.backend.delete(rel)
        except (DeltaHubError, OSError):
            pass  # an old intent is only a hint; gc removes it after the grace period
