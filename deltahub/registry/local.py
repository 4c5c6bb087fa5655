"""The embedded default registry: the store layout under ``DELTAHUB_HOME/registry`` plus conveniences.

On top of :class:`~deltahub.registry.store.Store` it keeps one materialized folder per artifact id,
``artifacts/<id>/`` (hard links to the read-only blobs, or copies where links are not possible), so
:meth:`LocalRegistry.resolve` returns an :class:`~deltahub.artifact.Artifact` whose folder is on disk;
and it files base models by fingerprint (``bases.py``) so ``deltahub apply NAME`` finds its base.
Downloads land in ``tmp/`` and are moved into ``blobs/`` only after their size and sha256 check out:
bad bytes from a remote never enter the registry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from deltahub.errors import DeltaHubError, IntegrityError, ManifestError
from deltahub.manifest import MANIFEST_NAME, check_relpath
from deltahub.registry import bases, maintenance
from deltahub.registry.backends import LocalBackend, fsync_dir, remove_tree, tmp_file
from deltahub.registry.refs import GcReport, RefInfo, check_name, is_hex_id, summary
from deltahub.registry.store import Store, bar_callback, blob_rel, progress


def default_root() -> Path:
    from deltahub.constants import home

    return home() / "registry"


class LocalRegistry:
    """The local registry at ``root`` (default ``DELTAHUB_HOME/registry``)."""

    def __init__(self, root: Path | None = None, *, clock: Any = None):
        self.root = Path(root) if root is not None else default_root()
        self.backend = LocalBackend(self.root)
        self.store = Store(self.backend, clock=clock)
        self.store.label, self.store._ls_arg = "the local registry", ""

    # ------------------------------------------------------------------------------------------ read
    def ids(self) -> set[str]:
        """Ids with a materialized folder (found by id prefix even after their ref moved on)."""
        folder = self.root / "artifacts"
        return {p.name for p in folder.iterdir() if is_hex_id(p.name)} if folder.is_dir() else set()

    def resolve(self, ref: str) -> Any:
        """The verified Artifact for ``name[:tag]``, ``sha256:HEX`` or a unique id prefix.

        Raises:
            ArtifactNotFoundError: no such ref. IntegrityError: its stored bytes are damaged.
            UnsafePathError, RegistryError: a bad name; an ambiguous prefix.
        """
        return self.materialize(self.store.lookup(ref, self.ids())[0])

    def materialize(self, id_: str) -> Any:
        """``artifacts/<id>/`` built from the blobs (once), loaded and verified.

        Raises:
            ArtifactNotFoundError: no manifest blob. IntegrityError: a blob is missing or damaged.
        """
        from deltahub.artifact import Artifact

        target = self.root / "artifacts" / id_
        if (target / MANIFEST_NAME).is_file():
            with contextlib.suppress(IntegrityError, ManifestError):
                return Artifact.load(target)
        _raw, manifest = self.store.read_manifest(id_)
        with self.backend.lock(f"artifact-{id_[:16]}"):
            tmpdir = self.backend.new_tmp("-artifact")
            try:
                self._build(manifest, tmpdir)
                self._swap_in(tmpdir, target)
            finally:
                if tmpdir.exists():
                    remove_tree(tmpdir)
        return Artifact.load(target)

    def _build(self, manifest: Any, folder: Path) -> None:
        folder.mkdir(parents=True)
        for f in manifest.files:
            dst = folder / check_relpath(f.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            src = self.backend.path(blob_rel(f.sha256))
            try:
                os.link(src, dst)  # no copy: the blob is immutable (0444), so the link is too
            except FileNotFoundError:
                raise IntegrityError(f"Blob {f.sha256[:12]} of {manifest.name!r} is missing from the local registry; "
                                     "pull the artifact again.") from None
            except OSError:
                shutil.copyfile(src, dst)
        (folder / MANIFEST_NAME).write_text(manifest.to_json())
        with contextlib.suppress(ImportError, DeltaHubError, ValueError):
            from deltahub.card import render_card
            from deltahub.constants import CARD_NAME

            (folder / CARD_NAME).write_text(render_card(manifest))
        for p in (folder / MANIFEST_NAME, folder / "README.md"):
            if p.is_file():
                with open(p, "rb+") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(folder)

    def _swap_in(self, tmpdir: Path, target: Path) -> None:
        """Rename the new folder into place; a concurrent builder's identical folder may win instead."""
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmpdir, target)
        except OSError:
            if (target / MANIFEST_NAME).is_file():
                from deltahub.artifact import Artifact

                try:
                    Artifact.load(target)
                    return  # someone else built it: same id, same bytes
                except DeltaHubError:
                    pass
            old = self.backend.new_tmp("-old")
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, old)  # a damaged or partial folder: replace it
            os.rename(tmpdir, target)
            remove_tree(old)
        fsync_dir(target.parent)

    # ------------------------------------------------------------------------------------------ write
    def add(self, art: Any, name: str, tag: str) -> RefInfo:
        """Store a verified artifact, point ``name:tag`` at it, and file its base if it is on disk.

        Raises:
            UnsafePathError, RegistryError: a bad name or tag. IntegrityError: a file changed while being stored.
        """
        info = self.store.push(art, name, tag)
        self.materialize(art.id)
        bases.auto_register(self.backend, art.manifest.base)
        return RefInfo(**{**info.__dict__, "url": ""})

    def import_folder(self, folder: Path, name: str, tag: str) -> Any:
        """Verify the artifact folder (e.g. a Hub download) and add it; returns the registry's Artifact.

        Raises:
            ArtifactNotFoundError, IntegrityError, ManifestError, UnsafePathError: not a sound artifact.
        """
        from deltahub.artifact import Artifact

        art = Artifact.load(folder)
        self.add(art, check_name(name), check_name(tag, "tag"))
        return self.materialize(art.id)

    def fetch(self, src: Store, ref: str, *, tag: str | None = None) -> tuple[Any, RefInfo]:
        """Copy artifact ``ref`` from another store into this one, verifying every byte on the way in.

        Only blobs missing here (or damaged here) are downloaded. By-id pulls get the local ref
        ``<manifest name>:<id[:12]>`` rather than moving ``latest``.

        Raises:
            ArtifactNotFoundError, IntegrityError, RemoteError, AuthError, UnsafePathError.
        """
        src.backend.check()
        id_, entry = src.lookup(ref)
        raw, manifest = src.read_manifest(id_)
        name = entry.name if entry is not None else check_name(manifest.name)
        tag = tag or (entry.tag if entry is not None else id_[:12])
        files = {f.sha256: f.size for f in manifest.files}
        intent = self.store.begin_intent([*files, id_])  # our local gc must not race this pull either
        try:
            todo = {h: s for h, s in files.items() if not self.store.has_blob(h, s, deep=True)}
            with progress(sum(todo.values()), f"pull {name}:{tag}") as bar:
                for h, size in todo.items():
                    with tmp_file(self.backend) as tmp:
                        src.get_blob(h, size, tmp, bar_callback(bar))
                        self.backend.install(tmp, blob_rel(h))
            self.store.put_manifest(raw)
            art = self.materialize(id_)
            entry = self.store.write_ref(name, tag, id_, summary(manifest, len(raw)))
        finally:
            self.store.end_intent(intent)
        return art, self.store_info(entry)

    def store_info(self, entry: Any) -> RefInfo:
        from deltahub.registry.refs import ref_info

        return ref_info(entry, self.store.read_entry(entry), "")

    # ------------------------------------------------------------------------------------------ maintenance
    def ls(self) -> list[RefInfo]:
        return [RefInfo(**{**i.__dict__, "url": ""}) for i in self.store.ls()]

    def verify(self, ref: str | None = None) -> list[str]:
        """Store problems, plus materialized folders that no longer verify."""
        from deltahub.artifact import Artifact

        problems = maintenance.verify(self.store, ref, self.ids())
        ids = {self.store.lookup(ref, self.ids())[0]} if ref else self.ids()
        for id_ in sorted(ids):
            folder = self.root / "artifacts" / id_
            if not folder.is_dir():
                continue
            try:
                if Artifact.load(folder).id != id_:
                    problems.append(f"artifacts/{id_[:12]}: holds another artifact; it is rebuilt on the next resolve")
            except DeltaHubError as exc:
                problems.append(f"artifacts/{id_[:12]}: {exc}")
        return problems

    def gc(self, *, grace_seconds: float = 86400, dry_run: bool = False) -> GcReport:
        """Store gc; the materialized folder of an artifact goes just before its manifest blob does."""
        removed: list[str] = []

        def drop_folder(hex_: str) -> None:
            if (self.root / "artifacts" / hex_).is_dir():
                self._drop_materialized(hex_)
                removed.append(hex_)

        report = maintenance.gc(self.store, grace_seconds=grace_seconds, dry_run=dry_run, before_delete=drop_folder)
        gone = {rel.rsplit("/", 1)[-1] for rel in report.deleted_blobs}
        for id_ in sorted(self.ids()):  # folders left by an older gc that was killed, or built from a lost blob
            if id_ in gone or (not dry_run and self.backend.info(blob_rel(id_)) is None):
                if not dry_run:
                    self._drop_materialized(id_)
                removed.append(id_)
        report.deleted_other.extend(f"artifacts/{id_}" for id_ in sorted(set(removed)))
        if not dry_run:
            self._prune_tmp_dirs(grace_seconds)
        return report

    def _drop_materialized(self, id_: str) -> None:
        stale = self.backend.new_tmp("-gc")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.root / "artifacts" / id_, stale)  # readers see it whole or not at all
            remove_tree(stale)

    def _prune_tmp_dirs(self, grace_seconds: float) -> None:
        """Empty or abandoned folders under tmp/ (a crashed materialize or import)."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return
        cutoff = self.store.clock() - grace_seconds
        for p in tmp.iterdir():
            with contextlib.suppress(OSError):
                if p.is_dir() and p.stat().st_mtime < cutoff:
                    remove_tree(p)

    # ------------------------------------------------------------------------------------------ bases
    def register_base(self, path: Any) -> str:
        return bases.register_base(self.backend, path)

    def find_base(self, base_info: Any) -> Path | None:
        return bases.find_base(self.backend, base_info)

    def find_base_named(self, name: str) -> Path | None:
        return bases.find_base_named(self.backend, name)

    def fetch_base(self, base_info: Any) -> Path:
        return bases.fetch_base(self.backend, base_info)


def new_import_dir(reg: LocalRegistry) -> Path:
    """A fresh folder under the registry's tmp/ for a remote to download an artifact into."""
    d = reg.root / "tmp" / f"import-{uuid.uuid4().hex}"
    d.mkdir(parents=True)
    return d
