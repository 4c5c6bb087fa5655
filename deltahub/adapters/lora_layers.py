"""LoRA modules for training inside deltahub (no PEFT needed), named as PEFT names them.

``LoraLayer`` wraps a base ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding``: the base module moves to
``base_layer`` and the factors are ``lora_A`` / ``lora_B`` (``nn.Linear`` without bias, so state-dict keys
read ``<module>.lora_A.weight``) or ``lora_embedding_A`` / ``lora_embedding_B``, exactly PEFT's keys. A is
initialised as PEFT does (Kaiming-uniform, a = √5; normal for embeddings), B is zero, so the wrapped model
starts equal to the base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deltahub.adapters.injection import find_targets, swap


def _layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return "conv1d"  # transformers' GPT-2 Conv1D: weight (in, out), y = x W + b
    return None


class LoraLayer(nn.Module):
    """base(x) + s·B A applied to x (x Aᵀ Bᵀ for linear layers, A's columns looked up for embeddings)."""

    def __init__(self, base: nn.Module, kind: str, r: int, alpha: float, rslora: bool = False,
                 bits: int | None = None):
        super().__init__()
        self.base_layer, self.kind, self.r, self.bits = base, kind, r, bits
        self.alpha = float(alpha)
        self.scaling = self.alpha / math.sqrt(r) if rslora else self.alpha / r
        w = base.weight
        if kind == "embedding":
            n_in, n_out = w.shape
            self.lora_embedding_A = nn.Parameter(torch.zeros(r, n_in, dtype=w.dtype, device=w.device))
            self.lora_embedding_B = nn.Parameter(torch.zeros(n_out, r, dtype=w.dtype, device=w.device))
            nn.init.normal_(self.lora_embedding_A)
        else:
            n_in, n_out = (w.shape[1], w.shape[0]) if kind == "linear" else (w.shape[0], w.shape[1])
            self.lora_A = nn.Linear(n_in, r, bias=False, dtype=w.dtype, device=w.device)
            self.lora_B = nn.Linear(r, n_out, bias=False, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "embedding":
            return self.lora_embedding_A, self.lora_embedding_B
        return self.lora_A.weight, self.lora_B.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        a, b = self.factors()
        if self.bits is not None:  # QAT: the forward the stored b-bit adapter will compute
            from deltahub.adapters.quant import quantized

            a, b = quantized(a, self.bits), quantized(b, self.bits)
        if self.kind == "embedding":
            return y + (nn.functional.embedding(x, a.T) @ b.T) * self.scaling
        return y + (x @ a.T) @ b.T * self.scaling


def inject_lora(model: nn.Module, config: Mapping[str, Any]) -> list[nn.Parameter]:
    """Replace every targeted layer of ``model`` by a ``LoraLayer``; freeze the rest; return the new parameters.

    Raises:
        CodecConfigError: no target_modules, or none of them names a Linear, Conv1D or Embedding layer.
    """
    from deltahub.adapters.quant import check_bits

    r, alpha, rslora = int(config.get("r", 8)), float(config.get("lora_alpha", 16)), bool(config.get("use_rslora"))
    bits = check_bits(config.get("bits"))
    found = find_targets(model, config.get("target_modules"), _layer_kind, "Linear, Conv1D or Embedding", "LoRA")
    params: list[nn.Parameter] = []
    for name, module in found:
        layer = LoraLayer(module, _layer_kind(module), r, alpha, rslora, bits)
        swap(model, name, layer)
        params += list(layer.factors())
    return params


def collect_lora(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(native tensors, adapter config) of the LoraLayers in ``model``, with a PEFT config for export."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            A, B = (t.detach().clone() for t in m.factors())
            suffix = (".lora_embedding_A", ".lora_embedding_B") if m.kind == "embedding" else (".lora_A.weight",
                                                                                            ".lora_B.weight")
            tensors[name + suffix[0]], tensors[name + suffix[1]] = A, B
            modules[name] = {"layer": m.kind, "r": m.r, "alpha": m.alpha, "scale": m.scaling}
    return tensors, {"peft_config": peft_config(modules), "modules": dict(sorted(modules.items()))}


def peft_config(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` for LoRA modules ``{name: {layer, r, alpha, scale}}``."""
    ranks = {m["r"] for m in modules.values()}
    r = max(ranks) if ranks else 8
    alpha = next((m["alpha"] for m in modules.values() if m["r"] == r), 16.0)
    peft = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
            "rank_pattern": {k: m["r"] for k, m in modules.items() if m["r"] != r},
            "alpha_pattern": {k: m["alpha"] for k, m in modules.items() if m["alpha"] != alpha},
            "use_rslora": any(abs(m["scale"] - m["alpha"] / m["r"]) > 1e-12 for m in modules.values()),
            "fan_in_fan_out": any(m["layer"] == "conv1d" for m in modules.values()), "bias": "none",
            "modules_to_save": None, "base_model_name_or_path": None, "inference_mode": True, "lora_dropout": 0.0,
            "task_type": None}
    return peft
