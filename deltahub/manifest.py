"""``deltahub.json``: the artifact manifest, a strict versioned schema (FORMAT.md is the spec).

The manifest is untrusted input (it comes from the Hub or an object store), so it is parsed with
pydantic models that refuse unknown fields inside known structures, newer format versions, unsafe file
names and inconsistent sizes before any payload is touched. No torch import here: ``deltahub inspect``
starts fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deltahub.errors import FormatVersionError, ManifestError, UnsafePathError

FORMAT_VERSION = 1
MANIFEST_NAME = "deltahub.json"
MAX_MANIFEST_BYTES = 64 << 20  # 64 MiB: a 70B model has ~1k tensors of ~2 KB each; this is far above
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
_SHA = re.compile(r"^[0-9a-f]{64}$")


_PORTABLE = re.compile(r"^[A-Za-z0-9._-]+$")  # POSIX portable filename characters
_WINDOWS_DEVICE = re.compile(r"^(con|prn|aux|nul|conin\$|conout\$|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?$", re.IGNORECASE)
MAX_PART = 255  # bytes in one path component on ext4, APFS and NTFS
MAX_PATH = 1024


def windows_unsafe(part: str) -> bool:
    """A name Windows cannot hold as written: a device name (``CON``, ``nul.txt``, ``COM1``) or a trailing dot or space."""
    return _WINDOWS_DEVICE.match(part) is not None or part.endswith((".", " "))


def check_relpath(name: str, *, portable: bool = True) -> str:
    """Return ``name`` if it is a safe, portable relative path inside a folder.

    Each part uses the POSIX portable characters (letters, digits, ``.``, ``_``, ``-``), so no separator,
    drive, stream (``:``), control or look-alike character (``．``, ``∕``, U+202E) gets through, and no part
    is a Windows device name or ends in a dot; deltahub writes only such names (``payload-00001.safetensors``).
    With ``portable=False`` only escapes are refused (for names deltahub lists but never writes, such as the
    other files of a Hub repo).

    Raises:
        UnsafePathError: absolute, drive or UNC paths, ``..`` parts, or a part that is not portable.
    """
    shown = name[:80] + ("..." if len(name) > 80 else "") if isinstance(name, str) else name
    parts = name.split("/") if isinstance(name, str) else []
    if (not isinstance(name, str) or not name or "\\" in name or any(ord(c) < 32 for c in name) or name.startswith("/")
            or re.match(r"^[A-Za-z]:", name) is not None or any(part in ("..", ".", "") for part in parts)):
        raise UnsafePathError(f"Refusing file name {shown!r}: it would escape the artifact folder. Use plain relative names.")
    if portable and (len(name) > MAX_PATH or any(len(p) > MAX_PART or not _PORTABLE.match(p) or windows_unsafe(p)
                                                for p in parts)):
        raise UnsafePathError(f"Refusing file name {shown!r}: artifact files use portable names (letters, digits, '.', "
                              "'_', '-'; no Windows device names or trailing dots). Rename the file.")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Strict):
    path: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        check_relpath(v)
        return v

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _SHA.match(v):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return v


class PayloadKey(_Strict):
    """One stored tensor of a codec payload; ``stage`` says how its bytes were wrapped."""

    key: str
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: list[int]
    stage: Literal["raw", "zstd"] = "raw"
    nbytes: int = Field(ge=0)  # bytes after undoing ``stage``: caps zstd output (decompression bombs)
    stored: int = Field(ge=0)  # bytes as stored in the payload file


class TensorEntry(_Strict):
    name: str  # name in the fine-tuned model (what ``apply`` writes); for ``native``, the adapter's tensor name
    base_name: str | None  # name in the base, None for a tensor the base does not have; ``native``: its target
    op: Literal["add", "replace", "native"]  # native: a tensor of an adapter kind (manifest.adapter says which)
    shape: list[int]
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    codec: str
    codec_version: int
    params: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, str] = Field(default_factory=dict)
    file: str
    payload: dict[str, PayloadKey]
    sha256: str  # over the stored bytes of the payload keys, in key order
    rel_error: float | None = None  # ‖Δ − Δ̂‖ / ‖Δ‖ measured at encode time

    @field_validator("file")
    @classmethod
    def _safe(cls, v: str) -> str:
        check_relpath(v)
        return v

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def stored_bytes(self) -> int:
        return sum(p.stored for p in self.payload.values())


class BaseTensor(_Strict):
    name: str
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: list[int]
    sha256: str
    sha256_bf16: str | None = None
    sha256_fp16: str | None = None


class BaseInfo(_Strict):
    """Which weights the delta belongs to (DESIGN §2.2). ``name`` and ``location`` are hints, not proof."""

    fingerprint: str
    tensors: list[BaseTensor]
    name: str | None = None
    location: dict[str, str] = Field(default_factory=dict)  # {"type": "path"|"hub", "path"|"repo", "revision"}
    prefix: dict[str, str] = Field(default_factory=dict)  # {"strip": "bert."} or {"add": "bert."}


class AdapterInfo(_Strict):
    """An adapter expert: its kind (a ``deltahub.adapters`` plugin), that plugin's version, its JSON config."""

    kind: str
    version: int = Field(ge=1)
    config: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Strict):
    format_version: int
    deltahub_version: str
    name: str
    kind: str = "delta"  # "delta", or the adapter kind (then ``adapter`` is set and says the same)
    base: BaseInfo
    tensors: list[TensorEntry]
    files: list[FileEntry]
    fit_stats: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)
    extra_files: dict[str, str] = Field(default_factory=dict)  # role -> path, e.g. {"config": "model_config.json"}
    adapter: AdapterInfo | None = None

    def _dump(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if data.get("adapter") is None:  # delta manifests (and so their ids) are as before adapters existed
            data.pop("adapter", None)
        return data

    def canonical_bytes(self) -> bytes:
        return json.dumps(self._dump(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def id(self) -> str:
        """The artifact id: sha256 of the canonical manifest."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def to_json(self) -> str:
        """The manifest file: sections indented, one line per tensor / file entry, fields at their default
        (``stage: raw``, empty ``meta``, absent hashes) left out. It parses back to the same manifest, so the
        same id (which hashes the full canonical form); 23% smaller than indented JSON on MiniLM (1.26 KB per
        tensor: three base hashes, the payload keys and hashes are most of it)."""
        return _layout(self.model_dump(mode="json", exclude_defaults=True), 0) + "\n"

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(f"Manifest lists no file {path!r} but a tensor refers to it; the artifact is corrupt.")


def _layout(value: Any, depth: int) -> str:
    """JSON with the top two levels of objects indented and every list of objects one item per line."""
    pad = " " * (depth + 1)
    if isinstance(value, dict) and value and depth < 2:
        items = [f"{pad}{json.dumps(k)}: {_layout(value[k], depth + 1)}" for k in sorted(value)]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    if isinstance(value, list) and any(isinstance(x, (dict, list)) for x in value):
        items = [pad + json.dumps(x, sort_keys=True, separators=(",", ":")) for x in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * depth + "]"
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def parse_manifest(raw: bytes | str) -> Manifest:
    """Parse and validate a manifest.

    Raises:
        FormatVersionError: written by a newer deltahub.
        UnsafePathError: a file name would escape the artifact folder.
        ManifestError: anything else wrong (not JSON, schema mismatch, dangling file references).
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; it is not a deltahub manifest.")
    try:
        data = json.loads(raw)
    except ValueError:
        raise ManifestError(f"{MANIFEST_NAME} is not valid JSON; the artifact is truncated or corrupt. Pull it again.") from None
    except RecursionError:  # ~1,000 nested arrays exhaust the parser's stack; never a real manifest
        raise ManifestError(f"{MANIFEST_NAME} nests JSON too deeply to be a deltahub manifest; the file is hostile or "
                            "corrupt. Pull it again from a trusted source.") from None
    if not isinstance(data, dict) or not isinstance(data.get("format_version"), int):
        raise ManifestError(f"{MANIFEST_NAME} has no integer format_version; it is not a deltahub artifact.")
    if data["format_version"] > FORMAT_VERSION:
        raise FormatVersionError(data["format_version"], FORMAT_VERSION)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            if isinstance(err.get("ctx", {}).get("error"), UnsafePathError):
                raise err["ctx"]["error"] from None
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ManifestError(f"{MANIFEST_NAME} is invalid at {where}: {err['msg']}. The artifact is corrupt; pull it again.") from None
    if (manifest.kind == "delta") != (manifest.adapter is None) or (
            manifest.adapter is not None and manifest.adapter.kind != manifest.kind):
        raise ManifestError(f"{MANIFEST_NAME} says kind {manifest.kind!r} but its adapter block disagrees; the "
                            "artifact is corrupt.")
    if manifest.adapter is None and any(t.op == "native" for t in manifest.tensors):
        raise ManifestError(f"{MANIFEST_NAME} has adapter tensors but no adapter block; the artifact is corrupt.")
    listed = {f.path for f in manifest.files}
    for t in manifest.tensors:
        if t.file not in listed:
            raise ManifestError(f"Tensor {t.name!r} refers to unlisted file {t.file!r}; the artifact is corrupt.")
    return manifest
