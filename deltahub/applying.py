"""``deltahub.apply``: base + α·Δ, written in the base's own layout and dtype.

The base is checked by fingerprint first (DESIGN §2.2): names are hints, hashes are proof. Each touched
weight is computed as round(w + α·Δ) in fp32 (fp64 for exact dense deltas), rounded once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from deltahub.artifact import Artifact, Term, staging
from deltahub.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from deltahub.constants import progress_disabled
from deltahub.delta import _candidates
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
    terms = art.terms()
    to_module = _module_names([r.name for r in art.manifest.base.tensors], list(sd))
    if verify:
        view = {r.name: sd[to_module(r.name)] for r in art.manifest.base.tensors if to_module(r.name) in sd}
        verify_base(Checkpoint.open(view), art.manifest.base.tensors, artifact=f"artifact {art.name!r}")
    targets = []
    for e in terms:
        name = to_module(e.base_name) if e.base_name is not None else next(
            (n for n in (e.name, to_module(e.name)) if n in sd), None)  # a new head the module has a place for
        if name not in sd or tuple(sd[name].shape) != tuple(e.shape) or (e.base_name is not None and e.op != "add"):
            raise CheckpointError(
                f"Tensor {e.name!r} is new or reshaped in the fine-tuned model and cannot be applied to a module in "
                "place; apply to a state dict or a model folder instead."
            )
        targets.append((e, sd[name]))  # state_dict tensors share storage with the parameters
    seen: set[tuple[int, int]] = set()
    for e, t in targets:
        where = (t.untyped_storage().data_ptr(), t.storage_offset())
        if where in seen:  # tied weights (GPT-2 wte / lm_head): one tensor, so one delta
            continue
        seen.add(where)
        if e.base_name is None:
            t.copy_(art.decode_tensor(e.entry))
        else:
            merged_tensor(art, e, t, alpha)


def _module_names(names: list[str], module_names: list[str]) -> Callable[[str], str]:
    """The one prefix change that maps most artifact base names onto a module's (``BertModel`` names onto a
    ``BertForSequenceClassification``: add ``bert.``; or the reverse); identity wins ties."""
    have = set(module_names)
    options: list[Callable[[str], str]] = [lambda n: n]
    options += [lambda n, p=p: p + n for p in sorted(_candidates(module_names))]
    options += [lambda n, p=p: n.removeprefix(p) for p in sorted(_candidates(names))]
    return max(options, key=lambda f: sum(f(n) in have for n in names))


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
