"""The Hub client side of ``hf://`` remotes: URLs, retries and the translation of huggingface_hub errors.

:class:`HubCalls` gives :class:`~deltahub.registry.hf.HubRemote` its ``_call`` (retry transient failures
with backoff, then :class:`RemoteError`) and ``_translate`` (each huggingface_hub failure as the deltahub
error whose message says what to do: :class:`AuthError`, :class:`ArtifactNotFoundError`, ...).
"""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from deltahub.errors import ArtifactNotFoundError, AuthError, DeltaHubError, IntegrityError, RegistryError, RemoteError
from deltahub.registry.backends import ATTEMPTS, backoff

SCHEME = "hf://"
T = TypeVar("T")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_NAMES = {"TransportError", "NetworkError", "TimeoutException", "ConnectError", "ReadError", "WriteError",
                    "RemoteProtocolError", "ReadTimeout", "ConnectTimeout", "WriteTimeout", "PoolTimeout",
                    "ConnectionError", "ChunkedEncodingError", "ProtocolError", "IncompleteRead"}
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
                    errno.EIO, errno.EAGAIN}


@dataclass(frozen=True)


class HubURL:
    """A parsed ``hf://org/repo[@revision]``."""

    repo_id: str
    revision: str | None = None

    @property
    def url(self) -> str:
        return SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")

    def at(self, revision: str | None) -> str:
        return SCHEME + self.repo_id + (f"@{revision}" if revision else "")


def parse_hub_url(url: str) -> HubURL:
    """``hf://org/repo[@revision]`` -> :class:`HubURL`.

    Raises:
        RegistryError: not of that form (only model repos ``namespace/name`` hold artifacts).
    """
    if not isinstance(url, str) or not url.startswith(SCHEME):
        raise RegistryError(f"{url!r} is not a Hub URL; write hf://ORG/REPO or hf://ORG/REPO@REVISION.")
    rest = url[len(SCHEME):]
    repo_id, sep, revision = rest.partition("@")
    repo_id = repo_id.rstrip("/")
    if repo_id.startswith(("datasets/", "spaces/", "buckets/")):
        raise RegistryError(f"{url}: deltahub artifacts live in model repos; write hf://ORG/REPO.")
    if (not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id or repo_id.endswith(".git")
            or repo_id.endswith((".", "-"))):
        raise RegistryError(f"{url!r} does not name a Hub repo; write hf://ORG/REPO or hf://ORG/REPO@REVISION.")
    if sep and (not revision or any(ord(c) < 32 or ord(c) == 127 for c in revision) or ".." in revision
                or revision.startswith("/") or "\\" in revision):
        raise RegistryError(f"{url!r} has a bad revision; write hf://ORG/REPO@BRANCH or @COMMIT_SHA.")
    return HubURL(repo_id, revision or None)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_api() -> Any:
    """A client made now (never at import): endpoint and token are read from huggingface_hub's settings."""
    from huggingface_hub import HfApi

    from deltahub._version import __version__

    return HfApi(library_name="deltahub", library_version=__version__)


def _has_token() -> bool:
    from huggingface_hub import get_token

    try:
        return bool(get_token())
    except Exception:  # noqa: BLE001 - a broken token file reads as "no token"
        return False


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) if response is not None else None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _is_transient(exc: BaseException) -> bool:
    for e in _chain(exc):
        if type(e).__name__ == "OfflineModeIsEnabled":  # a ConnectionError that no retry fixes
            return False
        if isinstance(e, DeltaHubError) and not isinstance(e, IntegrityError):
            return False
        if isinstance(e, IntegrityError):
            return True  # a byte flipped in transit: download again
        status = http_status(e)
        if status is not None:
            return status in _TRANSIENT_STATUS or status >= 500
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
    return False


