"""Adapter experts: import (a PEFT folder), save natively trained adapters, and store their native tensors.

``compress_adapter`` binds an adapter to its base the way ``compress`` binds a delta: each target weight is
aligned with the base by name (across wrapper prefixes) and shape, its bytes fingerprinted, and each
native tensor (a LoRA factor) encoded with the chosen codec. The error recorded is that of the weight
deltas the adapter stands for (‖ΔW − ΔŴ‖/‖ΔW‖ over all targets), computed from the factors' Gram matrices
for low-rank targets, so a 50k x 768 embedding delta is never built.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from deltahub.adapter import AdapterKind, Imported, get_adapter
from deltahub.artifact import Artifact, staging
from deltahub.checkpoint import Checkpoint, dtype_name
from deltahub.codecs import ListSource, get_codec
from deltahub.constants import CARD_NAME
from deltahub.delta import Pair, align
from deltahub.errors import BaseMismatchError
from deltahub.kernels.layouts import LowRank
from deltahub.manifest import MANIFEST_NAME, AdapterInfo, BaseInfo


def compress_adapter(kind: AdapterKind | str, imported: Imported, *, base: Any, codec: str = "dense",
                     out: str | os.PathLike[str] | None = None, name: str | None = None,
                     provenance: dict[str, Any] | None = None, **params: Any) -> Artifact:
    """Write an adapter artifact from native tensors.

    Raises:
        CodecNotFoundError, CodecConfigError: bad codec or options.
        NothingMatchedError: no target weight is in the base.
        BaseMismatchError: some target weight is missing from the base or has another shape.
    """
    from deltahub.compressing import _base_info

    get_codec(codec).parse_config(params)  # a bad codec or option is reported before the base is read
    base_ckpt = Checkpoint.open(base)
    pairs, prefix = _align(base_ckpt, imported)
    names = {k: p.base_name for k, p in pairs.items()}
    touched = [names[t.weight] for t in imported.targets]
    return write_adapter(kind, imported, base=lambda: _base_info(base_ckpt, touched, prefix), base_names=names,
                         codec=codec, out=out, name=name, provenance=provenance, **params)


def write_adapter(kind: AdapterKind | str, imported: Imported, *, base: BaseInfo | Callable[[], BaseInfo],
                  base_names: Mapping[str, str | None], codec: str = "dense", out: str | os.PathLike[str] | None = None,
                  name: str | None = None, provenance: dict[str, Any] | None = None, **params: Any) -> Artifact:
    """Write an adapter artifact whose targets are already bound to a base (``deltahub.merge`` of LoRA experts).

    ``base_names`` maps each target weight and whole tensor to its name in the base (None: a new tensor);
    ``base`` is the base's fingerprint record, or a function that computes it (hashing the base's bytes).

    Raises:
        CodecNotFoundError, CodecConfigError: bad codec or options.
    """
    from deltahub.compressing import _Job
    from deltahub.writer import PayloadWriter

    kind = get_adapter(kind) if isinstance(kind, str) else kind
    codec_obj = get_codec(codec)
    job = _Job(codec_obj, codec_obj.parse_config(params), None)
    out_path = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="deltahub-")) / "adapter"
    with staging(out_path) as tmp:
        job._fit(ListSource(imported.tensors), {k: tuple(t.shape) for k, t in imported.tensors.items()})
        writer = PayloadWriter(tmp)
        owner = {k: t.weight for t in imported.targets for k in t.tensors}
        decoded = {}
        for key in sorted(imported.tensors):
            t = imported.tensors[key]
            p = Pair(key, base_names[owner[key]], "native")
            decoded[key] = job._encode_add(writer, p, t, tuple(t.shape), dtype_name(t.dtype), op="native").to(t.dtype)
        for key in sorted(imported.whole):
            job._encode_replace(writer, Pair(key, base_names[key], "replace"), imported.whole[key])
        writer.flush()
        job.files = writer.files
        job.base_info = base() if callable(base) else base
        job.adapter = AdapterInfo(kind=kind.name, version=kind.version, config=imported.config)
        job.counts.update(matched=len(imported.targets), new=sum(base_names[k] is None for k in imported.whole),
                          replaced=sum(base_names[k] is not None for k in imported.whole))
        job.extra_stats = _adapter_stats(kind, imported, decoded, job)
        manifest = job.finish(tmp, name or out_path.name, provenance or {"source": "adapter"})
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        from deltahub.card import render_card

        (tmp / CARD_NAME).write_text(render_card(manifest))
    return Artifact.load(out_path)


def _align(base: Checkpoint, imported: Imported) -> tuple[dict[str, Pair], dict[str, str]]:
    """Target weights and whole tensors matched with the base by name and shape (meta tensors: no data)."""
    view = {t.weight: torch.empty(t.shape, device="meta") for t in imported.targets}
    view.update({k: torch.empty(v.shape, device="meta") for k, v in imported.whole.items()})
    plan = align(base, Checkpoint(tensors=view))
    pairs = {p.name: p for p in plan.pairs}
    bad = [t for t in imported.targets if pairs[t.weight].op != "add"]
    if bad:
        t = bad[0]
        where = pairs[t.weight].base_name
        has = "lacks it" if where is None else f"has it as {list(base.info(where)[1])}"
        raise BaseMismatchError(f"The adapter changes {t.weight!r} of shape {list(t.shape)}, and this base {has} "
                                f"({len(bad)} of {len(imported.targets)} targets differ); use the base it was "
                                "trained on.")
    return pairs, plan.prefix


def _gram_sq(parts: list[tuple[float, torch.Tensor, torch.Tensor]]) -> float:
    """‖Σ s_i B_i A_i‖²_F from r x r Gram matrices: ‖B A‖² = Σ (BᵀB) ∘ (A Aᵀ)."""
    B = torch.cat([s * b.double() for s, b, _ in parts], dim=1)
    A = torch.cat([a.double() for _, _, a in parts], dim=0)
    return float(((B.T @ B) * (A @ A.T)).sum())


def _adapter_stats(kind: AdapterKind, imported: Imported, decoded: dict[str, torch.Tensor], job: Any) -> dict:
    delta_params = sum(math.prod(t.shape) for t in imported.targets)
    stored = sum(e.stored_bytes() for e in job.entries if e.op == "native")
    stats: dict[str, Any] = {"adapter": kind.name, "targets": len(imported.targets), "delta_params": delta_params,
                             "ratio_vs_fp16_delta": round(2 * delta_params / stored, 3) if stored else None,
                             "factor_rel_error": round(math.sqrt(job.sq[1] / job.sq[0]), 6) if job.sq[0] else 0.0}
    want = kind.materialize(imported.tensors, imported.config)
    got = kind.materialize(decoded, imported.config)
    if all(isinstance(v, LowRank) for v in [*want.values(), *got.values()]):
        norm = err = 0.0
        for w, a in want.items():
            b = got[w]
            norm += _gram_sq([(a.scale, a.B, a.A)])
            err += _gram_sq([(a.scale, a.B, a.A), (-b.scale, b.B, b.A)])
        stats["rel_error"] = round(math.sqrt(max(err, 0.0) / norm), 6) if norm > 0 else 0.0
        stats["ranks"] = sorted({v.rank for v in want.values()})
    return stats


def attach(artifact: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Attach an adapter artifact whose kind is not a weight delta (Compacter) to ``model``, in place: each
    target module is wrapped so the adapter runs on its output; the artifact's whole tensors (a head) are loaded.

    Raises:
        NotMergeableError: the artifact is a weight delta (use ``deltahub.apply``).
        BaseMismatchError: a target module is missing from ``model`` or has another weight shape.
    """
    from deltahub.adapters.injection import Attached, swap
    from deltahub.errors import NotMergeableError

    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    kind = art.adapter_kind()
    made = kind.materialize(art.native_tensors(), art.manifest.adapter.config) if kind is not None else {}
    if not made or not all(isinstance(m, torch.nn.Module) for m in made.values()):
        raise NotMergeableError(f"{art.name!r} is a weight delta, not an adapter to attach: use deltahub.apply.")
    modules = dict(model.named_modules())
    shapes = {t.name: tuple(t.shape) for t in art.terms()}
    for weight, adapter in made.items():
        name = weight.removesuffix(".weight")
        mod = modules.get(name)
        if mod is None or getattr(mod, "weight", None) is None or tuple(mod.weight.shape) != shapes[weight]:
            raise BaseMismatchError(f"The model has no module {name!r} of weight shape {list(shapes[weight])} for "
                                    f"{art.name!r}'s adapter; attach it to the model it was trained on.")
        swap(model, name, Attached(mod, adapter))
    state = model.state_dict()
    with torch.no_grad():
        for t in art.terms():
            if t.op == "replace" and t.name in state:
                state[t.name].copy_(art.decode_tensor(t.entry))
    return model


