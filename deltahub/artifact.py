"""The artifact folder: ``deltahub.json`` + safetensors payloads (+ a model card), read and written safely.

Reading checks every listed file's size, then its sha256, before any parser sees it; zstd stages are
undone with the output capped at the size the manifest declares. Writing goes to a temporary folder
beside the target, fsynced, then renamed into place, so a crash never leaves half an artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from deltahub.codecs import Encoded, get_codec
from deltahub.constants import CARD_NAME
from deltahub.errors import ArtifactNotFoundError, CodecVersionError, IntegrityError, ManifestError, OutputExistsError
from deltahub.hashing import sha256_file
from deltahub.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, TensorEntry, check_relpath, parse_manifest
from deltahub.payloads import check_safetensors_header, unwrap

if TYPE_CHECKING:
    import torch

# torch is imported by the methods that read tensors, not here: push, pull, ls, verify and gc load and
# hash artifacts without it (`import torch` is ~1.6 s of a 2 s push on a 2-core machine)


@dataclass(frozen=True)
class Term:
    """One change an expert makes to its base: a weight delta (``add``) or a whole tensor (``replace``).

    A delta artifact has one term per manifest entry; an adapter artifact has one ``add`` term per target
    weight (materialized from its native tensors) plus its ``replace`` entries (a saved head).
    """

    name: str  # in the fine-tuned model
    base_name: str | None
    op: str
    shape: tuple[int, ...]
    entry: TensorEntry | None = None  # the manifest entry behind it; None for an adapter target


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Artifact:
    """A loaded, verified artifact: its manifest plus lazy access to payloads.

    Use :func:`deltahub.load` to open one and :meth:`save` to write it elsewhere.
    """

    def __init__(self, manifest: Manifest, folder: Path):
        self.manifest = manifest
        self.folder = folder
        self._files: dict[str, dict[str, torch.Tensor]] = {}
        self._materialized: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------- properties
    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def name(self) -> str:
        return self.manifest.name

    def __repr__(self) -> str:
        s = self.manifest.stats
        return (f"Artifact(name={self.name!r}, id={self.id[:12]}, tensors={len(self.manifest.tensors)}, "
                f"bits_per_param={s.get('bits_per_param')}, ratio={s.get('ratio_vs_fp16')})")

    # ----------------------------------------------------------------------------------- load
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, verify: bool = True) -> Artifact:
        """Open and verify the artifact folder at ``path``.

        Raises:
            ArtifactNotFoundError: no ``deltahub.json`` there.
            FormatVersionError, ManifestError, UnsafePathError: a bad manifest.
            IntegrityError: a listed file is missing, truncated or corrupted.
        """
        folder = Path(path)
        mpath = folder / MANIFEST_NAME
        if not mpath.is_file():
            raise ArtifactNotFoundError(f"No deltahub artifact at {folder} (no {MANIFEST_NAME}); check the path or `deltahub ls`.")
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:  # size before reading: never load a hostile giant
            raise ManifestError(f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; it is not a deltahub "
                                "manifest. Pull the artifact again from a trusted source.")
        manifest = parse_manifest(mpath.read_bytes())
        art = cls(manifest, folder)
        if verify:
            art.verify_files()
        return art

    def verify_files(self) -> None:
        """Size, then sha256, of every listed file.

        Raises:
            IntegrityError: the first file that does not match.
        """
        for f in self.manifest.files:
            p = self.folder / f.path
            if not p.is_file():
                raise IntegrityError(f"{f.path} is missing from {self.folder}; the artifact is incomplete. Pull it again.")
            size = p.stat().st_size
            if size != f.size:
                raise IntegrityError(f"{f.path} has {size} bytes, the manifest says {f.size}: it is truncated or corrupted. Pull it again.")
            if sha256_file(p)[1] != f.sha256:
                raise IntegrityError(f"{f.path} does not match its sha256 in the manifest: it is corrupted. Pull it again.")

    # ----------------------------------------------------------------------------------- payloads
    def _file(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as st_load

        if name not in self._files:
            try:
                data = (self.folder / name).read_bytes()
                check_safetensors_header(data, name)
                self._files[name] = st_load(data)
            except (SafetensorError, OSError) as exc:
                raise IntegrityError(f"{name} is not a valid safetensors file ({exc}); pull the artifact again.") from None
        return self._files[name]

    def encoded(self, entry: TensorEntry) -> Encoded:
        """The codec payload of one tensor, with lossless stages undone and sizes checked.

        Raises:
            IntegrityError: a payload key is missing or does not match its declared dtype/shape/size.
        """
        stored = self._file(entry.file)
        tensors = {}
        for role, pk in entry.payload.items():
            t = stored.get(pk.key)
            if t is None:
                raise IntegrityError(f"Payload {pk.key!r} of {entry.name!r} is missing from {entry.file}; the artifact is corrupt.")
            tensors[role] = unwrap(t, pk)
        return Encoded(tensors, dict(entry.meta))

    def codec(self, entry: TensorEntry) -> Any:
        """The installed codec that reads ``entry``.

        Raises:
            CodecNotFoundError, PluginError: not installed, or broken.
            CodecVersionError: the payload was written by a newer version of the codec.
        """
        codec = get_codec(entry.codec)
        if entry.codec_version > codec.version:
            raise CodecVersionError(
                f"{entry.name!r} was encoded with codec {entry.codec} v{entry.codec_version}; the installed one is "
                f"v{codec.version}. Upgrade the plugin that provides it (`deltahub codecs`)."
            )
        return codec

    def resident(self, entry: TensorEntry, *, device: Any = "cpu") -> Any:
        """The in-memory layout of one ``add`` entry that the kernels apply (DESIGN §2.3).

        Built and validated on the CPU, then moved: a failure to decode is a corrupt payload, while an
        out-of-memory on ``device`` stays the ``torch.OutOfMemoryError`` it is.

        Raises:
            IntegrityError: the payload does not decode, or decodes to an inconsistent layout.
            torch.OutOfMemoryError: ``device`` has no room for it.
        """
        from deltahub.kernels.layouts import LAYOUTS

        codec = self.codec(entry)
        try:
            res = codec.to_resident(self.encoded(entry), tuple(entry.shape), device="cpu")
            if not isinstance(res, LAYOUTS):
                raise ValueError(f"to_resident returned {type(res).__name__}, not a resident layout")
            if tuple(res.shape) != tuple(entry.shape):
                raise ValueError(f"to_resident gave shape {list(res.shape)}, expected {entry.shape}")
            res.validate()
        except CodecVersionError:
            raise  # an inner codec too old (auto): upgrade, not corruption
        except (ValueError, RuntimeError, KeyError) as exc:
            raise IntegrityError(f"Cannot decode {entry.name!r} with codec {entry.codec}: {exc}. The artifact is corrupt.") from None
        return res.to(device)

    # ----------------------------------------------------------------------------------- terms
    def terms(self) -> list[Term]:
        """What this expert changes, as terms (see :class:`Term`), whatever its kind."""
        entries = self.manifest.tensors
        if self.manifest.adapter is None:
            return [Term(e.name, e.base_name, e.op, tuple(e.shape), e) for e in entries]
        import torch

        native = {e.name: e for e in entries if e.op == "native"}
        shapes = {n: torch.empty(e.shape, device="meta") for n, e in native.items()}
        out = []
        for t in self.adapter_kind().targets(shapes, self.manifest.adapter.config):
            out.append(Term(t.weight, native[t.tensors[0]].base_name, "add", tuple(t.shape)))
        return out + [Term(e.name, e.base_name, e.op, tuple(e.shape), e) for e in entries if e.op == "replace"]

    def adapter_kind(self) -> Any:
        """The installed adapter kind that reads this artifact (None for a delta).

        Raises:
            AdapterNotFoundError, PluginError: not installed, or broken.
            CodecVersionError: written by a newer version of the adapter kind.
        """
        info = self.manifest.adapter
        if info is None:
            return None
        from deltahub.adapter import get_adapter

        kind = get_adapter(info.kind)
        if info.version > kind.version:
            raise CodecVersionError(f"{self.name!r} was written by adapter kind {info.kind} v{info.version}; the "
                                    f"installed one is v{kind.version}. Upgrade the plugin that provides it.")
        return kind

    def native_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors, decoded, in their stored dtypes (empty for a delta)."""
        return {e.name: self.decode_tensor(e) for e in self.manifest.tensors if e.op == "native"}

    def term_resident(self, term: Term, *, device: Any = "cpu", attach: bool = False) -> Any:
        """The resident layout of an ``add`` term on ``device`` (with ``attach``, a nonlinear kind's module to
        run on the target's output: the ExpertPool's on-the-fly mode).

        Raises:
            NotMergeableError: a nonlinear kind (Compacter) without ``attach``.
            IntegrityError: the payload does not decode, or the adapter materializes an inconsistent layout.
        """
        if term.entry is not None:
            return self.resident(term.entry, device=device)
        import torch

        if self._materialized is None:
            from deltahub.kernels.layouts import LAYOUTS

            made = self.adapter_kind().materialize(self.native_tensors(), self.manifest.adapter.config)
            for name, res in made.items():
                if isinstance(res, torch.nn.Module):
                    continue  # checked below: only the attach path takes it
                try:
                    if not isinstance(res, LAYOUTS):
                        raise ValueError(f"it is a {type(res).__name__} to attach, not a weight delta; attach it "
                                         "to the model instead of merging it")
                    res.validate()
                except ValueError as exc:
                    raise IntegrityError(f"Adapter target {name!r} of {self.name!r}: {exc}.") from None
            self._materialized = made
        res = self._materialized.get(term.name)
        if isinstance(res, torch.nn.Module):
            if attach:
                return res.to(device)
            from deltahub.errors import NotMergeableError

            raise NotMergeableError(f"{self.name!r} is a {self.manifest.kind} adapter, which has a nonlinearity and "
                                    "no weight delta: attach it with deltahub.attach(artifact, model) instead of "
                                    "merging it (an ExpertPool serves it with pool.route).")
        if res is None or tuple(res.shape) != tuple(term.shape):
            raise IntegrityError(f"Adapter kind {self.manifest.kind} gave no {list(term.shape)} delta for "
                                 f"{term.name!r}; the artifact is corrupt.")
        return res.to(device)

    def decode_tensor(self, entry: TensorEntry) -> torch.Tensor:
        """Δ (op ``add``, fp32/fp64) or the whole tensor (ops ``replace`` and ``native``, in its dtype)."""
        from deltahub.checkpoint import dtype_from_name

        codec = self.codec(entry)
        try:
            out = codec.decode(self.encoded(entry), tuple(entry.shape))
        except CodecVersionError:
            raise  # an inner codec too old (auto): upgrade, not corruption
        except (ValueError, RuntimeError, KeyError) as exc:
            raise IntegrityError(f"Cannot decode {entry.name!r} with codec {entry.codec}: {exc}. The artifact is corrupt.") from None
        if tuple(out.shape) != tuple(entry.shape):
            raise IntegrityError(f"Codec {entry.codec} decoded {entry.name!r} to shape {list(out.shape)}, expected {entry.shape}.")
        return out.to(dtype_from_name(entry.dtype)) if entry.op in ("replace", "native") else out

    def sparse_tensor(self, entry: TensorEntry) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An ``add`` entry's delta as (flat positions, fp32 values) when its codec stores it sparse, else None.

        Raises:
            IntegrityError: the payload does not decode.
        """
        codec = self.codec(entry)
        try:
            out = codec.sparse(self.encoded(entry), tuple(entry.shape))
        except CodecVersionError:
            raise
        except (ValueError, RuntimeError, KeyError) as exc:
            raise IntegrityError(f"Cannot decode {entry.name!r} with codec {entry.codec}: {exc}. The artifact is corrupt.") from None
        if out is not None and (out[0].shape != out[1].shape or out[0].dim() != 1):
            raise IntegrityError(f"Codec {entry.codec} gave {entry.name!r} {out[0].numel()} positions for {out[1].numel()} values.")
        return out

    def decode(self) -> dict[str, torch.Tensor]:
        """Every tensor: deltas for ``add`` entries, whole tensors for ``replace`` entries."""
        return dict(self.iter_decoded())

    def iter_decoded(self) -> Iterator[tuple[str, torch.Tensor]]:
        for entry in self.manifest.tensors:
            yield entry.name, self.decode_tensor(entry)

    # ----------------------------------------------------------------------------------- save
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Copy the artifact to a new folder ``path`` (atomically)."""
        files = [f.path for f in self.manifest.files] + [p for p in (CARD_NAME,) if (self.folder / p).is_file()]
        with staging(Path(path)) as tmp:
            for rel in files:
                dst = tmp / check_relpath(rel)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.folder / rel, dst)
            (tmp / MANIFEST_NAME).write_text(self.manifest.to_json())
        return Path(path)


