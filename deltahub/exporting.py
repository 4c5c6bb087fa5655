"""``deltahub export``: give an expert back to another library's folder format (PEFT LoRA).

A LoRA artifact exports its factors as they decode (bit for bit with ``dense``) with its original
``adapter_config.json``. A full-delta artifact (any codec) exports as LoRA by truncated SVD, as mergekit's
``extract-lora`` does: every 2-D weight delta Δ ≈ U_r S_r V_rᵀ becomes B = U_r S_r^½, A = S_r^½ V_rᵀ with
α = r (scale 1). Which 2-D tensors are embeddings (``lora_embedding_A/B``) or GPT-2 ``Conv1D`` weights
(``fan_in_fan_out``: ``c_attn``, ``c_proj``, ``c_fc``, ``q_attn`` unless the fine-tuned config names a
model type without them) is read from names: see :func:`_layer_of`. Deltas LoRA
cannot hold (1-D biases and norms) are dropped; the error reported, ‖Δ − Δ_LoRA‖ / ‖Δ‖ over every
delta, counts them in full. New tensors (a classifier head) go to ``modules_to_save``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltahub.artifact import Artifact, staging
from deltahub.errors import CodecConfigError

FORMATS = ("peft",)
_CONV1D_MODELS = ("gpt2", "openai-gpt", "gpt_bigcode", "imagegpt", "decision_transformer")
FULL_SVD_MAX = 2048  # larger matrices use torch.svd_lowrank (randomized, 6 power iterations): ~100x faster
_EMBEDDING = re.compile(r"(^|\.)(wte|wpe|embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|"
                        r"embed_positions|shared)\.weight$")
_CONV1D = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")  # transformers' GPT-2 family Conv1D layers


@dataclass
class ExportReport:
    path: Path
    format: str
    rank: int | None = None
    rel_error: float = 0.0
    dropped: list[str] = field(default_factory=list)


def export(artifact: Artifact | str | os.PathLike[str], out: str | os.PathLike[str], *, format: str = "peft",
           rank: int = 16) -> ExportReport:
    """Write ``artifact`` into ``out`` in another library's format.

    Args:
        rank: LoRA rank for full-delta experts (ignored for LoRA artifacts).

    Raises:
        CodecConfigError: an unknown format, a bad rank, or an adapter kind without that format.
    """
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    if format not in FORMATS:
        raise CodecConfigError(f"Unknown export format {format!r}; use one of {', '.join(FORMATS)}.")
    whole = {t.name: art.decode_tensor(t.entry) for t in art.terms() if t.op == "replace"}
    kind = art.adapter_kind()
    with staging(Path(out), kind="output") as tmp:
        if kind is not None:
            if kind.name == "lora":
                kind.write_folder(tmp, art.native_tensors(), art.manifest.adapter.config, whole)
            else:
                _export_lowrank(kind, art, tmp, whole)
            report = ExportReport(Path(out), format, rel_error=float(art.manifest.stats.get("rel_error") or 0.0))
        else:
            report = _export_delta(art, tmp, whole, rank)
            report.path = Path(out)
    return report


def _export_lowrank(kind: Any, art: Artifact, tmp: Path, whole: dict[str, torch.Tensor]) -> None:
    """An adapter kind whose targets all materialize as ``LowRank`` (mos, 2-D flora) exported as the LoRA it
    equals: A, B and scale per target (α = scale·r, so PEFT's α/r is the scale), exactly.

    Raises:
        CodecConfigError: some target is no plain low-rank weight delta (a convolution, an attached module).
    """
    from deltahub.adapters.lora import LoraAdapter
    from deltahub.adapters.lora_layers import peft_config
    from deltahub.kernels.layouts import LowRank

    made = kind.materialize(art.native_tensors(), art.manifest.adapter.config)
    bad = [n for n, r in made.items() if not isinstance(r, LowRank) or r.transposed]
    if bad:
        raise CodecConfigError(f"Adapter kind {kind.name}: target {bad[0]!r} is not a linear low-rank delta, so the "
                               "expert has no PEFT LoRA form; serve it with deltahub instead.")
    tensors, modules = {}, {}
    for name, r in made.items():
        module = name.removesuffix(".weight")
        tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"] = r.A.float(), r.B.float()
        modules[module] = {"layer": "linear", "r": r.rank, "alpha": r.scale * r.rank, "scale": r.scale}
    peft = peft_config(modules)
    peft["modules_to_save"] = sorted({k.rsplit(".", 1)[0] for k in whole}) or None
    LoraAdapter().write_folder(tmp, tensors, {"peft_config": peft}, whole)


def _layer_of(name: str, shape: list[int], model_type: str | None) -> str | None:
    """linear | conv1d | embedding for a 2-D weight named ``name``; None for what LoRA cannot hold."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return None
    if _EMBEDDING.search(name):
        return "embedding"
    return "conv1d" if _CONV1D.search(name) and model_type in (None, *_CONV1D_MODELS) else "linear"


def _svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-``rank`` approximation of ``delta`` (fp32)."""
    d = delta.double() if max(delta.shape) <= FULL_SVD_MAX else delta.float()
    if max(d.shape) <= FULL_SVD_MAX:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        U, S, V = torch.svd_lowrank(d, q=min(rank + 8, min(d.shape)), niter=6)
        U, S, Vh = U[:, :rank], S[:rank], V[:, :rank].T
    root = S.sqrt()
    return (U * root).float().contiguous(), (root[:, None] * Vh).float().contiguous()


def _export_delta(art: Artifact, tmp: Path, whole: dict[str, torch.Tensor], rank: int) -> ExportReport:
    if not isinstance(rank, int) or rank < 1:
        raise CodecConfigError(f"Bad value for 'rank' of the peft export: {rank!r}; give an integer >= 1.")
    model_type = _model_type(art)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    dropped: list[str] = []
    norm2 = err2 = 0.0
    for term in art.terms():
        if term.op != "add":
            continue
        delta = art.decode_tensor(term.entry).float()
        n2 = float(delta.double().pow(2).sum())
        norm2 += n2
        layer = _layer_of(term.name, list(term.shape), model_type)
        if layer is None:
            dropped.append(term.name)
            err2 += n2
            continue
        mat = delta if layer == "linear" else delta.T  # LoRA's (out, in) view: B A = Δ or Δᵀ
        r = min(rank, *mat.shape)
        B, A = _svd(mat, r)
        err2 += float((mat.double() - B.double() @ A.double()).pow(2).sum())
        module = term.name.removesuffix(".weight")
        keys = (".lora_embedding_A", ".lora_embedding_B") if layer == "embedding" else (".lora_A.weight",
                                                                                        ".lora_B.weight")
        tensors[module + keys[0]], tensors[module + keys[1]] = A, B
        modules[module] = {"layer": layer, "r": r, "alpha": float(r), "scale": 1.0}
    peft = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(modules),
            "rank_pattern": {m: v["r"] for m, v in modules.items() if v["r"] != rank},
            "alpha_pattern": {m: v["alpha"] for m, v in modules.items() if v["r"] != rank},
            "fan_in_fan_out": any(v["layer"] == "conv1d" for v in modules.values()), "bias": "none", "use_rslora": False,
            "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in whole}) or None, "lora_dropout": 0.0,
            "base_model_name_or_path": art.manifest.base.location.get("repo") or art.manifest.base.name,
            "inference_mode": True, "task_type": None}
    from deltahub.adapter import get_adapter

    get_adapter("lora").write_folder(tmp, tensors, {"peft_config": peft, "modules": modules}, whole)
    rel = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    (tmp / "deltahub_export.json").write_text(json.dumps({
        "from_artifact": art.id, "method": "truncated SVD", "rank": rank, "rel_error": rel, "dropped": dropped},
        indent=2) + "\n")
    return ExportReport(tmp, "peft", rank, rel, dropped)


def _model_type(art: Artifact) -> str | None:
    path = art.manifest.extra_files.get("config")
    if path is None:
        return None
    try:
        return json.loads((art.folder / path).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