def save_adapter(model: torch.nn.Module, *, kind: str = "lora", base: Any = None, codec: str = "dense",
                 out: str | os.PathLike[str] | None = None, name: str | None = None, whole: tuple[str, ...] = (),
                 **params: Any) -> Artifact:
    """Store the adapter that ``kind.inject`` added to ``model`` as an artifact.

    ``base`` defaults to the model's own frozen weights (its state dict without the adapter's tensors,
    ``base_layer.`` names undone), which is what the adapter was trained on. ``whole`` names state-dict
    tensors trained whole beside the adapter (a new classification head), stored as they are.

    Raises:
        CheckpointError: a ``whole`` name is not in the model's state dict.
    """
    from deltahub.errors import CheckpointError

    kind_obj = get_adapter(kind)
    tensors, config = kind_obj.native_tensors(model)
    state = {k.replace(".base_layer.", "."): v.detach() for k, v in model.state_dict().items()}
    missing = [w for w in whole if w not in state]
    if missing:
        raise CheckpointError(f"whole={missing[0]!r} is not a tensor of the model; name state-dict keys, e.g. "
                              f"{next(iter(state), '?')!r}.")
    imported = Imported(config, tensors, kind_obj.targets(tensors, config), {w: state[w].clone() for w in whole})
    if base is None:
        base = {k: v for k, v in state.items() if k not in tensors}
    return compress_adapter(kind_obj, imported, base=base, codec=codec, out=out, name=name,
                            provenance={"source": f"{type(model).__name__} with {kind} injected"}, **params)