class staging:
    """Build a folder in a unique temp sibling, fsync it, then swap it into ``target`` atomically.

    An existing ``target`` is replaced only if it is empty or (for ``kind="artifact"``) a deltahub
    artifact: never a user's unrelated folder. On error the temp folder is removed: nothing
    half-written stays behind.
    """

    def __init__(self, target: Path, *, kind: str = "artifact"):
        self.target, self.kind = target, kind
        self.tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"

    def __enter__(self) -> Path:
        t = self.target
        if t.exists():
            empty = t.is_dir() and not any(t.iterdir())
            if not empty and not (self.kind == "artifact" and (t / MANIFEST_NAME).is_file()):
                what = "is not a deltahub artifact" if self.kind == "artifact" else "is not empty"
                raise OutputExistsError(f"{t} exists and {what}; choose another output folder or remove it.")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for p in self.tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, 0o644)  # safetensors writes 0600 temp files; artifacts are meant to be shared
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        _fsync_dir(self.tmp)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        _fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def describe(manifest: Manifest) -> dict[str, Any]:
    """The manifest stats for scripts (``deltahub inspect --json``)."""
    return json.loads(json.dumps({
        "id": manifest.id, "name": manifest.name, "kind": manifest.kind,
        "format_version": manifest.format_version, "base": {
            "fingerprint": manifest.base.fingerprint, "name": manifest.base.name,
            "location": manifest.base.location, "tensors": len(manifest.base.tensors)},
        "stats": manifest.stats, "fit_stats": manifest.fit_stats, "provenance": manifest.provenance,
        "tensors": [{"name": t.name, "op": t.op, "shape": t.shape, "dtype": t.dtype, "codec": t.codec,
                     "stored_bytes": t.stored_bytes(), "rel_error": t.rel_error, "meta": t.meta}
                    for t in manifest.tensors]}))
