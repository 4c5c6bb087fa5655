"""``deltahub.compress``: fine-tuned checkpoint (or an artifact) -> a compressed artifact folder."""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deltahub.artifact import Artifact, staging
from deltahub.checkpoint import Checkpoint, dtype_name
from deltahub.codecs import Codec, CodecConfig, DeltaSource, get_codec
from deltahub.constants import CARD_NAME, CONFIG_NAME, progress_disabled
from deltahub.delta import CheckpointDelta, Pair, align, exact_delta
from deltahub.fingerprint import hash_tensors, root_hash
from deltahub.hashing import sha256_file
from deltahub.manifest import FORMAT_VERSION, MANIFEST_NAME, AdapterInfo, BaseInfo, FileEntry, Manifest, TensorEntry
from deltahub.writer import PayloadWriter


class _Accepted(DeltaSource):
    """The deltas a codec will encode itself (the rest go to ``dense``): what ``fit`` should see."""

    def __init__(self, source: DeltaSource, codec: Codec, config: CodecConfig, shapes: dict[str, tuple[int, ...]]):
        self.source, self.codec, self.config, self.shapes = source, codec, config, shapes

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, d in self.source:
            if self.codec.accepts(name, self.shapes[name], self.config):
                yield name, d


class ComputedDeltas(DeltaSource):
    """Deltas computed by code (``deltahub.merge``): ``entries`` lists (name, base name or None for a whole
    new tensor, shape, dtype name); iterating yields (name, tensor) in that order, computing each on demand."""

    def __init__(self, base: BaseInfo, entries: list[tuple[str, str | None, tuple[int, ...], str]],
                 compute: Any):
        self.base, self.entries, self.compute = base, entries, compute

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, *_ in self.entries:
            yield name, self.compute(name)


def write_deltas(source: ComputedDeltas, *, codec: str = "dense", out: str | os.PathLike[str] | None = None,
                 name: str | None = None, provenance: dict[str, Any] | None = None, **params: Any) -> Artifact:
    """Write an artifact from computed deltas, encoded with ``codec``, one tensor at a time.

    Raises:
        CodecNotFoundError, CodecConfigError: bad codec or options.
    """
    codec_obj = get_codec(codec)
    job = _Job(codec_obj, codec_obj.parse_config(params), None)
    out_path = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="deltahub-")) / "artifact"
    with staging(out_path) as tmp:
        job.from_deltas(source, tmp)
        manifest = job.finish(tmp, name or out_path.name, provenance or {"source": "computed deltas"})
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        from deltahub.card import render_card

        (tmp / CARD_NAME).write_text(render_card(manifest))
    return Artifact.load(out_path)


class _ArtifactDelta(DeltaSource):
    def __init__(self, art: Artifact):
        self.art = art

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for e in self.art.manifest.tensors:
            if e.op in ("add", "native"):
                yield e.name, self.art.decode_tensor(e).float()


def compress(finetuned: Any, *, base: Any = None, codec: str | None = None, out: str | os.PathLike[str] | None = None,
             name: str | None = None, calibration: Any = None, provenance: dict[str, Any] | None = None,
             fallback_dtype: str | None = None, **params: Any) -> Artifact:
    """Compress a fine-tuned model against its base into an artifact folder.

    Args:
        finetuned: a ``.safetensors`` file, a model folder, a state dict, a module, a PEFT LoRA folder, or
            an existing artifact (path or :class:`Artifact`) to re-encode with another codec.
        base: the base model (same kinds); required unless ``finetuned`` is an artifact.
        codec: codec name (``deltahub codecs`` lists them); default ``compeft``, and lossless ``dense`` for an
            adapter folder (its factors are small already).
        out: the folder to write (replaced atomically); default a new temporary folder.
        name: the artifact's name (default: the output folder's name).
        calibration: calibration inputs for codecs whose ``fit`` uses them.
        fallback_dtype: storage of the deltas a lossy codec leaves to ``dense`` (biases, norms):
            ``float16`` (the default for lossy codecs; ``bfloat16`` for a tensor that overflows fp16),
            ``bfloat16``, or ``exact`` (the default, and the only choice, for lossless codecs).
        **params: codec options, e.g. ``density=0.1``.

    Returns:
        The written, verified :class:`Artifact`.

    Raises:
        CodecNotFoundError, CodecConfigError: bad codec or options.
        CheckpointError, NothingMatchedError: unreadable or unrelated checkpoints.
    """
    adapter = _as_adapter(finetuned)
    codec = codec or ("dense" if adapter is not None else "compeft")
    codec_obj = get_codec(codec)
    config = codec_obj.parse_config(params)
    if adapter is not None:
        return _compress_adapter_folder(adapter, finetuned, base, codec, out, name, provenance, params)
    source_art = _as_artifact(finetuned)
    if source_art is None and base is None:
        from deltahub.errors import BaseNotFoundError

        raise BaseNotFoundError("Compressing a fine-tuned checkpoint needs its base: pass --base BASE.")
    out_path = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="deltahub-")) / "artifact"
    job = _Job(codec_obj, config, calibration, fallback_dtype=fallback_dtype)
    with staging(out_path) as tmp:
        if source_art is not None:
            job.from_artifact(source_art, tmp)
        else:
            job.from_checkpoints(Checkpoint.open(base), Checkpoint.open(finetuned), tmp)
        manifest = job.finish(tmp, name or out_path.name, provenance or {"source": _describe(finetuned)})
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        from deltahub.card import render_card

        (tmp / CARD_NAME).write_text(render_card(manifest))
    return Artifact.load(out_path)


