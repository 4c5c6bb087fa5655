"""Names, tags and ref entries of a registry, and the small records the API returns.

Everything here treats its input as untrusted: names and tags come from users, from ref listings of a
shared bucket and from remotes, so they are checked against one strict pattern before they become part
of a path. No torch, no fsspec: ``deltahub ls --help`` stays fast.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from deltahub.errors import RegistryError, UnsafePathError
from deltahub.manifest import windows_unsafe

DEFAULT_TAG = "latest"
MAX_NAME = 128
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_ENTRY = re.compile(r"^(?P<ns>[0-9]{20})-(?P<id>[0-9a-f]{64})$")  # refs/<name>/<tag>/<time_ns>-<id>
_INTENT = re.compile(r"^(?P<ns>[0-9]{20})-(?P<nonce>[0-9a-f]{16})\.json$")
MIN_ID_PREFIX = 6


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a safe artifact name or tag.

    Raises:
        UnsafePathError: it could escape a folder (``/``, ``\\``, ``..``, NUL or control characters).
        RegistryError: otherwise not of the form ``[A-Za-z0-9][A-Za-z0-9._-]*`` (at most 128 characters).
    """
    if not isinstance(value, str) or not value:
        raise RegistryError(f"An artifact {what} must not be empty; use letters, digits, '.', '_' or '-'.")
    if "/" in value or "\\" in value or ".." in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UnsafePathError(f"Refusing {what} {value!r}: it could escape the registry folder. "
                              "Use letters, digits, '.', '_', '-'.")
    if len(value) > MAX_NAME or not _NAME.match(value) or windows_unsafe(value):
        raise RegistryError(f"Invalid {what} {value[:MAX_NAME]!r}: use at most {MAX_NAME} letters, digits, '.', '_' "
                            "or '-', starting with a letter or digit, not a Windows device name such as 'con', not ending in '.' "
                            "(e.g. --name my-expert).")
    return value


def is_valid_name(value: str) -> bool:
    """True if ``value`` passes :func:`check_name` (for filtering untrusted listings)."""
    return (isinstance(value, str) and len(value) <= MAX_NAME and ".." not in value and _NAME.match(value) is not None
            and not windows_unsafe(value))


def is_hex_id(value: str) -> bool:
    return isinstance(value, str) and _HEX.match(value) is not None


def split_name_tag(ref: str) -> tuple[str, str]:
    """``name[:tag]`` -> (name, tag), both validated; the tag defaults to ``latest``.

    Raises:
        UnsafePathError, RegistryError: a bad name or tag.
    """
    name, sep, tag = ref.partition(":")
    if sep and not tag:
        raise RegistryError(f"Ref {ref!r} has an empty tag; write NAME or NAME:TAG.")
    return check_name(name), check_name(tag or DEFAULT_TAG, "tag")


def looks_like_id(ref: str) -> str | None:
    """The hex id (prefix) in ``ref`` (``sha256:HEX`` or bare HEX of 6-64 digits), else None."""
    value = ref.removeprefix("sha256:")
    if MIN_ID_PREFIX <= len(value) <= 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


# --------------------------------------------------------------------------------------- ref entries
@dataclass(frozen=True)
class RefEntry:
    """One create-only file ``refs/<name>/<tag>/<time_ns>-<id>``; the newest per (name, tag) wins."""

    name: str
    tag: str
    time_ns: int
    id: str

    @property
    def path(self) -> str:
        return f"refs/{self.name}/{self.tag}/{self.time_ns:020d}-{self.id}"

    @property
    def sort_key(self) -> tuple[int, str]:
        return self.time_ns, self.id  # equal clocks: the larger id wins, the same on every reader


