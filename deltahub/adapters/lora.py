"""``lora``: low-rank adapters, and PEFT's folder format for them.

Hu et al. *LoRA: Low-Rank Adaptation of Large Language Models* (ICLR 2022), https://arxiv.org/abs/2106.09685;
rsLoRA: Kalajdzievski (2023), https://arxiv.org/abs/2312.03732.

Math. A target weight W gets ΔW = s·B A with A (r, in) and B (out, r); s = α/r, or α/√r with rsLoRA; r and
α per module from ``rank_pattern`` / ``alpha_pattern`` (PEFT's ``get_pattern_key``: a pattern key k matches
module m when m = k or m ends with "." + k, as a regex). GPT-2's ``Conv1D`` stores W as (in, out) and
embeddings as (num_embeddings, dim): both take ΔW = s·(B A)ᵀ (PEFT's ``fan_in_fan_out`` and
``lora_embedding_A/B``), i.e. a ``LowRank(transposed=True)``.

Storage (FORMAT.md §adapters): native tensors under PEFT's names without the ``base_model.model.`` prefix
(``<module>.lora_A.weight``, ``<module>.lora_embedding_B``), each encoded with any codec; the manifest's
``adapter.config`` keeps the original ``adapter_config.json`` (``peft_config``) and, per module, its layer
kind, r, α and scale (``modules``), so loading needs no pattern matching. ``modules_to_save`` tensors (a
classifier head) are ordinary ``replace`` entries, stored dense.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltahub.adapter import AdapterKind, Imported, Target
from deltahub.errors import CheckpointError, ManifestError, UnsupportedAdapterError
from deltahub.kernels.layouts import LowRank

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_SUFFIXES = {".lora_A.weight": ("A", None), ".lora_B.weight": ("B", None),
             ".lora_embedding_A": ("A", "embedding"), ".lora_embedding_B": ("B", "embedding")}
_NEXT = "merge it with PEFT (`merge_and_unload()`) and compress the merged model instead; nothing was written."
# options that change the math of a saved adapter, with the value that means "off"
_UNSUPPORTED = {
    "use_dora": (False, "DoRA"),
    "lora_bias": (False, "LoRA biases"),
    "layer_replication": (None, "layer replication"),
    "trainable_token_indices": (None, "trainable tokens"),
    "target_parameters": (None, "LoRA on parameters"),
    "use_qalora": (False, "QA-LoRA"),
    "use_bdlora": (None, "BD-LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA"),
    "megatron_config": (None, "Megatron layers"),
    "bias": ("none", "trained biases"),
}


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern k with module == k or module ending in "." + k (regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_scale(module: str, r: int, peft: Mapping[str, Any]) -> tuple[float, float]:
    """(α, scale) of one module under a PEFT config."""
    alpha_key = pattern_key(peft.get("alpha_pattern") or {}, module)
    alpha = float((peft.get("alpha_pattern") or {})[alpha_key]) if alpha_key else float(peft.get("lora_alpha", 8))
    return alpha, alpha / math.sqrt(r) if peft.get("use_rslora") else alpha / r


def _check_config(peft: Mapping[str, Any], where: Path) -> None:
    kind = peft.get("peft_type")
    if kind != "LORA":
        raise UnsupportedAdapterError(f"The PEFT adapter at {where} is of type {kind} (peft_type), which deltahub "
                                      f"does not import yet (LoRA only); {_NEXT}")
    for key, (off, what) in _UNSUPPORTED.items():
        value = peft.get(key, off)
        if value not in (off, None, False, {}, []):
            raise UnsupportedAdapterError(f"The PEFT adapter at {where} uses {what} ({key}: {json.dumps(value)}), "
                                          f"which deltahub does not support yet; {_NEXT}")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in folder.glob("adapter_model.*")]
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}" + (f" (only {', '.join(pickled)}; deltahub never "
                              "loads pickle)" if pickled else "") + ": save the adapter with safe_serialization=True.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); save the adapter again.") from None


class LoraAdapter(AdapterKind):
    name = "lora"
    version = 1
    pretty_name = "LoRA (low-rank adapters; PEFT folders)"
    reference_url = "https://arxiv.org/abs/2106.09685"

    # ------------------------------------------------------------------------------------ PEFT folders
    def read_folder(self, path: Path) -> Imported | None:
        cfg = Path(path) / CONFIG_NAME
        if not Path(path).is_dir() or not cfg.is_file():
            return None
        try:
            peft = json.loads(cfg.read_text())
        except ValueError:
            raise CheckpointError(f"{cfg} is not valid JSON; save the adapter again.") from None
        if not isinstance(peft, dict):
            raise CheckpointError(f"{cfg} is not a PEFT adapter config (a JSON object).")
        _check_config(peft, Path(path))
        tensors = _read_tensors(Path(path))
        native, whole = {}, {}
        for key, t in tensors.items():
            if any(key.endswith(s) for s in _SUFFIXES):
                native[key] = t
            elif any(key == m or key.startswith(m + ".") or f".{m}." in f".{key}" for m in peft.get("modules_to_save")
                     or []):
                whole[key] = t
            else:
                raise UnsupportedAdapterError(f"The PEFT adapter at {path} holds tensor {key!r}, which is no LoRA "
                                              f"factor and not in modules_to_save; {_NEXT}")
        config = {"peft_config": peft, "modules": self._modules(native, peft, Path(path))}
        return Imported(config, native, self.targets(native, config), whole, peft.get("base_model_name_or_path"))

    def _modules(self, native: Mapping[str, torch.Tensor], peft: Mapping[str, Any], where: Path) -> dict[str, Any]:
        modules: dict[str, Any] = {}
        for key, t in native.items():
            suffix = next(s for s in _SUFFIXES if key.endswith(s))
            module = key[:-len(suffix)]
            role, layer = _SUFFIXES[suffix]
            if t.dim() != 2:
                raise CheckpointError(f"{where}: LoRA factor {key!r} has shape {list(t.shape)}, not a matrix.")
            entry = modules.setdefault(module, {"layer": layer or ("conv1d" if peft.get("fan_in_fan_out") else
                                                                  "linear")})
            entry[role] = list(t.shape)
        for module, entry in modules.items():
            if "A" not in entry or "B" not in entry or entry["A"][0] != entry["B"][1]:
                raise CheckpointError(f"{where}: module {module!r} lacks a lora_A/lora_B pair of one rank.")
            r = entry["A"][0]
            rank_key = pattern_key(peft.get("rank_pattern") or {}, module)
            want = (peft.get("rank_pattern") or {}).get(rank_key, peft.get("r", r)) if rank_key else peft.get("r", r)
            if want != r:
                raise CheckpointError(f"{where}: module {module!r} has rank {r} in {WEIGHTS_NAME} but {want} in "
                                      f"{CONFIG_NAME}; save the adapter again.")
            entry["r"] = r
            entry["alpha"], entry["scale"] = module_scale(module, r, peft)
            del entry["A"], entry["B"]
        return dict(sorted(modules.items()))

    def write_folder(self, out: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                     whole: Mapping[str, torch.Tensor]) -> None:
        (out / CONFIG_NAME).write_text(json.dumps(config["peft_config"], indent=2, sort_keys=True) + "\n")
        state = {PREFIX + k: v.contiguous() for k, v in {**tensors, **whole}.items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})

    # ------------------------------------------------------------------------------------ serving
    def targets(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[Target]:
        out = []
        for module, m in config["modules"].items():
            keys = factor_keys(module, m)
            if not all(k in tensors for k in keys):
                raise ManifestError(f"LoRA module {module!r} lacks its factors {keys}; the artifact is corrupt.")
            A, B = tensors[keys[0]], tensors[keys[1]]
            shape = (B.shape[0], A.shape[1]) if m["layer"] == "linear" else (A.shape[1], B.shape[0])
            out.append(Target(module + ".weight", tuple(shape), keys))
        return out

    def materialize(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, LowRank]:
        res = {}
        for target in self.targets(tensors, config):
            m = config["modules"][target.weight.removesuffix(".weight")]
            A, B = (tensors[k] for k in target.tensors)
            res[target.weight] = LowRank(A.contiguous(), B.contiguous(), float(m["scale"]), target.shape,
                                         transposed=m["layer"] != "linear")
        return res

    # ------------------------------------------------------------------------------------ training
    def inject(self, model: torch.nn.Module, config: Mapping[str, Any]) -> list[torch.nn.Parameter]:
        """Wrap the ``target_modules`` (names or suffixes, or one regex) in :class:`LoraLayer` (PEFT's naming).

        Config: ``r`` (8), ``lora_alpha`` (16), ``target_modules`` (required), ``use_rslora`` (False).
        """
        from deltahub.adapters.lora_layers import inject_lora

        return inject_lora(model, config)

    def native_tensors(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from deltahub.adapters.lora_layers import collect_lora

        return collect_lora(model)


def factor_keys(module: str, m: Mapping[str, Any]) -> tuple[str, str]:
    """The names of a module's (A, B) factors."""
    if m["layer"] == "embedding":
        return module + ".lora_embedding_A", module + ".lora_embedding_B"
    return module + ".lora_A.weight", module + ".lora_B.weight"