def _as_adapter(src: Any) -> Any:
    """(adapter kind, imported) when ``src`` is a folder an adapter kind recognises (a PEFT folder)."""
    if not isinstance(src, (str, os.PathLike)) or not Path(src).is_dir() or (Path(src) / MANIFEST_NAME).is_file():
        return None
    from deltahub.adapter import read_adapter_folder

    return read_adapter_folder(Path(src))


def _compress_adapter_folder(adapter: Any, src: Any, base: Any, codec: str, out: Any, name: str | None,
                             provenance: dict[str, Any] | None, params: dict[str, Any]) -> Artifact:
    from deltahub.adapting import compress_adapter
    from deltahub.errors import BaseNotFoundError

    kind, imported = adapter
    if base is None:
        hint = imported.base_hint
        if not hint or not Path(hint).expanduser().exists():
            raise BaseNotFoundError(f"The adapter names its base as {hint!r}, which is no local folder: pass --base "
                                    "BASE (the model it was trained on).")
        base = Path(hint).expanduser()
    out_path = Path(out) if out is not None else None
    return compress_adapter(kind, imported, base=base, codec=codec, out=out_path,
                            name=name or (out_path.name if out_path else None),
                            provenance=provenance or {"source": _describe(src)}, **params)


def _as_artifact(src: Any) -> Artifact | None:
    if isinstance(src, Artifact):
        return src
    if isinstance(src, (str, os.PathLike)) and (Path(src) / MANIFEST_NAME).is_file():
        return Artifact.load(src)
    return None


def _describe(src: Any) -> str:
    return str(Path(src).resolve()) if isinstance(src, (str, os.PathLike)) else type(src).__name__


