"""``deltahub.Registry``: one object for the local registry and any remote one.

``Registry()`` is the embedded local registry under ``DELTAHUB_HOME``; ``Registry(url)`` is a remote
(``s3://bucket/prefix``, ``file:///path``, ``memory://root``, ``hf://...``). ``pull`` always lands
in the local registry, so ``resolve``, ``find_base`` and ``deltahub apply NAME`` work offline afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deltahub.errors import RegistryError
from deltahub.manifest import MANIFEST_NAME
from deltahub.registry.backends import remove_tree
from deltahub.registry.local import LocalRegistry, new_import_dir
from deltahub.registry.refs import DEFAULT_TAG, GcReport, RefInfo, check_name, is_valid_name
from deltahub.registry.remote import ObjectStoreRemote, Remote, open_remote, scheme_of, split_ref


class Registry:
    """A registry of artifacts: the local default (``url=None``) or a remote at ``url``.

    Args:
        url: None for the local registry; else a registry URL (``s3://bucket/prefix``, ``file:///path``,
            ``memory://root``, ``hf://org``, any fsspec URL).
        storage_options: passed to fsspec for ``url`` (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        clock: ``time.time``-like function used for ref times and gc ages (tests inject one).
        private: for ``hf://`` targets, create new repos private.

    Raises:
        RegistryError: unknown scheme or missing backend package (``pip install 'deltahub[s3]'``).
    """

    def __init__(self, url: str | os.PathLike[str] | None = None, *, storage_options: dict[str, Any] | None = None,
                 clock: Any = None, private: bool | None = None):
        self.url = None if url is None else os.fspath(url)
        self._opts = storage_options
        self._clock = clock
        self._local: LocalRegistry | None = None
        self._remote: Remote | None = None
        if self.url is not None:
            self._remote = open_remote(self.url, storage_options=storage_options, clock=clock, private=private)

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    @property
    def local(self) -> LocalRegistry:
        """The local registry (where pulls land)."""
        if self._local is None:
            self._local = LocalRegistry(clock=self._clock if self.url is None else None)
        return self._local

    # ------------------------------------------------------------------------------------------ push / pull
    def push(self, src: Any, *, name: str | None = None, tag: str | None = None) -> RefInfo:
        """Store ``src`` in this registry as ``name:tag``.

        Args:
            src: an :class:`~deltahub.artifact.Artifact`, an artifact folder, or (to push to a remote) a
                ``name[:tag]`` / id of the local registry.
            name: default the manifest's name (``compress --name``). tag: default the tag recorded by
                ``compress --name NAME:TAG``, else ``latest``.

        Raises:
            ArtifactNotFoundError: ``src`` is neither an artifact folder nor a local ref.
            IntegrityError: its files do not match the manifest. RegistryError, UnsafePathError: bad name/tag.
            RemoteError, AuthError: the remote failed.
        """
        art = self._source(src)
        name = check_name(name or art.manifest.name)
        recorded = art.manifest.provenance.get("tag")
        if tag is None:
            tag = recorded if isinstance(recorded, str) and is_valid_name(recorded) else DEFAULT_TAG
        tag = check_name(tag, "tag")
        if self._remote is None:
            return self.local.add(art, name, tag)
        return self._remote.push_artifact(art, name=name, tag=tag)

    def _source(self, src: Any) -> Any:
        from deltahub.artifact import Artifact

        if isinstance(src, Artifact):
            return src
        s = os.fspath(src)
        if (Path(s) / MANIFEST_NAME).is_file() or Path(s).exists() or "/" in s or os.sep in s:
            return Artifact.load(s)  # a path: says clearly that it is not an artifact folder
        return self.local.resolve(s)

    def pull(self, ref: str, *, out: str | os.PathLike[str] | None = None, with_base: bool = False) -> Any:
        """Fetch ``ref`` into the local registry and return the verified Artifact.

        Args:
            ref: ``name[:tag]`` or an id (of this registry), or a full ref such as
                ``s3://bucket/prefix/name:tag``, ``file:///path/name``, ``hf://org/repo``.
            out: also write a copy of the artifact to this folder (the returned Artifact lives there).
            with_base: also fetch (if needed), verify and register the base the artifact was made from.

        Raises:
            ArtifactNotFoundError, IntegrityError (nothing bad is stored), RemoteError, AuthError,
            BaseNotFoundError, BaseMismatchError (``with_base``), OutputExistsError (``out``).
        """
        remote, sub = self._remote_for(ref)
        if remote is None:
            art = self.local.resolve(ref)
        elif isinstance(remote, ObjectStoreRemote):
            art, _info = self.local.fetch(remote.store, sub)
        else:
            art = self._pull_generic(remote, sub)
        if with_base:
            self.local.fetch_base(art.manifest.base)
        if out is not None:
            from deltahub.artifact import Artifact

            art = Artifact.load(art.save(out))
        return art

    def _remote_for(self, ref: str) -> tuple[Remote | None, str]:
        if "://" in ref:
            root, sub = split_ref(ref)
            same = self.url is not None and scheme_of(self.url) == scheme_of(root)
            return open_remote(root, storage_options=self._opts if same else None), sub
        return self._remote, ref

    def _pull_generic(self, remote: Remote, sub: str) -> Any:
        dest = new_import_dir(self.local)
        try:
            info = remote.pull_artifact(sub, dest)
            return self.local.import_folder(dest, info.name, info.tag)
        finally:
            remove_tree(dest)

    def resolve(self, ref: str) -> Any:
        """The verified Artifact for ``ref`` (``name[:tag]``, ``sha256:HEX`` or a unique id prefix).

        Local refs are read from the local registry; full remote refs (or any ref on a remote
        ``Registry(url)``) are pulled first.

        Raises:
            ArtifactNotFoundError, IntegrityError, RegistryError (ambiguous prefix), UnsafePathError.
        """
        if "://" in ref or self._remote is not None:
            return self.pull(ref)
        return self.local.resolve(ref)

    # ------------------------------------------------------------------------------------------ listing / upkeep
    def ls(self) -> list[RefInfo]:
        """Every ``name:tag`` (its newest entry) with id, created, size, codec and bits per parameter.

        Raises:
            RemoteError, AuthError, RegistryError (missing bucket).
        """
        return self.local.ls() if self._remote is None else self._remote.ls()

    def verify(self, ref: str | None = None) -> list[str]:
        """Re-hash stored blobs (all, or those of ``ref``) and check every ref resolves; [] means OK.

        Raises:
            ArtifactNotFoundError: ``ref`` given and unknown. RegistryError: the remote cannot be verified.
        """
        if self._remote is None:
            return self.local.verify(ref)
        check = self._upkeep("verify")
        return check() if ref is None else check(ref)

    def gc(self, *, grace_seconds: float = 86400, dry_run: bool = False) -> GcReport:
        """Delete blobs no ref needs that are older than ``grace_seconds`` (and superseded ref entries).

        Raises:
            RegistryError: the remote cannot be garbage-collected (e.g. the Hub). RemoteError, AuthError.
        """
        if self._remote is None:
            return self.local.gc(grace_seconds=grace_seconds, dry_run=dry_run)
        return self._upkeep("gc")(grace_seconds=grace_seconds, dry_run=dry_run)

    def _upkeep(self, what: str) -> Any:
        """The remote's optional ``verify(ref=None)`` / ``gc(grace_seconds=, dry_run=)`` method."""
        fn = getattr(self._remote, what, None)
        if fn is None:
            raise RegistryError(f"{self.url} does not support {what}; it works on the local registry and on "
                                "s3://, file://, memory:// (fsspec) registries.")
        return fn

    # ------------------------------------------------------------------------------------------ bases
    def register_base(self, path: str | os.PathLike[str]) -> str:
        """Record the base model at ``path`` (a folder or ``.safetensors`` file) by reference; returns its fingerprint.

        Raises:
            CheckpointError: no readable safetensors checkpoint there.
        """
        return self.local.register_base(path)

    def find_base(self, base_info: Any) -> Path | None:
        """The registered base whose tensor hashes match ``base_info`` (a manifest's ``base``), or None."""
        return self.local.find_base(base_info)

    def find_base_named(self, name: str) -> Path | None:
        """A registered base recorded under ``name`` (or whose folder has that name), or None."""
        return self.local.find_base_named(name)