def parse_ref_path(rel: str) -> RefEntry | None:
    """A :class:`RefEntry` from a path relative to the registry root, or None if it is not a valid one.

    Hostile listings (``refs/../x/...``, NUL, absolute names) simply do not parse.
    """
    parts = rel.split("/")
    if len(parts) != 4 or parts[0] != "refs" or not is_valid_name(parts[1]) or not is_valid_name(parts[2]):
        return None
    m = _ENTRY.match(parts[3])
    if m is None:
        return None
    return RefEntry(parts[1], parts[2], int(m["ns"]), m["id"])


def intent_path(time_ns: int, nonce: str) -> str:
    return f"intents/{time_ns:020d}-{nonce}.json"


def parse_intent_path(rel: str) -> int | None:
    """The creation time (ns) of an intent record path, or None if ``rel`` is not one."""
    parts = rel.split("/")
    if len(parts) != 2 or parts[0] != "intents":
        return None
    m = _INTENT.match(parts[1])
    return int(m["ns"]) if m else None


def newest(entries: list[RefEntry]) -> dict[tuple[str, str], RefEntry]:
    """The winning entry of every (name, tag)."""
    best: dict[tuple[str, str], RefEntry] = {}
    for e in entries:
        cur = best.get((e.name, e.tag))
        if cur is None or e.sort_key > cur.sort_key:
            best[(e.name, e.tag)] = e
    return best


# --------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class RefInfo:
    """One ``name:tag`` of a registry and a summary of the artifact it points to."""

    name: str
    tag: str
    id: str
    created: datetime
    size: int | None = None  # bytes of the manifest and every listed file
    codec: str | None = None
    bits_per_param: float | None = None
    url: str = ""  # the registry it lives in ("" = the local registry)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created"] = self.created.isoformat()
        return d


def summary(manifest: Any, raw_size: int) -> dict[str, Any]:
    """What a ref entry file carries for ``ls`` (so listing a bucket needs no manifest downloads)."""
    stats = manifest.stats
    return {"size": raw_size + sum(f.size for f in manifest.files), "codec": stats.get("codec"),
            "bits_per_param": stats.get("bits_per_param")}


def entry_bytes(entry: RefEntry, info: dict[str, Any]) -> bytes:
    body = {"id": entry.id, "name": entry.name, "tag": entry.tag, "time_ns": entry.time_ns, **info}
    return (json.dumps(body, sort_keys=True) + "\n").encode()


def ref_info(entry: RefEntry, raw: bytes | None, url: str = "") -> RefInfo:
    """A :class:`RefInfo` from an entry and its file's (untrusted) content; a bad body only loses the summary."""
    info: dict[str, Any] = {}
    try:
        body = json.loads(raw) if raw else {}
        if isinstance(body, dict) and body.get("id") == entry.id:
            info = body
    except ValueError:
        pass
    size, codec, bpp = info.get("size"), info.get("codec"), info.get("bits_per_param")
    return RefInfo(
        name=entry.name, tag=entry.tag, id=entry.id, url=url,
        created=datetime.fromtimestamp(entry.time_ns / 1e9, tz=timezone.utc),
        size=size if isinstance(size, int) else None,
        codec=codec if isinstance(codec, str) else None,
        bits_per_param=float(bpp) if isinstance(bpp, (int, float)) and not isinstance(bpp, bool) else None,
    )


@dataclass
class GcReport:
    """What ``gc`` deleted (or, with ``dry_run``, would delete)."""

    dry_run: bool = False
    deleted_blobs: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_blobs: int = 0
    spared_young: int = 0  # unreferenced, but younger than the grace period (a push may be in flight)
    deleted_refs: list[str] = field(default_factory=list)  # superseded ref entries past the grace period
    deleted_other: list[str] = field(default_factory=list)  # old intents, temp debris, stale materialized folders
    problems: list[str] = field(default_factory=list)  # why some blobs were kept conservatively

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"gc {verb} {len(self.deleted_blobs)} blobs ({self.freed_bytes} bytes), "
                f"{len(self.deleted_refs)} old ref entries, {len(self.deleted_other)} other; "
                f"kept {self.kept_blobs} blobs, spared {self.spared_young} young")