class _Job:
    """One compression run: encodes tensors into a PayloadWriter and accumulates manifest entries."""

    def __init__(self, codec: Codec, config: CodecConfig, calibration: Any, *, fallback_dtype: str | None = None):
        self.codec, self.config, self.calibration = codec, config, calibration
        self.dense = get_codec("dense")
        self.dense_config = self.dense.Config()
        self.fallback_dtype = _fallback_dtype(codec, fallback_dtype)
        self.entries: list[TensorEntry] = []
        self.fit_stats: dict[str, Any] = {}
        self.counts = {"matched": 0, "new": 0, "replaced": 0, "unchanged": 0, "kept_from_base": 0}
        self.sq = [0.0, 0.0]  # Σ‖Δ‖², Σ‖Δ − Δ̂‖² over add entries
        self.base_info: BaseInfo | None = None
        self.config_json: Path | None = None
        self.adapter: AdapterInfo | None = None
        self.extra_stats: dict[str, Any] = {}

    def _fit(self, source: DeltaSource, shapes: dict[str, tuple[int, ...]]) -> None:
        stats = self.codec.fit(_Accepted(source, self.codec, self.config, shapes), self.config,
                               calibration=self.calibration)
        self.fit_stats = dict(stats or {})

    def from_checkpoints(self, base: Checkpoint, ft: Checkpoint, tmp: Path) -> None:
        plan = align(base, ft)
        shapes = {p.name: ft.info(p.name)[1] for p in plan.pairs}
        self._fit(CheckpointDelta(base, ft, plan), shapes)
        writer = PayloadWriter(tmp)
        self.counts.update(matched=plan.matched, new=plan.new, replaced=plan.replaced,
                           kept_from_base=len(plan.only_in_base))
        touched = []
        for p in tqdm(plan.pairs, desc=f"compress ({self.codec.name})", unit="tensor", disable=progress_disabled()):
            ft_t = ft.get(p.name)
            if p.op == "add":
                d, exact = exact_delta(ft_t, base.get(p.base_name))
                if d is None:
                    self.counts["unchanged"] += 1
                    continue
                if ft_t.is_floating_point() and (exact or not self.codec.lossless):
                    self._encode_add(writer, p, d, tuple(ft_t.shape), dtype_name(ft_t.dtype))
                    touched.append(p.base_name)
                    continue
            self._encode_replace(writer, p, ft_t)
        writer.flush()
        self.base_info = _base_info(base, touched, plan.prefix)
        if ft.folder is not None and (ft.folder / "config.json").is_file():
            shutil.copyfile(ft.folder / "config.json", tmp / CONFIG_NAME)
            self.config_json = tmp / CONFIG_NAME
        self.files = writer.files

    def from_artifact(self, art: Artifact, tmp: Path) -> None:
        shapes = {e.name: tuple(e.shape) for e in art.manifest.tensors}
        self._fit(_ArtifactDelta(art), shapes)
        writer = PayloadWriter(tmp)
        self.counts.update({k: art.manifest.stats.get(k, 0) for k in self.counts})
        for e in tqdm(art.manifest.tensors, desc=f"re-encode ({self.codec.name})", unit="tensor", disable=progress_disabled()):
            p = Pair(e.name, e.base_name, e.op)
            t = art.decode_tensor(e)
            if e.op in ("add", "native"):
                self._encode_add(writer, p, t, tuple(e.shape), e.dtype, op=e.op)
            else:
                self._encode_replace(writer, p, t)
        self.adapter = art.manifest.adapter
        writer.flush()
        self.base_info = art.manifest.base
        if "config" in art.manifest.extra_files:
            shutil.copyfile(art.folder / art.manifest.extra_files["config"], tmp / CONFIG_NAME)
            self.config_json = tmp / CONFIG_NAME
        self.files = writer.files

    def from_deltas(self, source: ComputedDeltas, tmp: Path) -> None:
        """Encode computed deltas (a merge, or anyone's): ``source`` is iterated twice (fit, then encode)."""
        self._fit(source, {n: tuple(shape) for n, _b, shape, _d in source.entries})
        writer = PayloadWriter(tmp)
        kinds = {n: (b, d) for n, b, _s, d in source.entries}
        for name, t in tqdm(source, desc=f"encode ({self.codec.name})", unit="tensor", disable=progress_disabled()):
            base_name, dtype = kinds[name]
            if base_name is None:
                self._encode_replace(writer, Pair(name, None, "replace"), t)
                self.counts["new"] += 1
            else:
                self._encode_add(writer, Pair(name, base_name, "add"), t, tuple(t.shape), dtype)
                self.counts["matched"] += 1
        writer.flush()
        self.base_info = source.base
        self.files = writer.files

    def _encode_add(self, writer: PayloadWriter, p: Pair, d: torch.Tensor, shape: tuple[int, ...], dtype: str,
                    op: str = "add") -> torch.Tensor:
        """Encode one delta (or an adapter's ``native`` tensor); returns what decoding gives back."""
        use_codec = self.codec.accepts(p.name, shape, self.config)
        codec, config = (self.codec, self.config) if use_codec else (self.dense, self._fallback_config(d))
        d_in = d if codec.lossless else d.float()
        enc = codec.encode(d_in.contiguous(), config, self.fit_stats if use_codec else None, name=p.name)
        dec = codec.decode(enc, shape)
        norm2 = float(d.double().pow(2).sum())
        err2 = float((d.double() - dec.double()).pow(2).sum())
        self.sq[0] += norm2
        self.sq[1] += err2
        file, keys, sha = writer.add(p.name, enc)
        self.entries.append(TensorEntry(
            name=p.name, base_name=p.base_name, op=op, shape=list(shape), dtype=dtype, codec=codec.name,
            codec_version=codec.version, params=config.model_dump(mode="json"), meta=dict(enc.meta), file=file,
            payload=keys, sha256=sha, rel_error=_sig(math.sqrt(err2 / norm2)) if norm2 > 0 else 0.0))
        return dec

    def _fallback_config(self, d: torch.Tensor) -> CodecConfig:
        """``dense`` options for a delta the codec leaves alone: fp16 stores a bias or norm delta in half the
        bytes of fp32 (a quarter of a ``dare p=0.99`` MiniLM expert's payload is these 30,720 values), with
        bf16 where fp16 would overflow (|Δ| > 65504)."""
        dtype = self.fallback_dtype if d.is_floating_point() else "exact"  # integer tensors (indices) stay exact
        if dtype == "float16" and not torch.isfinite(d.to(torch.float16)).all():
            dtype = "bfloat16"
        return self.dense_config if dtype == "exact" else self.dense.parse_config({"dtype": dtype})

    def _encode_replace(self, writer: PayloadWriter, p: Pair, t: torch.Tensor) -> None:
        enc = self.dense.encode(t.contiguous(), self.dense_config, None, name=p.name)
        file, keys, sha = writer.add(p.name, enc)
        self.entries.append(TensorEntry(
            name=p.name, base_name=p.base_name, op="replace", shape=list(t.shape), dtype=dtype_name(t.dtype),
            codec="dense", codec_version=self.dense.version, params=self.dense_config.model_dump(mode="json"),
            meta=dict(enc.meta), file=file, payload=keys, sha256=sha, rel_error=0.0))

    def finish(self, tmp: Path, name: str, provenance: dict[str, Any]) -> Manifest:
        from deltahub._version import __version__

        files = list(self.files) + ([CONFIG_NAME] if self.config_json else [])
        entries = [FileEntry(path=f, size=s, sha256=h) for f in files for s, h in [sha256_file(tmp / f)]]
        return Manifest(
            format_version=FORMAT_VERSION, deltahub_version=__version__, name=name,
            kind=self.adapter.kind if self.adapter else "delta", base=self.base_info, tensors=self.entries,
            files=entries, fit_stats=self.fit_stats, provenance=provenance, stats=self._stats(),
            extra_files={"config": CONFIG_NAME} if self.config_json else {}, adapter=self.adapter)

    def _stats(self) -> dict[str, Any]:
        adds = [e for e in self.entries if e.op in ("add", "native")]
        params = sum(e.numel for e in adds)
        bits = 8 * sum(e.stored_bytes() for e in adds)
        bpp = bits / params if params else 0.0
        codecs = sorted({e.codec for e in adds})
        return {
            **self.counts, "codec": self.codec.name, "codec_params": self.config.model_dump(mode="json"),
            "codecs_used": codecs, "params": params, "payload_bytes": bits // 8,
            "replaced_bytes": sum(e.stored_bytes() for e in self.entries if e.op == "replace"),
            "bits_per_param": round(bpp, 6), "ratio_vs_fp16": round(16 / bpp, 3) if bpp else None,
            "rel_error": round(math.sqrt(self.sq[1] / self.sq[0]), 6) if self.sq[0] else 0.0,
            **_fidelity(self.fit_stats), **self.extra_stats,
        }


