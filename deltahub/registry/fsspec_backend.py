"""A registry on any fsspec filesystem (``s3://``, ``gs://``, ``az://``, ...): create-only PUTs, listings, retries.

Object stores have no rename and no fsync: a write is one create-only PUT, and every read is checked by
size and sha256 by the caller (``store.py``). Transient failures are retried with backoff
(:func:`deltahub.registry.backends.backoff`), then surface as :class:`RemoteError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from deltahub.errors import AuthError, DeltaHubError, IntegrityError, RegistryError, RemoteError
from deltahub.registry import backends
from deltahub.registry.backends import UNREACHABLE_NAMES, Backend, FileInfo, backoff, is_transient

T = TypeVar("T")
_EXTRAS = {"s3": "pip install 'deltahub[s3]'", "s3a": "pip install 'deltahub[s3]'", "gs": "pip install gcsfs",
           "gcs": "pip install gcsfs", "az": "pip install adlfs", "abfs": "pip install adlfs",
           "abfss": "pip install adlfs"}
_BUCKETED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def _unreachable(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionRefusedError) or any(c.__name__ in UNREACHABLE_NAMES for c in type(exc).__mro__)


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created", "time_created", "modified"):
        v = info.get(key)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    return None


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, root path) for ``url``.

    Raises:
        RegistryError: unknown scheme, or its backend package is not installed (with the pip command).
    """
    import fsspec

    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    opts = dict(storage_options or {})
    if scheme in ("s3", "s3a"):
        opts.setdefault("use_listings_cache", False)  # other machines write refs; a cached listing would hide them
        opts.setdefault("skip_instance_cache", True)  # a cached client would keep an old endpoint and credentials
    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except ImportError:
        fix = _EXTRAS.get(scheme, f"install the fsspec backend for {scheme}://")
        raise RegistryError(f"{scheme}:// registries need an extra package: {fix}.") from None
    except ValueError as exc:
        raise RegistryError(f"Cannot open registry {url!r} ({exc}); "
                            "use a URL like s3://bucket/prefix or file:///path.") from None
    return fs, root.rstrip("/")


class FsspecBackend(Backend):
    """A registry on any fsspec filesystem: create-only PUTs, listings, retries with backoff."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = open_fs(url, storage_options)
        self.scheme = url.split("://", 1)[0].lower()
        self._checked = False

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one remote operation, retrying transient failures.

        Raises:
            AuthError: access denied. RemoteError: still failing after ATTEMPTS tries, or an unexpected error.
            FileNotFoundError, FileExistsError: passed through for the caller to interpret.
        """
        tries = backends.ATTEMPTS  # read per call so tests can lower it
        for attempt in range(tries):
            try:
                return fn()
            except (FileNotFoundError, FileExistsError, DeltaHubError):
                raise
            except PermissionError as exc:
                raise AuthError(f"{self.url} refused {what} ({exc}); "
                                "check your credentials and the bucket's permissions.") from None
            except Exception as exc:  # noqa: BLE001 - fsspec backends raise anything; classify, then wrap
                if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
                    raise AuthError(f"No credentials for {self.url}; "
                                    "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE.") from None
                if _unreachable(exc):
                    raise RemoteError(f"Cannot connect to {self.url} ({str(exc)[:200]}); check the endpoint "
                                      "(AWS_ENDPOINT_URL), your network, and retry.") from None
                if not is_transient(exc) or attempt == tries - 1:
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    raise RemoteError(f"{what} on {self.url} failed{tries}: {type(exc).__name__}: {str(exc)[:200]}. "
                                      "Check the endpoint and network, then retry.") from None
                backoff(attempt)
        raise AssertionError("unreachable")

    def check(self) -> None:
        if self._checked or self.scheme not in _BUCKETED:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self.call("bucket check", lambda: self.fs.info(bucket))  # unlike exists(), does not hide network errors
        except FileNotFoundError:
            raise RegistryError(f"Bucket {bucket!r} does not exist or is not visible with these credentials; "
                                f"create it (e.g. `aws s3 mb {self.scheme}://{bucket}`) or fix the URL.") from None
        self._checked = True

    def info(self, rel: str) -> FileInfo | None:
        try:
            d = self.call(f"stat {rel}", lambda: self.fs.info(self._p(rel)))
        except FileNotFoundError:
            return None
        if d.get("type") not in (None, "file"):
            return None
        return FileInfo(int(d.get("size") or 0), _mtime(d))

    def walk(self, prefix: str) -> dict[str, FileInfo]:
        self.fs.invalidate_cache()  # a listing must show what other writers did since our last one
        try:
            found = self.call(f"list {prefix}", lambda: self.fs.find(self._p(prefix), detail=True))
        except FileNotFoundError:
            return {}
        head = self._p("")
        out = {}
        for name, d in found.items():
            name = name.lstrip("/") if not head.startswith("/") else name
            if d.get("type", "file") == "file" and name.startswith(head):
                out[name[len(head):]] = FileInfo(int(d.get("size") or 0), _mtime(d))
        return out

    def read(self, rel: str, max_size: int) -> bytes:
        data = self.call(f"read {rel}", lambda: self.fs.cat_file(self._p(rel)))
        if len(data) > max_size:
            raise IntegrityError(f"{rel} in {self.url} is larger than expected ({max_size} bytes); "
                                 "the registry is damaged.")
        return data

    def open(self, rel: str) -> IO[bytes]:
        return self.fs.open(self._p(rel), "rb")  # callers wrap open + read in one call() (one retry loop)

    def download(self, rel: str, dst: Path, callback: Any = None) -> None:
        kw = {"callback": callback} if callback is not None else {}
        self.call(f"download {rel}", lambda: self.fs.get_file(self._p(rel), str(dst), **kw))

    def put_bytes(self, rel: str, data: bytes, *, create_only: bool) -> bool:
        mode = "create" if create_only else "overwrite"
        try:
            self.call(f"write {rel}", lambda: self.fs.pipe_file(self._p(rel), data, mode=mode))
        except FileExistsError:
            return False
        return True

    def upload(self, rel: str, src: Path, *, create_only: bool, callback: Any = None) -> bool:
        kw: dict[str, Any] = {"mode": "create" if create_only else "overwrite"}
        if callback is not None:
            kw["callback"] = callback
        try:
            self.call(f"upload {rel}", lambda: self.fs.put_file(str(src), self._p(rel), **kw))
        except FileExistsError:
            return False
        return True

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.call(f"delete {rel}", lambda: self.fs.rm_file(self._p(rel)))
