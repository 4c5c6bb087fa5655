"""The Hugging Face Hub remote: ``hf://org/repo[@revision]``, one artifact per repo (DESIGN §2.6).

Push: ``create_repo(exist_ok=True)``, then ONE commit holding ``deltahub.json``, every payload the manifest lists
and a freshly rendered ``README.md`` model card (with this repo id in its pull commands). Files the previous
manifest of the repo listed and the new one does not are deleted in the same commit. A second push of the same
artifact uploads nothing: the client skips LFS objects the Hub has and makes no empty commit.

Pull: list the repo at the revision (resolved once to a commit sha, so a moving branch cannot mix two pushes)
and refuse the whole repo if any name could escape a folder (``..``, absolute, drive, UNC, backslash, NUL)
BEFORE downloading anything; download ``deltahub.json`` alone (checked against the Hub's git blob id), parse
it strictly, then download exactly the files it lists into the destination folder and check each one's size
and sha256 against the manifest (the Hub client only checks sizes). A file that does not match is downloaded
again (a flipped byte in transit is not corruption at rest), then refused with :class:`IntegrityError`.

Token and endpoint come from huggingface_hub's own settings (``HF_TOKEN``, ``HF_ENDPOINT``, ``hf auth login``),
read at call time. Transient failures (5xx, 429, resets, timeouts) are retried with a short backoff and then
raised as :class:`RemoteError`; auth failures are :class:`AuthError`; a missing repo, revision or file is
:class:`ArtifactNotFoundError`. Progress bars are huggingface_hub's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deltahub.constants import CARD_NAME
from deltahub.errors import (
    ArtifactNotFoundError,
    AuthError,
    DeltaHubError,
    IntegrityError,
    RegistryError,
    RemoteError,
    UnsafePathError,
)
from deltahub.hashing import sha256_file
from deltahub.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, check_relpath, parse_manifest
from deltahub.registry.backends import ATTEMPTS, backoff
from deltahub.registry.hf_client import (
    COMMIT_RE,
    SCHEME,
    HubCalls,
    HubURL,
    git_blob_sha1,
    http_status,
    hub_api,
    parse_hub_url,
)

__all__ = ["SCHEME", "HubRemote", "HubURL", "parse_hub_url"]


class HubRemote(HubCalls):
    """One Hub repo as a deltahub remote.

    Example::

        remote = HubRemote("hf://my-org/sentiment-expert")
        remote.push_artifact("./expert", name="sentiment", tag="latest")
        folder = remote.pull_artifact(None, "./download")   # verified folder; or Registry().pull(url)
    """

    scheme = "hf"

    def __init__(self, url: str, *, private: bool | None = None):
        self.parsed = parse_hub_url(url)
        self.repo_id = self.parsed.repo_id
        self.revision = self.parsed.revision
        self.private = private

    @property
    def url(self) -> str:
        return self.parsed.url

    def __repr__(self) -> str:
        return f"HubRemote({self.url!r})"

    # ---------------------------------------------------------------------------------------- listing
    def _resolve(self, api: Any) -> tuple[str, Any]:
        """(commit sha, repo info) of the revision, so every later request reads one commit."""
        info = self._call("read", lambda: api.repo_info(self.repo_id, revision=self.revision))
        sha = getattr(info, "sha", None)
        if not isinstance(sha, str) or not COMMIT_RE.match(sha):
            raise RemoteError(f"The Hub gave no commit for {self.url}; retry later.")
        return sha, info

    def _tree(self, api: Any, sha: str) -> dict[str, Any]:
        """Every file of the commit, by path. Raises UnsafePathError on the first hostile name (nothing is downloaded)."""
        from huggingface_hub.hf_api import RepoFile

        entries = self._call("list", lambda: list(api.list_repo_tree(self.repo_id, revision=sha, recursive=True)),
                             revision=sha)
        files: dict[str, Any] = {}
        for e in sorted(entries, key=lambda e: not isinstance(e, RepoFile)):  # name a hostile file before its folder
            path = getattr(e, "path", None)
            try:
                check_relpath(path if isinstance(path, str) else "", portable=False)  # other files may be any name
            except UnsafePathError:
                raise UnsafePathError(f"{self._where()} holds a file named {path!r} that could escape the download folder; "
                                      "refusing to pull anything from it.") from None
            if isinstance(e, RepoFile):
                files[path] = e
        return files

    # ---------------------------------------------------------------------------------------- pull
    def _download(self, api: Any, sha: str, filename: str, dest: Path, attempt_box: list[int]) -> Path:
        from huggingface_hub import hf_hub_download

        from deltahub._version import __version__

        force = attempt_box[0] > 0
        attempt_box[0] += 1
        return Path(hf_hub_download(self.repo_id, filename, revision=sha, local_dir=dest, force_download=force,
                                    library_name="deltahub", library_version=__version__))

    def _fetch_checked(self, api: Any, sha: str, filename: str, dest: Path,
                       check: Callable[[Path], None]) -> Path:
        """Download ``filename`` of commit ``sha`` into ``dest``, then ``check`` it; a mismatch is fetched again."""
        box = [0]

        def once() -> Path:
            path = self._download(api, sha, filename, dest, box)
            if path.resolve() != (dest / filename).resolve():  # belt and braces: the client stays inside dest
                raise UnsafePathError(f"{self._where()}: {filename!r} was written outside the download folder.")
            check(path)
            return path

        return self._call("download", once, revision=sha, filename=filename)

    def fetch(self, dest: str | Path) -> tuple[Manifest, Path, str]:
        """Download and verify the artifact into the new or empty folder ``dest``.

        Returns:
            (manifest, dest, commit sha). ``dest`` then holds ``deltahub.json`` and exactly the files it lists, each
            checked for size and sha256; nothing else (no card, no ``.cache``).

        Raises:
            UnsafePathError: a hostile file name in the repo (nothing was downloaded).
            ArtifactNotFoundError: no such repo / revision, or the repo holds no deltahub artifact.
            IntegrityError: a file does not match the manifest, even after downloading it again.
            ManifestError, FormatVersionError: a bad manifest. AuthError, RemoteError: the Hub refused or failed.
            On any error ``dest`` is emptied again (and removed if this call created it).
        """
        dest = Path(dest)
        created = not dest.exists()
        if not created and (not dest.is_dir() or any(dest.iterdir())):
            raise RegistryError(f"{dest} must be a new or empty folder to pull {self.url} into.")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            return self._fetch(dest)
        except BaseException:
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            else:
                for p in list(dest.iterdir()):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            raise

    def _fetch(self, dest: Path) -> tuple[Manifest, Path, str]:
        api = hub_api()
        sha, _info = self._resolve(api)
        files = self._tree(api, sha)
        where = self._where()
        mentry = files.get(MANIFEST_NAME)
        if mentry is None:
            raise ArtifactNotFoundError(f"{where} holds no {MANIFEST_NAME}: it is not a deltahub artifact. "
                                        f"Push one with `deltahub push NAME --to {SCHEME}{self.repo_id}`.")
        if mentry.size > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"{where}: {MANIFEST_NAME} has {mentry.size} bytes, more than a manifest may; refusing it.")

        def check_manifest(path: Path) -> None:
            data = path.read_bytes()
            lfs = getattr(mentry, "lfs", None)
            ok = (len(data) == mentry.size and
                  (hashlib.sha256(data).hexdigest() == lfs.sha256 if lfs else git_blob_sha1(data) == mentry.blob_id))
            if not ok:
                raise IntegrityError(f"{where}: the downloaded {MANIFEST_NAME} does not match the Hub's hash of it; "
                                     "it was corrupted in transit. Pull again.")

        mpath = self._fetch_checked(api, sha, MANIFEST_NAME, dest, check_manifest)
        manifest = parse_manifest(mpath.read_bytes())
        for f in manifest.files:  # compare with the listing before downloading megabytes
            if f.path.split("/")[0] == ".cache" or f.path in (MANIFEST_NAME, CARD_NAME):
                raise UnsafePathError(f"{where}: its {MANIFEST_NAME} lists {f.path!r}, a reserved name; refusing it.")
            remote = files.get(f.path)
            if remote is None:
                raise IntegrityError(f"{where} lacks {f.path!r}, which its {MANIFEST_NAME} lists: the artifact on the Hub "
                                     "is incomplete. Push it again.")
            lfs = getattr(remote, "lfs", None)
            if remote.size != f.size or (lfs is not None and lfs.sha256 != f.sha256):
                raise IntegrityError(f"{where}: {f.path!r} on the Hub ({remote.size} bytes) is not the file its "
                                     f"{MANIFEST_NAME} lists ({f.size} bytes, sha256 {f.sha256[:12]}); push it again.")
        for f in manifest.files:
            def check(path: Path, f: Any = f) -> None:
                size, digest = sha256_file(path)
                if size != f.size:
                    raise IntegrityError(f"{where}: {f.path} has {size} bytes, the manifest says {f.size}: it is truncated "
                                         "or corrupted. Pull again.")
                if digest != f.sha256:
                    raise IntegrityError(f"{where}: {f.path} does not match its sha256 in the manifest: it is corrupted. "
                                         "Pull again.")

            self._fetch_checked(api, sha, f.path, dest, check)
        shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's local_dir metadata
        return manifest, dest, sha

    @classmethod
    def split_ref(cls, ref: str) -> tuple[str, str]:
        """``hf://org/repo[@rev]`` -> (``hf://org/repo``, ``@rev`` or ``""``): the repo is the registry, the revision
        the ref inside it (see :func:`deltahub.registry.remote.split_ref`).

        Raises:
            RegistryError: not a Hub URL of that form.
        """
        parsed = parse_hub_url(ref)
        return SCHEME + parsed.repo_id, f"@{parsed.revision}" if parsed.revision else ""

    def _for(self, ref: str | None) -> HubRemote:
        """The remote for ``ref``: ""/None (this URL), ``@REV`` or ``REV`` (a branch or commit), or a full hf:// URL."""
        if not ref or ref == self.url:
            return self
        if ref.startswith(SCHEME):
            return HubRemote(ref, private=self.private)
        return HubRemote(self.parsed.at(ref.removeprefix("@")), private=self.private)

    def pull_artifact(self, ref: str | None, dest: str | Path) -> Any:
        """Download the artifact at ``ref`` into the new or empty folder ``dest``, every file verified.

        Args:
            ref: ``""`` / None (the revision of this remote's URL, default ``main``), ``@REV`` or ``REV`` (a branch
                or a 40-hex commit), or a full ``hf://org/repo[@rev]`` URL.
            dest: receives ``deltahub.json`` and exactly the files it lists, each checked for size and sha256.

        Returns:
            A :class:`~deltahub.registry.refs.RefInfo`: ``name`` is the manifest's name, ``tag`` is ``latest`` for
            the main branch, the branch name for another branch, ``<commit[:12]>`` for a pinned commit; ``url``
            pins the commit (``hf://org/repo@<sha>``).

        Raises:
            As :meth:`fetch`; on error nothing is left in ``dest``.
        """
        from deltahub.registry.refs import RefInfo, summary

        remote = self._for(ref)
        manifest, _folder, sha = remote.fetch(dest)
        return RefInfo(name=remote._local_name(manifest), tag=remote._local_tag(sha), id=manifest.id,
                       created=datetime.now(timezone.utc),
                       url=remote.parsed.at(sha), **summary(manifest, len(manifest.canonical_bytes())))

    def _local_tag(self, sha: str) -> str:
        """The local tag a pull of this URL gets: ``latest`` for main, the branch name, or the commit's 12 digits."""
        from deltahub.registry.refs import DEFAULT_TAG, is_valid_name

        rev = self.revision
        if rev is None or rev == "main":
            return DEFAULT_TAG
        if COMMIT_RE.match(rev):
            return rev[:12]
        return rev if is_valid_name(rev) else sha[:12]

    def _local_name(self, manifest: Manifest) -> str:
        from deltahub.registry.refs import check_name, is_valid_name

        return manifest.name if is_valid_name(manifest.name) else check_name(self.repo_id.split("/")[1])

    def pull(self, registry: Any = None) -> Any:
        """Download, verify and store in the local registry (``registry``: a LocalRegistry, default the local one).

        Returns the registry's :class:`~deltahub.artifact.Artifact`. Nothing unverified is stored. The same as
        ``deltahub.Registry().pull(self.url)``.
        """
        from deltahub.registry.backends import remove_tree
        from deltahub.registry.local import LocalRegistry, new_import_dir

        reg = registry if registry is not None else LocalRegistry()
        dest = new_import_dir(reg)
        try:
            info = self.pull_artifact(None, dest)
            return reg.import_folder(dest, info.name, info.tag)
        finally:
            remove_tree(dest)

    # ---------------------------------------------------------------------------------------- push
    def push_artifact(self, artifact: Any, *, name: str | None = None, tag: str | None = None,
                      private: bool | None = None) -> Any:
        """Create the repo if needed and upload the artifact with its model card in one commit.

        Args:
            artifact: an artifact folder or a loaded :class:`~deltahub.artifact.Artifact` (verified again here).
            name, tag: recorded in the commit message (the repo holds one artifact; ``@BRANCH`` in the URL picks
                the branch, default ``main``).
            private: visibility of a repo this call creates (None: the Hub's default); existing repos keep theirs.

        Returns:
            A :class:`~deltahub.registry.refs.RefInfo` whose ``url`` pins the commit (``hf://org/repo@<sha>``).

        Raises:
            AuthError: no token, a wrong token, or no write access. ArtifactNotFoundError: the branch does not exist.
            RemoteError: the Hub failed after retries. IntegrityError: the local artifact does not verify.
        """
        from deltahub.artifact import Artifact
        from deltahub.registry.refs import DEFAULT_TAG, RefInfo, summary

        art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)  # loaded = verified
        if self.revision and COMMIT_RE.match(self.revision):
            raise RegistryError(f"Cannot push to a commit ({self.url}); push to a branch: {SCHEME}{self.repo_id}[@BRANCH].")
        branch = self.revision or "main"
        name = name or art.name
        tag = tag or DEFAULT_TAG
        api = hub_api()
        private = self.private if private is None else private
        self._call("create", lambda: api.create_repo(self.repo_id, exist_ok=True, private=private), write=True)
        from deltahub._version import __version__

        raw = (art.folder / MANIFEST_NAME).read_bytes()
        if parse_manifest(raw).id != art.id:
            raw = art.manifest.to_json().encode()
        from deltahub.card import render_card

        card = render_card(art.manifest, repo_id=self.repo_id, revision=self.revision).encode()
        message = f"deltahub push {name}:{tag} ({art.manifest.stats.get('codec', '?')}, id {art.id[:12]})"
        description = f"deltahub {__version__}; artifact id sha256:{art.id}"

        def attempt() -> Any:
            head, stale = self._stale_files(api, branch, {f.path for f in art.manifest.files})
            return api.create_commit(self.repo_id, self._operations(art, raw, card, stale), commit_message=message,
                                     commit_description=description, revision=branch, parent_commit=head)

        for round_ in range(ATTEMPTS):  # a concurrent push (412) means: look at the new head and commit again
            try:
                info = self._call("push to", attempt, revision=branch, write=True)
                break
            except RemoteError as exc:
                if http_status(exc.__cause__) != 412 or round_ == ATTEMPTS - 1:
                    raise
                backoff(round_)
        commit = getattr(info, "oid", None) or self._call("read", lambda: api.repo_info(self.repo_id, revision=branch)).sha
        entry_info = summary(art.manifest, len(art.manifest.canonical_bytes()))
        return RefInfo(name=name, tag=tag, id=art.id, created=datetime.now(timezone.utc), url=self.parsed.at(commit),
                       **entry_info)

    def _stale_files(self, api: Any, branch: str, keep: set[str]) -> tuple[str | None, list[str]]:
        """(head commit of ``branch``, files the repo's current manifest lists that the new one does not)."""
        from huggingface_hub.hf_api import RepoFile

        head = api.repo_info(self.repo_id, revision=branch).sha
        files = {e.path for e in api.list_repo_tree(self.repo_id, revision=head, recursive=True) if isinstance(e, RepoFile)}
        if MANIFEST_NAME not in files:
            return head, []
        with tempfile.TemporaryDirectory(prefix="deltahub-hf-old-") as tmp:
            from huggingface_hub import hf_hub_download

            try:
                old = parse_manifest(Path(hf_hub_download(self.repo_id, MANIFEST_NAME, revision=head,
                                                          local_dir=tmp)).read_bytes())
            except DeltaHubError:
                return head, []  # an unreadable old manifest: delete nothing
        stale = []
        for f in old.files:
            with contextlib.suppress(UnsafePathError):
                if f.path in files and f.path not in keep and check_relpath(f.path) not in (MANIFEST_NAME, CARD_NAME):
                    stale.append(f.path)
        return head, stale

    @staticmethod
    def _operations(art: Any, raw: bytes, card: bytes, stale: list[str]) -> list[Any]:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list[Any] = [CommitOperationAdd(path_in_repo=MANIFEST_NAME, path_or_fileobj=raw)]
        ops += [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(art.folder / f.path)) for f in art.manifest.files]
        ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card))
        ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
        return ops

    # ---------------------------------------------------------------------------------------- ls / verify
    def ls(self) -> list[Any]:
        """The artifact of the repo at its revision, as one :class:`RefInfo` (an empty list if it holds none).

        ``name`` is the manifest's name, ``tag`` the revision asked for (default ``main``), ``url`` pins the commit.
        """
        from deltahub.registry.refs import RefInfo, summary

        api = hub_api()
        sha, info = self._resolve(api)
        files = self._tree(api, sha)
        with tempfile.TemporaryDirectory(prefix="deltahub-hf-ls-") as tmp:
            entry = files.get(MANIFEST_NAME)
            if entry is None or entry.size > MAX_MANIFEST_BYTES:
                return []
            path = self._call("download", lambda: Path(__import__("huggingface_hub").hf_hub_download(
                self.repo_id, MANIFEST_NAME, revision=sha, local_dir=tmp)), revision=sha, filename=MANIFEST_NAME)
            raw = path.read_bytes()
            manifest = parse_manifest(raw)
        created = getattr(info, "last_modified", None) or datetime.now(timezone.utc)
        return [RefInfo(name=self._local_name(manifest), tag=self._local_tag(sha), id=manifest.id, created=created,
                        url=self.parsed.at(sha), **summary(manifest, len(manifest.canonical_bytes())))]

    def verify(self) -> list[str]:
        """Download the artifact into a temporary folder and check every file; the problems found (empty: fine)."""
        with tempfile.TemporaryDirectory(prefix="deltahub-hf-verify-") as tmp:
            try:
                self.fetch(Path(tmp) / "artifact")
            except (IntegrityError, UnsafePathError) as exc:
                return [str(exc)]
            except DeltaHubError as exc:
                if isinstance(exc, (AuthError, RemoteError, ArtifactNotFoundError)):
                    raise
                return [str(exc)]
        return []