def _fidelity(fit: dict[str, Any]) -> dict[str, Any]:
    """The end-to-end figures a codec measured in ``fit`` (``auto`` with calibration), for the card and inspect."""
    m = fit.get("measured")
    if not isinstance(m, dict):
        return {}
    target = ", ".join(f"{k}={v}" for k, v in (fit.get("target") or {}).items())
    return {"fidelity": {"calibration_kl": m.get("kl"), "calibration_agreement": m.get("agreement"),
                         "calibration_outputs": fit.get("calibration_outputs"), "target": target,
                         "target_met": fit.get("met", True), "objective": fit.get("objective")}}


def _sig(x: float) -> float:
    """6 significant digits: the manifest's figures are for people, not 17-digit round trips."""
    return float(f"{x:.6g}")


FALLBACK_DTYPES = ("exact", "float16", "bfloat16")


def _fallback_dtype(codec: Codec, requested: str | None) -> str:
    """The storage of ``dense`` fallbacks: exact for lossless codecs, else ``requested`` or fp16.

    Raises:
        CodecConfigError: an unknown type, or a lossy fallback asked of a lossless codec.
    """
    from deltahub.errors import CodecConfigError

    if requested is not None and requested not in FALLBACK_DTYPES:
        raise CodecConfigError(f"Unknown fallback dtype {requested!r}: use one of {', '.join(FALLBACK_DTYPES)}.")
    if codec.lossless:
        if requested not in (None, "exact"):
            raise CodecConfigError(f"Codec '{codec.name}' is lossless, so it keeps every tensor exact; drop "
                                   "--fallback-dtype or pick a lossy codec.")
        return "exact"
    return requested or "float16"


_HF_SNAPSHOT = re.compile(r"/models--(?P<org>[\w.-]+?)--(?P<name>[\w.-]+)/snapshots/(?P<rev>[0-9a-f]{40})(/|$)")


def base_location(path: Path) -> dict[str, str]:
    """Where the base lives: a path, and its Hub repo and commit when it is a Hugging Face cache snapshot."""
    resolved = str(Path(path).resolve())
    m = _HF_SNAPSHOT.search(str(Path(path).absolute())) or _HF_SNAPSHOT.search(resolved)
    if m:
        return {"type": "hub", "repo": f"{m['org']}/{m['name']}", "revision": m["rev"], "path": resolved}
    return {"type": "path", "path": resolved}


def _base_info(base: Checkpoint, touched: list[str], prefix: dict[str, str]) -> BaseInfo:
    tensors = hash_tensors(base, sorted(touched))
    location: dict[str, str] = {}
    if base.path is not None:
        location = base_location(Path(base.path))
    cfg = base.config() or {}
    hint = cfg.get("_name_or_path") or (Path(base.path).name if base.path is not None else None)
    return BaseInfo(fingerprint=root_hash(tensors), tensors=tensors, name=hint or None, location=location, prefix=prefix)
