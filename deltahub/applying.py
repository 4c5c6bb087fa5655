"""``deltahub.apply``: base + α·Δ, written in the base's own layout and dtype.

The base is checked by fingerprint first (DESIGN §2.2): names are hints, hashes are proof. Each touched
weight is computed as round(w + α·Δ) in fp32 (fp64 for exact dense deltas), rounded once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from deltahub.artifact import Artifact, Term, staging
from deltahub.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from deltahub.constants import progress_disabled
from deltahub.errors import CheckpointError
from deltahub.fingerprint import verify_base
from deltahub.kernels import apply_


def out_name(base_name: str, prefix: dict[str, str]) -> str:
    """The fine-tuned model's name for a base tensor (undoing the wrapper-prefix alignment)."""
    if "strip" in prefix:
        return prefix["strip"] + base_name
    if "add" in prefix and base_name.startswith(prefix["add"]):
        return base_name[len(prefix["add"]):]
    return base_name


def merged_tensor(art: Artifact, term: Term, base_t: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """The output tensor for one term: replacement, or round(base + α·Δ) written into ``base_t``."""
    if term.op == "replace":
        return art.decode_tensor(term.entry)
    return apply_(base_t, art.term_resident(term, device=base_t.device), alpha=alpha)


def apply(artifact: Artifact | str | os.PathLike[str], base: Any, *, alpha: float = 1.0,
          out: str | os.PathLike[str] | None = None, verify: bool = True) -> Any:
    """Apply a delta to its base.

    Args:
        artifact: an :class:`Artifact` or the path of an artifact folder.
        base: a model folder or ``.safetensors`` file (then ``out`` is required and a merged copy is
            written in the base's layout), a state dict (a new merged state dict is returned), or an
            ``nn.Module`` (merged in place).
        alpha: scale of the delta (replacements are always taken whole).
        out: output folder (or ``.safetensors`` file when ``base`` is a file).
        verify: check the base fingerprint first (leave on; off only for benchmarks).

    Returns:
        The output path, the merged state dict, or the module.

    Raises:
        BaseMismatchError: the base is not the one the delta was made from.
        CheckpointError: unreadable base, or no ``out`` for a path base.
    """
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    if isinstance(base, torch.nn.Module):
        _apply_module(art, base, alpha, verify)
        return base
    ckpt = Checkpoint.open(base)
    if verify:
        verify_base(ckpt, art.manifest.base.tensors, artifact=f"artifact {art.name!r}")
    if ckpt.path is None:
        return _apply_state_dict(art, ckpt, alpha)
    if out is None:
        raise CheckpointError("Applying to a model on disk writes a merged copy: pass -o OUT.")
    return _apply_files(art, ckpt, alpha, Path(out))


def _apply_state_dict(art: Artifact, ckpt: Checkpoint, alpha: float) -> dict[str, torch.Tensor]:
    prefix = art.manifest.base.prefix
    terms = art.terms()
    by_base = {e.base_name: e for e in terms if e.base_name is not None}
    out: dict[str, torch.Tensor] = {}
    for name in ckpt.keys():
        e = by_base.get(name)
        t = ckpt.get(name)
        out[out_name(name, prefix)] = merged_tensor(art, e, t.clone(), alpha) if e is not None else t
    for e in terms:
        if e.base_name is None:
            out[e.name] = merged_tensor(art, e, None, alpha)
    return out


@torch.no_grad()
def _apply_module(art: Artifact, module: torch.nn.Module, alpha: float, verify: bool) -> None:
    sd = module.state_dict()
    if verify:
        verify_base(Checkpoint.open(sd), art.manifest.base.tensors, artifact=f"artifact {art.name!r}")
    terms = art.terms()
    for e in terms:
        if e.base_name is None or e.base_name not in sd or e.op != "add":
            raise CheckpointError(
                f"Tensor {e.name!r} is new or reshaped in the fine-tuned model and cannot be applied to a module in "
                "place; apply to a state dict or a model folder instead."
            )
    seen: set[tuple[int, int]] = set()
    for e in terms:
        t = sd[e.base_name]  # state_dict tensors share storage with the parameters
        where = (t.untyped_storage().data_ptr(), t.storage_offset())
        if where in seen:  # tied weights (GPT-2 wte / lm_head): one tensor, so one delta
            continue
        seen.add(where)
        merged_tensor(art, e, t, alpha)


def _apply_files(art: Artifact, ckpt: Checkpoint, alpha: float, out: Path) -> Path:
    prefix = art.manifest.base.prefix
    terms = art.terms()
    by_base = {e.base_name: e for e in terms if e.base_name is not None}
    new = [e for e in terms if e.base_name is None]
    shards = ckpt.files
    single_file = ckpt.folder is None
    weight_map: dict[str, str] = {}
    with staging(out, kind="output") as tmp:
        if not single_file:
            _copy_model_files(ckpt.folder, tmp, {p.name for p in shards} | {INDEX_NAME})
        for i, shard in enumerate(tqdm(shards, desc="apply", unit="shard", disable=progress_disabled())):
            tensors: dict[str, torch.Tensor] = {}
            for name in [k for k in ckpt.keys() if ckpt.file_of(k) == shard]:
                e = by_base.get(name)
                t = ckpt.get(name)
                tensors[out_name(name, prefix)] = merged_tensor(art, e, t, alpha) if e is not None else t
            if i == len(shards) - 1:
                tensors.update({e.name: merged_tensor(art, e, None, alpha) for e in new})
            target = tmp / ("model.safetensors" if single_file else shard.name)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata={"format": "pt"})
            weight_map.update({k: target.name for k in tensors})
        if not single_file and (ckpt.folder / INDEX_NAME).is_file():
            total = sum(v for v in [(tmp / f).stat().st_size for f in set(weight_map.values())])
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if "config" in art.manifest.extra_files:  # the fine-tuned architecture, so the folder loads as the expert
            shutil.copyfile(art.folder / art.manifest.extra_files["config"], tmp / "config.json")
    if single_file:
        return out / SINGLE_NAME
    return out


def _copy_model_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Config, tokenizer and other small files of the base folder (not its weights)."""
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_dir() or rel.as_posix() in skip or rel.parts[0].startswith("."):
            continue
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx"):
            continue  # weights in other formats would not match the merged ones
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst / rel)
