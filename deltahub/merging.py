"""``deltahub.merge``: one expert from several experts of the same base, one tensor at a time.

The methods and their math, exactly as ``peft.utils.merge_utils`` computes them (fp32), for deltas
τ_1 … τ_n of one tensor and weights w_i:

- ``task_arithmetic`` (Ilharco et al. 2023, arXiv:2212.04089): τ = Σ w_i τ_i.
- ``magnitude_prune``: each τ_i keeps its ⌊density·numel⌋ largest |entries| (``torch.topk``), then Σ w_i τ_i.
- ``ties`` (Yadav et al. 2023, arXiv:2306.01708): trim as ``magnitude_prune``; elect the sign
  γ = sign(Σ_i τ_i) (``majority_sign_method="total"``) or sign(Σ_i sign τ_i) (``"frequency"``), 0 counted
  as +; disjoint mean τ = Σ_i w_i τ_i [sign τ_i = γ] / max(1, Σ_i [sign τ_i = γ]).
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, arXiv:2311.03099): each τ_i keeps entries with
  probability ``density`` and survivors are divided by it, then task arithmetic / TIES' sign election and
  disjoint mean. The masks come from deltahub's portable DARE generator keyed by (seed + i, tensor name)
  (``deltahub.plugins.dare.keep_mask``), so a merge is reproducible from its recipe on any machine;
  PEFT draws them from torch's global RNG instead (the parity test gives both the same mask).

LoRA experts merge as their full deltas ΔW = s·BA, except that ``task_arithmetic`` of LoRA experts stays
LoRA (``form="auto"``): the factors are concatenated as PEFT's ``add_weighted_adapter(combination_type="cat")``
does, A = [w_1 s_1 A_1; …; w_n s_n A_n], B = [B_1 … B_n], rank Σ r_i and scale 1, so B A = Σ w_i s_i B_i A_i
exactly and the result stays exportable to PEFT and vLLM. Replaced tensors (a new head) are kept from the one
expert that has them. Inputs are streamed: per tensor name, one delta per input in memory.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from deltahub.artifact import Artifact
from deltahub.compressing import ComputedDeltas, write_deltas
from deltahub.errors import BaseMismatchError, MergeError
from deltahub.fingerprint import root_hash
from deltahub.kernels import to_dense
from deltahub.manifest import BaseInfo

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_PARAMS = {"task_arithmetic": set(), "magnitude_prune": {"density"}, "ties": {"density", "majority_sign_method"},
           "dare_linear": {"density", "seed"}, "dare_ties": {"density", "seed", "majority_sign_method"}}


def merge(artifacts: Sequence[Artifact | str | os.PathLike[str]], *, method: str,
          weights: Sequence[float] | None = None, codec: str = "dense", out: str | os.PathLike[str] | None = None,
          name: str | None = None, new: str = "error", form: str = "auto", **params: Any) -> Artifact:
    """Merge experts of one base into a new artifact whose manifest records the recipe.

    Args:
        artifacts: two or more :class:`Artifact` objects or artifact folders.
        method: one of :data:`METHODS`.
        weights: one weight per input (default 1.0 each).
        codec: how the merged deltas are stored (default lossless ``dense``); codec options go in ``params``
            prefixed ``codec_`` (``codec_density=0.1``).
        out: the folder to write (default a temporary folder).
        name: the artifact's name (default the folder's name).
        new: tensors that inputs replace whole (task heads): ``error`` (default) when more than one input
            has one, ``drop`` to leave them all out (merge the encoders; keep each task's head yourself).
        form: ``auto`` (default: LoRA experts merged by ``task_arithmetic`` stay LoRA, rank Σ r_i; anything
            else is a delta), ``delta`` (always a delta) or ``lora`` (LoRA, or an error when it cannot be).
        **params: the method's options: ``density`` (kept fraction, 0 < density ≤ 1), ``majority_sign_method``
            (``total`` or ``frequency``), ``seed`` (DARE masks).

    Raises:
        MergeError: an unknown method or option, a bad weight count or density, one input, or a tensor that
            several inputs replace whole, or ``form="lora"`` for inputs or a method that cannot stay LoRA.
        BaseMismatchError: the inputs were made from different bases (the message names the odd one).
    """
    arts = [a if isinstance(a, Artifact) else Artifact.load(a) for a in artifacts]
    if new not in ("error", "drop"):
        raise MergeError(f"new is 'error' or 'drop', got {new!r}.")
    recipe = _recipe(arts, method, weights, params)
    if new == "drop":
        recipe["new"] = "drop"
    base, entries, sources = _plan(arts, drop_new=new == "drop")
    if _stays_lora(arts, method, form):
        recipe["form"] = "lora"
        return _merge_lora(arts, recipe, base, sources, codec=codec, out=out, name=name, **{
            k[len("codec_"):]: v for k, v in params.items() if k.startswith("codec_")})
    codec_params = {k[len("codec_"):]: v for k, v in params.items() if k.startswith("codec_")}

    def compute(tensor: str) -> torch.Tensor:
        return _merge_tensor(tensor, sources[tensor], recipe)

    return write_deltas(ComputedDeltas(base, entries, compute), codec=codec, out=out, name=name,
                        provenance={"source": f"deltahub merge ({method})", "merge": recipe}, **codec_params)


def _stays_lora(arts: list[Artifact], method: str, form: str) -> bool:
    if form not in ("auto", "delta", "lora"):
        raise MergeError(f"form is 'auto', 'delta' or 'lora', got {form!r}.")
    lora = method == "task_arithmetic" and all(a.manifest.kind == "lora" for a in arts)
    if form == "lora" and not lora:
        raise MergeError("Only task_arithmetic of LoRA experts stays LoRA (its result is a sum of low-rank terms); "
                         f"{method} of {', '.join(sorted({a.manifest.kind for a in arts}))} experts gives a delta: "
                         "pass form='delta' (--form delta).")
    return lora and form != "delta"


def _recipe(arts: list[Artifact], method: str, weights: Sequence[float] | None, params: dict) -> dict[str, Any]:
    if method not in METHODS:
        raise MergeError(f"Unknown merge method {method!r}; use one of {', '.join(METHODS)}.")
    if len(arts) < 2:
        raise MergeError(f"A merge needs two or more experts, got {len(arts)}.")
    own = {k: v for k, v in params.items() if not k.startswith("codec_")}
    extra = set(own) - _PARAMS[method]
    if extra:
        allowed = ", ".join(sorted(_PARAMS[method])) or "none"
        raise MergeError(f"Method {method!r} has no option {min(extra)!r}; its options: {allowed}.")
    w = [1.0] * len(arts) if weights is None else [float(x) for x in weights]
    if len(w) != len(arts):
        raise MergeError(f"{len(w)} weights for {len(arts)} experts; give one weight per expert.")
    density = float(own.get("density", 1.0))
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density is the fraction of entries kept, in (0, 1]; got {density}.")
    sign = own.get("majority_sign_method", "total")
    if sign not in ("total", "frequency"):
        raise MergeError(f"majority_sign_method is 'total' or 'frequency', got {sign!r}.")
    recipe: dict[str, Any] = {"method": method, "weights": w, "inputs": [a.id for a in arts],
                              "input_names": [a.name for a in arts]}
    if "density" in _PARAMS[method]:
        recipe["density"] = density
    if "majority_sign_method" in _PARAMS[method]:
        recipe["majority_sign_method"] = sign
    if "seed" in _PARAMS[method]:
        recipe["seed"] = int(own.get("seed", 0))
    return recipe


def _plan(arts: list[Artifact], *, drop_new: bool = False) -> tuple[BaseInfo, list, dict[str, list]]:
    """The base (touched tensors of every input), the output entries, and per entry each input's term."""
    first = arts[0].manifest.base
    for a in arts[1:]:
        fp, ref = {t.name: t.sha256 for t in a.manifest.base.tensors}, {t.name: t.sha256 for t in first.tensors}
        clash = next((n for n in fp if n in ref and fp[n] != ref[n]), None)
        if clash is not None or a.manifest.base.name != first.name and not set(fp) & set(ref):
            raise BaseMismatchError(
                f"Expert {a.name!r} was made from another base than {arts[0].name!r} (first difference: "
                f"{clash or 'no touched tensor in common'!r}); merge experts of one base only.")
    touched = {t.name: t for a in arts for t in a.manifest.base.tensors}
    tensors = [touched[n] for n in sorted(touched)]
    base = first.model_copy(update={"tensors": tensors, "fingerprint": root_hash(tensors)})
    entries, sources = [], {}
    for i, a in enumerate(arts):
        for term in a.terms():
            if drop_new and term.base_name is None:
                continue
            key = term.base_name if term.base_name is not None else term.name
            if key not in sources:
                dtype = term.entry.dtype if term.entry is not None else touched[term.base_name].dtype
                entries.append((key, term.base_name, tuple(term.shape), dtype))
                sources[key] = []
            sources[key].append((i, a, term))
    for key, base_name, _shape, _dtype in entries:
        if base_name is None and len(sources[key]) > 1:
            raise MergeError(f"Tensor {key!r} is replaced whole by {len(sources[key])} experts (a task head); a "
                             "merge combines deltas only. Pass new='drop' (--drop-new) to leave heads out.")
    return base, entries, sources


def _merge_tensor(name: str, terms: list, recipe: dict[str, Any]) -> torch.Tensor:
    _, a0, t0 = terms[0]
    if t0.base_name is None:
        return a0.decode_tensor(t0.entry)
    n = len(recipe["inputs"])
    shape = tuple(t0.shape)
    sparse = _sparse_terms(terms, recipe, math.prod(shape))
    if sparse is not None:
        return combine_sparse(sparse, recipe, math.prod(shape), name).reshape(shape)
    deltas = [torch.zeros(shape, dtype=torch.float32) for _ in range(n)]
    for i, a, term in terms:  # inputs that leave this tensor alone contribute τ_i = 0
        d = a.decode_tensor(term.entry) if term.entry is not None else to_dense(a.term_resident(term))
        deltas[i] = d.reshape(shape).float()
    return combine(deltas, recipe, name)


def _sparse_terms(terms: list, recipe: dict[str, Any], numel: int) -> dict[int, tuple] | None:
    """Each input's (positions, values) when every input stores this tensor sparse and trimming (TIES,
    magnitude prune) would keep all its entries anyway (top-k among equal magnitudes is no defined choice)."""
    out = {}
    for i, a, term in terms:
        sp = a.sparse_tensor(term.entry) if term.entry is not None else None
        if sp is None:
            return None
        if recipe["method"] in ("ties", "magnitude_prune") and sp[0].numel() > int(recipe["density"] * numel):
            return None
        out[i] = sp
    return out


def combine_sparse(parts: dict[int, tuple[torch.Tensor, torch.Tensor]], recipe: dict[str, Any], numel: int,
                   name: str = "") -> torch.Tensor:
    """:func:`combine` on sparse deltas ({input: (positions, values)}), bit for bit: O(Σ kept) scatters.

    An input that is zero at an element neither votes nor counts there (sign 0 is never the elected
    sign), so scattering each input's kept entries, in input order, gives the dense sums exactly.
    """
    method, density = recipe["method"], recipe.get("density", 1.0)
    w = torch.tensor(recipe["weights"], dtype=torch.float32)
    items = sorted(parts.items())
    if method in ("dare_linear", "dare_ties") and density < 1:
        from deltahub.plugins.dare import keep_mask

        items = [(i, (p, v * keep_mask(recipe["seed"] + i, name, numel, 1.0 - density)[p].to(v.dtype) / density))
                 for i, (p, v) in items]
    out = torch.zeros(numel, dtype=torch.float32)
    if method not in ("ties", "dare_ties"):
        for i, (p, v) in items:
            out.index_add_(0, p, v * w[i])
        return out
    votes = torch.zeros(numel, dtype=torch.float32)  # O(numel) scratch, not O(inputs × numel) as dense
    for _i, (p, v) in items:
        votes.index_add_(0, p, v if recipe["majority_sign_method"] == "total" else v.sign())
    count = torch.zeros(numel, dtype=torch.float32)
    for i, (p, v) in items:
        agree = (v.sign() == torch.where(votes[p] >= 0, 1.0, -1.0)).to(v.dtype)
        out.index_add_(0, p, v * w[i] * agree)
        count.index_add_(0, p, agree)
    return out.div_(count.clamp_(min=1.0))


def combine(deltas: list[torch.Tensor], recipe: dict[str, Any], name: str = "") -> torch.Tensor:
    """The merged delta of one tensor (see the module docstring for each method's math)."""
    method, density = recipe["method"], recipe.get("density", 1.0)
    if method in ("ties", "magnitude_prune"):
        deltas = [_magnitude(d, density) for d in deltas]
    elif method in ("dare_linear", "dare_ties"):
        deltas = [_dare(d, density, recipe["seed"] + i, name) for i, d in enumerate(deltas)]
    stacked = torch.stack(deltas)
    w = torch.tensor(recipe["weights"], dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare_ties"):
        sign = stacked.sign()
        votes = stacked.sum(0) if recipe["majority_sign_method"] == "total" else sign.sum(0)
        agree = sign == torch.where(votes >= 0, 1, -1)
        return (stacked * w * agree).sum(0) / torch.clamp(agree.sum(0), min=1.0)
    return (stacked * w).sum(0)


def _magnitude(d: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return d
    mask = torch.zeros_like(d).reshape(-1)
    mask[torch.topk(d.abs().reshape(-1), k=int(density * d.numel()), largest=True)[1]] = 1
    return d * mask.reshape(d.shape)


def _dare(d: torch.Tensor, density: float, seed: int, name: str) -> torch.Tensor:
    if density >= 1:
        return d
    from deltahub.plugins.dare import keep_mask

    mask = keep_mask(seed, name, d.numel(), 1.0 - density).reshape(d.shape).to(d.dtype)
    return d * mask / density


def _merge_lora(arts: list[Artifact], recipe: dict[str, Any], base: BaseInfo, sources: dict[str, list], *,
                codec: str, out: Any, name: str | None, **codec_params: Any) -> Artifact:
    """task_arithmetic of LoRA experts as one LoRA: per module A = [w_i s_i A_i], B = [B_i], scale 1."""
    from deltahub.adapter import Imported, get_adapter
    from deltahub.adapters.lora import factor_keys
    from deltahub.adapting import write_adapter

    kind = get_adapter("lora")
    configs = [a.manifest.adapter.config for a in arts]
    natives = [a.native_tensors() for a in arts]
    tensors, modules, whole, names = {}, {}, {}, {}
    for key in sorted(sources):
        terms = sources[key]
        first = terms[0][2]
        names[key] = first.base_name
        if first.op == "replace":  # a saved head of one expert (several are refused by _plan)
            whole[key] = terms[0][1].decode_tensor(first.entry)
            continue
        module = key.removesuffix(".weight")
        parts = [(recipe["weights"][i], configs[i]["modules"][module], natives[i]) for i, _a, _t in terms]
        if len({m["layer"] for _w, m, _n in parts}) > 1:
            raise MergeError(f"Module {module!r} is a different kind of layer in different experts "
                             f"({', '.join(sorted({m['layer'] for _w, m, _n in parts}))}); merge form='delta'.")
        ka, kb = factor_keys(module, parts[0][1])
        tensors[ka] = torch.cat([n[ka] * w * float(m["scale"]) for w, m, n in parts], dim=0)  # PEFT's order
        tensors[kb] = torch.cat([n[kb] for _w, _m, n in parts], dim=1)
        r = tensors[ka].shape[0]
        modules[module] = {"layer": parts[0][1]["layer"], "r": r, "alpha": float(r), "scale": 1.0}
    config = {"peft_config": _cat_peft_config(configs, modules, whole), "modules": modules}
    imported = Imported(config, tensors, kind.targets(tensors, config), whole)
    return write_adapter(kind, imported, base=base, base_names=names, codec=codec, out=out, name=name,
                         provenance={"source": "deltahub merge (task_arithmetic, LoRA cat)", "merge": recipe},
                         **codec_params)


def _cat_peft_config(configs: list[dict], modules: dict[str, dict], whole: dict) -> dict[str, Any]:
    """The first expert's PEFT config with r = α (scale 1), exact per-module ranks, every module targeted."""
    peft = dict(configs[0]["peft_config"])
    r = Counter(m["r"] for m in modules.values()).most_common(1)[0][0]
    others = {re.escape(mod): m["r"] for mod, m in modules.items() if m["r"] != r}  # PEFT reads keys as regexes
    saved = sorted({s for c in configs for s in c["peft_config"].get("modules_to_save") or []}) if whole else None
    peft.update(r=r, lora_alpha=r, rank_pattern=others, alpha_pattern=dict(others), use_rslora=False,
                target_modules=sorted(modules), modules_to_save=saved)
    return peft
