"""Where registry bytes live: a local folder (atomic renames, fsync) or any fsspec filesystem.

Both backends speak the same small vocabulary of paths relative to the registry root (``blobs/...``,
``refs/...``). The local one writes a temp file unique to the writer, fsyncs it and renames it into
place, so a crash or a second writer never leaves a half-written file under a final name (HF #4228).
The fsspec one (object stores: one create-only PUT per write) lives in ``fsspec_backend.py`` and is
imported only for such URLs; the retry policy both use (:func:`is_transient`, :func:`backoff`) is here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

from deltahub import constants
from deltahub.constants import locks_enabled
from deltahub.errors import DeltaHubError, IntegrityError, LockTimeoutError, RegistryError
from deltahub.hashing import CHUNK

ATTEMPTS = 4
BACKOFF = 0.2  # seconds before the 2nd try; doubles each time (tests lower it)
T = TypeVar("T")
_TRANSIENT_ERRNO = {errno.EREMOTEIO, errno.EBUSY, errno.EIO, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                    errno.EAGAIN, errno.EPIPE}
# not retried here: the client already retried them (botocore: 5 tries), and an endpoint that refuses every
# connection will not answer a 6th time
UNREACHABLE_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"}
_TRANSIENT_NAMES = {"ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "ClientConnectionError",
                    "FlexibleChecksumError", "ReadTimeoutError", "ConnectionClosedError", "IncompleteReadError",
                    "ResponseStreamingError", "ProtocolError", "ContentLengthError"}


class FileInfo(NamedTuple):
    size: int
    mtime: float | None  # seconds since the epoch; None when the store does not say (treated as young)


def backoff(attempt: int) -> None:
    # jitter: concurrent clients do not retry in lockstep
    time.sleep(BACKOFF * (2 ** attempt) * (0.5 + random.random()))


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: 5xx, throttling, resets, timeouts, short or corrupt bodies."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, DeltaHubError, ConnectionRefusedError)):
        return False
    if any(c.__name__ in UNREACHABLE_NAMES for c in type(exc).__mro__):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    return any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Backend:
    """The operations the registry layout needs; paths are POSIX, relative to the registry root."""

    url: str
    is_local = False

    def info(self, rel: str) -> FileInfo | None: ...
    def walk(self, prefix: str) -> dict[str, FileInfo]: ...
    def read(self, rel: str, max_size: int) -> bytes: ...
    def open(self, rel: str) -> IO[bytes]: ...
    def download(self, rel: str, dst: Path, callback: Any = None) -> None: ...
    def put_bytes(self, rel: str, data: bytes, *, create_only: bool) -> bool: ...
    def upload(self, rel: str, src: Path, *, create_only: bool, callback: Any = None) -> bool: ...
    def delete(self, rel: str) -> None: ...

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one operation (remote backends retry transient failures here)."""
        return fn()

    def touch(self, rel: str) -> None:
        """Refresh a reused object's age where the store allows it (gc's grace period then covers it)."""

    def lock(self, name: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def check(self) -> None:
        """Fail early with a typed error if the store cannot be used at all (missing bucket)."""


# ------------------------------------------------------------------------------------------- local
class LocalBackend(Backend):
    """A registry folder on a local filesystem: temp file + fsync + atomic rename for every write."""

    is_local = True

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()

    def path(self, rel: str) -> Path:
        return self.root / rel

    def new_tmp(self, suffix: str = "") -> Path:
        """A fresh path under ``tmp/`` (same filesystem as the blobs, so the final rename is atomic)."""
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"{uuid.uuid4().hex}-{os.getpid()}{suffix}"

    def info(self, rel: str) -> FileInfo | None:
        try:
            st = os.stat(self.path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return FileInfo(st.st_size, st.st_mtime)

    def walk(self, prefix: str) -> dict[str, FileInfo]:
        out: dict[str, FileInfo] = {}
        base = self.path(prefix)
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                p = Path(dirpath) / f
                with contextlib.suppress(FileNotFoundError):  # deleted by a concurrent gc while we walk
                    st = p.lstat()
                    if p.is_file() and not p.is_symlink():
                        out[p.relative_to(self.root).as_posix()] = FileInfo(st.st_size, st.st_mtime)
        return out

    def read(self, rel: str, max_size: int) -> bytes:
        with open(self.path(rel), "rb") as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise IntegrityError(f"{rel} in {self.url} is larger than expected ({max_size} bytes); "
                                 "the registry is damaged.")
        return data

    def open(self, rel: str) -> IO[bytes]:
        return open(self.path(rel), "rb")

    def download(self, rel: str, dst: Path, callback: Any = None) -> None:
        with open(self.path(rel), "rb") as src, open(dst, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                if callback is not None:
                    callback.relative_update(len(chunk))

    def install(self, tmp: Path, rel: str, *, create_only: bool = False, readonly: bool = True) -> bool:
        """fsync ``tmp`` and move it to ``rel``; returns False (and drops ``tmp``) if create-only and present.

        Blobs are replaced (same hash, same bytes: the last writer wins harmlessly and a damaged blob gets
        repaired); refs and intents are create-only, via ``link`` which fails atomically if the name exists.
        """
        dst = self.path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444 if readonly else 0o644)  # stored objects are immutable (HF #1360)
            if not create_only:
                os.replace(tmp, dst)
            else:
                try:
                    os.link(tmp, dst)
                except FileExistsError:
                    return False
                except OSError as exc:  # no hard links here (some network filesystems): check, then rename
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    if dst.exists():
                        return False
                    os.replace(tmp, dst)
            fsync_dir(dst.parent)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_bytes(self, rel: str, data: bytes, *, create_only: bool) -> bool:
        tmp = self.new_tmp()
        with open(tmp, "wb") as f:
            f.write(data)
        return self.install(tmp, rel, create_only=create_only, readonly=rel.startswith(("blobs/", "refs/")))

    def upload(self, rel: str, src: Path, *, create_only: bool, callback: Any = None) -> bool:
        tmp = self.new_tmp()
        try:
            self.download_path(src, tmp, callback)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return self.install(tmp, rel, create_only=create_only)

    @staticmethod
    def download_path(src: Path, dst: Path, callback: Any = None) -> None:
        with open(src, "rb") as fin, open(dst, "wb") as out:
            while chunk := fin.read(CHUNK):
                out.write(chunk)
                if callback is not None:
                    callback.relative_update(len(chunk))

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(rel))

    def touch(self, rel: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path(rel))

    def lock(self, name: str) -> contextlib.AbstractContextManager[Any]:
        if not locks_enabled():
            return contextlib.nullcontext()
        path = self.root / "locks" / f"{name}.lock"  # lock files are never deleted (HF #1659)
        path.parent.mkdir(parents=True, exist_ok=True)
        return _typed_lock(path)


@contextlib.contextmanager
def _typed_lock(path: Path) -> Iterator[None]:
    """A FileLock whose wait past LOCK_TIMEOUT_S is a LockTimeoutError, not filelock's untyped Timeout."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), timeout=constants.LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise LockTimeoutError(
            f"Waited {constants.LOCK_TIMEOUT_S:g} s for the lock {path} that another process holds; if no deltahub "
            "process is running, delete that file and retry (or set DELTAHUB_NO_LOCKS=1).") from None
    try:
        yield
    finally:
        lock.release()


def open_backend(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Backend:
    """A :class:`LocalBackend` for plain paths and ``file://`` URLs (atomic renames), else an fsspec one."""
    s = os.fspath(url)
    if "://" not in s:
        return LocalBackend(Path(s))
    if s.lower().startswith("file://"):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(s)
        if parts.netloc not in ("", "localhost"):
            raise RegistryError(f"file:// URLs name a local path (file:///abs/path), not host {parts.netloc!r}.")
        return LocalBackend(Path(unquote(parts.path)))
    from deltahub.registry.fsspec_backend import FsspecBackend  # fsspec is imported only for such URLs

    return FsspecBackend(s, storage_options)


def remove_tree(path: Path) -> None:
    """Delete a folder (its files may be read-only blobs: unlinking needs write access to the folder only)."""
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def tmp_file(backend: LocalBackend) -> Iterator[Path]:
    """A temp path in the registry's ``tmp/`` that is removed on exit unless it was moved away."""
    p = backend.new_tmp()
    try:
        yield p
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