class HubCalls:
    """Error handling shared by everything that talks to one Hub repo (needs ``parsed``, ``repo_id``, ``revision``)."""

    parsed: HubURL
    repo_id: str
    revision: str | None

    def _where(self, revision: str | None = None) -> str:
        return self.parsed.at(revision if revision is not None else self.revision)

    def _translate(self, exc: BaseException, what: str, revision: str | None = None,
                   filename: str | None = None, write: bool = False) -> DeltaHubError:
        """The deltahub error for a huggingface_hub failure that is not worth retrying."""
        from huggingface_hub import errors as E

        where = self._where(revision)
        token = _has_token()
        if isinstance(exc, DeltaHubError):
            return exc
        if isinstance(exc, E.GatedRepoError):
            return AuthError(f"{where} is gated: request access on its Hub page, then set HF_TOKEN or run `hf auth login`.")
        if isinstance(exc, E.RepositoryNotFoundError):
            if not token:
                return ArtifactNotFoundError(f"{where} was not found, or it is private and no Hub token is set: check the "
                                             "name, or set HF_TOKEN or run `hf auth login`.")
            return ArtifactNotFoundError(f"{where} was not found (or this Hub token cannot see it): check the name and "
                                         "`hf auth whoami`.")
        if isinstance(exc, E.RevisionNotFoundError):
            return ArtifactNotFoundError(f"{self.parsed.repo_id} has no revision {revision or self.revision!r} on the Hub: "
                                         f"check the branch or commit (`deltahub ls {SCHEME}{self.repo_id}`).")
        if isinstance(exc, (E.EntryNotFoundError, E.RemoteEntryNotFoundError)) and not isinstance(exc, E.LocalEntryNotFoundError):
            return ArtifactNotFoundError(f"{where} has no file {filename or '?'!r}; it is not a complete deltahub artifact.")
        if any(type(e).__name__ == "OfflineModeIsEnabled" for e in _chain(exc)) or (
                isinstance(exc, E.LocalEntryNotFoundError) and not _is_transient(exc)):
            return RemoteError(f"Cannot reach the Hub for {where}: HF_HUB_OFFLINE is set or the endpoint is unreachable; "
                               "unset HF_HUB_OFFLINE and check HF_ENDPOINT.")
        status = http_status(exc)
        if isinstance(exc, E.LocalTokenNotFoundError) or (status == 401 and not token):
            if write:
                return AuthError(f"Pushing to {where} needs a Hub token with write access: set HF_TOKEN or run "
                                 "`hf auth login`.")
            return AuthError(f"{where} needs a Hub token: set HF_TOKEN or run `hf auth login`.")
        if status == 401:
            return AuthError(f"The Hub refused the token for {where} (401): set a valid HF_TOKEN or run `hf auth login`.")
        if status == 403:
            return AuthError(f"The Hub token has no write access to {where} (403): use a token with write permission "
                             "(set HF_TOKEN or run `hf auth login`).")
        if status == 404:
            return ArtifactNotFoundError(f"{where} was not found on the Hub (404): check the repo name and revision.")
        if status == 412:
            return RemoteError(f"{where} moved while pushing (412: another push won); push again.")
        message = (getattr(exc, "server_message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0][:200]
        if status is not None and 400 <= status < 500:
            return RemoteError(f"The Hub refused to {what} {where} (HTTP {status}: {message}).")
        return RemoteError(f"{what.capitalize()} {where} failed: {type(exc).__name__}: {message}. Retry later.")

    def _call(self, what: str, fn: Callable[[], T], *, revision: str | None = None, filename: str | None = None,
              write: bool = False) -> T:
        """``fn()`` with retries on transient failures; anything else becomes a deltahub error at once."""
        for attempt in range(ATTEMPTS):
            try:
                return fn()
            except DeltaHubError as exc:
                if not isinstance(exc, IntegrityError) or attempt == ATTEMPTS - 1:
                    raise
                backoff(attempt)
                continue
            except Exception as exc:
                if not _is_transient(exc):
                    raise self._translate(exc, what, revision, filename, write) from exc
                if attempt == ATTEMPTS - 1:
                    status = http_status(exc)
                    why = f"HTTP {status}" if status else f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                    raise RemoteError(f"{what.capitalize()} {self._where(revision)} failed after {ATTEMPTS} tries ({why}); "
                                      "the Hub or the network is having trouble, retry later.") from exc
                backoff(attempt)
        raise AssertionError("unreachable")
