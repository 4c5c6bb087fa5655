"""Remotes: where ``push`` sends artifacts and ``pull`` fetches them from.

A remote is anything implementing :class:`Remote`. Object-store registries (``s3://``, ``gs://``,
``memory://``, ``file://``, any fsspec URL) are :class:`ObjectStoreRemote`; the Hugging Face Hub
(``hf://``) is ``deltahub.registry.hf:HubRemote``, imported only when an ``hf://`` URL is used.
:func:`open_remote` dispatches by URL scheme; :func:`split_ref` cuts a full ref into (registry URL,
ref inside it).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from deltahub.errors import RegistryError
from deltahub.manifest import MANIFEST_NAME, check_relpath
from deltahub.registry import maintenance
from deltahub.registry.backends import open_backend
from deltahub.registry.refs import RefInfo, ref_info
from deltahub.registry.store import Store, bar_callback, progress

# scheme -> "module:Class" for remotes that are not fsspec object stores; the class is built as Class(url)
REMOTES = {"hf": "deltahub.registry.hf:HubRemote"}


@runtime_checkable
class Remote(Protocol):
    """What a registry remote implements (the Hub remote in ``registry/hf.py`` follows this).

    ``url`` is the registry URL the remote was opened with (a full ref minus its last path component,
    see :func:`split_ref`). Artifacts handed to ``push_artifact`` are loaded and verified; folders
    produced by ``pull_artifact`` are verified again by the caller (``Artifact.load``) before anything
    enters the local registry, so a remote need not trust its own downloads, but it MUST refuse file names
    that would escape ``dest`` (use :func:`deltahub.manifest.check_relpath`).
    """

    url: str

    def push_artifact(self, artifact: Any, *, name: str, tag: str) -> RefInfo:
        """Upload ``artifact`` (a :class:`deltahub.artifact.Artifact`) as ``name:tag``; idempotent.

        Raises:
            RemoteError, AuthError: the remote failed or refused. RegistryError: a bad name for this remote.
        """
        ...

    def pull_artifact(self, ref: str, dest: Path) -> RefInfo:
        """Download artifact ``ref`` (the part of a full ref after the registry URL, e.g. ``name:tag``) into
        the new, empty folder ``dest``: its ``deltahub.json`` and every file it lists. Returns where it came
        from; ``name``/``tag`` become the local ref and must pass :func:`deltahub.registry.refs.check_name`.

        Raises:
            ArtifactNotFoundError: no such ref. RemoteError, AuthError. UnsafePathError: hostile file names.
        """
        ...

    def ls(self) -> list[RefInfo]:
        """Every ``name:tag`` of this remote with its artifact id (and size, codec, bits/param if known).

        Raises:
            RemoteError, AuthError.
        """
        ...

    # Optional, found with getattr by Registry.verify / Registry.gc:
    #   verify(ref=None) -> list[str]          problems found (empty = OK), re-hashing what is stored
    #   gc(*, grace_seconds, dry_run) -> GcReport


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _special(scheme: str) -> Any:
    """The remote class registered for ``scheme`` in REMOTES, or None for fsspec object stores."""
    target = REMOTES.get(scheme)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    try:
        return getattr(import_module(module), attr)
    except (ImportError, AttributeError):
        raise RegistryError(f"{scheme}:// remotes are not available in this deltahub installation "
                            f"({target} is missing); upgrade deltahub.") from None


def open_remote(url: str, *, storage_options: dict[str, Any] | None = None, clock: Any = None,
                private: bool | None = None) -> Remote:
    """A remote for registry URL ``url``, chosen by scheme.

    ``private`` is for remotes that have repo visibility (the Hub): new repos are created private.

    Raises:
        RegistryError: unknown scheme, missing backend package (with the pip command to fix it), or
            ``private`` for a remote without visibility settings.
    """
    cls = _special(scheme_of(url))
    if cls is not None:
        return cls(url) if private is None else cls(url, private=private)
    if private is not None:
        raise RegistryError(f"{url} has no private/public setting; --private applies to hf:// targets.")
    return ObjectStoreRemote(url, storage_options=storage_options, clock=clock)


def split_ref(ref: str) -> tuple[str, str]:
    """``s3://bucket/prefix/name:tag`` -> (``s3://bucket/prefix``, ``name:tag``).

    A remote class may define ``split_ref`` (a classmethod) to parse its own refs (the Hub's
    ``hf://org/repo@rev``); otherwise the registry URL is the ref minus its last path component.

    Raises:
        RegistryError: no registry part (``s3://name``) or no name.
    """
    cls = _special(scheme_of(ref))
    if cls is not None and hasattr(cls, "split_ref"):
        return cls.split_ref(ref)
    root, _, last = ref.rstrip("/").rpartition("/")
    rest = root.split("://", 1)[1] if "://" in root else ""
    if not last or not rest.strip("/"):
        raise RegistryError(f"Ref {ref!r} names no registry and artifact; write e.g. s3://bucket/prefix/NAME[:TAG] "
                            "or file:///path/to/registry/NAME[:TAG].")
    return root, last


class ObjectStoreRemote:
    """A registry with the store layout on an fsspec filesystem (or a local folder for ``file://``)."""

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None, clock: Any = None):
        self.url = url.rstrip("/")
        self.store = Store(open_backend(self.url, storage_options), clock=clock)

    def push_artifact(self, artifact: Any, *, name: str, tag: str) -> RefInfo:
        return self.store.push(artifact, name, tag)

    def pull_artifact(self, ref: str, dest: Path) -> RefInfo:
        """Generic folder download (the local registry uses the faster blob-to-blob path instead)."""
        self.store.backend.check()
        id_, entry = self.store.lookup(ref)
        _raw, manifest = self.store.read_manifest(id_)
        dest.mkdir(parents=True, exist_ok=True)
        with progress(sum(f.size for f in manifest.files), f"pull {ref}") as bar:
            for f in manifest.files:
                out = dest / check_relpath(f.path)
                out.parent.mkdir(parents=True, exist_ok=True)
                self.store.get_blob(f.sha256, f.size, out, bar_callback(bar))
        (dest / MANIFEST_NAME).write_text(manifest.to_json())
        if entry is None:
            from deltahub.registry.refs import RefEntry

            entry = RefEntry(manifest.name, id_[:12], 0, id_)
        return ref_info(entry, self.store.read_entry(entry), self.url)

    def ls(self) -> list[RefInfo]:
        self.store.backend.check()
        return self.store.ls()

    def verify(self, ref: str | None = None) -> list[str]:
        self.store.backend.check()
        return maintenance.verify(self.store, ref)

    def gc(self, *, grace_seconds: float = 86400, dry_run: bool = False) -> Any:
        self.store.backend.check()
        return maintenance.gc(self.store, grace_seconds=grace_seconds, dry_run=dry_run)
