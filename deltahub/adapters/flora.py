"""``flora``: a Tucker core and one factor per mode of the true weight shape (linear and convolution weights).

Si et al. *FLoRA: Low-Rank Core Space for N-dimension* (2024), https://arxiv.org/abs/2405.14739; code
SJTU-DeepVisionLab/FLoRA, ``flora/layers.py`` (research/codecs.md §6).

Math. A weight with modes (d_0 = in, d_1 = out, d_2 … = kernel dims), taken from its *true* shape
(out, in/groups, k_h, k_w) — so grouped and depthwise convolutions work, where the reference code uses
``in_channels`` — gets factors U_k ∈ R^{d_k×r_k} and a core G ∈ R^{r_0×…×r_{N−1}}:

    ΔW[o, i, h, w] = s · Σ G[a, b, c, d] · U_0[i, a] · U_1[o, b] · U_2[h, c] · U_3[w, d],

and for a linear weight (N = 2) ΔW = s · U_1 Gᵀ U_0ᵀ: LoRA with A = U_0ᵀ (r_0 × in) and B = U_1 Gᵀ
(out × r_0), which is its resident ``LowRank`` and its PEFT export. Init as the paper: G = 0 (so ΔW = 0),
factors Kaiming-normal (a = √3). s is stored explicitly (the vision and NLP code disagree on α/r).

Storage (native): ``<module>.flora_core`` and ``<module>.flora_U<k>``; ``adapter.config`` keeps per module the
layer kind, weight shape, ranks and s. Convolution targets materialize as a ``Dense`` ΔW of the weight shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deltahub.adapter import AdapterKind, Target
from deltahub.adapters.injection import find_targets, swap
from deltahub.errors import CodecConfigError, ManifestError
from deltahub.kernels.layouts import Dense, LowRank


def tucker_delta(core: torch.Tensor, factors: list[torch.Tensor], scale: float) -> torch.Tensor:
    """s·(G ×_0 U_0 ×_1 U_1 …) in the weight layout (out, in, k…): modes 0 and 1 swapped back."""
    t = core
    for u in factors:  # each step contracts the leading rank axis and appends the mode's full axis
        t = torch.tensordot(t, u, dims=([0], [1]))
    return scale * t.transpose(0, 1)


class FloraLayer(nn.Module):
    """base(x) + the Tucker ΔW applied with the base's own linear or convolution settings."""

    def __init__(self, base: nn.Module, ranks: list[int], scale: float, bits: int | None = None):
        super().__init__()
        w = base.weight
        self.base_layer, self.scale, self.bits = base, float(scale), bits
        self.kind = "linear" if isinstance(base, nn.Linear) else "conv2d"
        dims = [w.shape[1], w.shape[0], *w.shape[2:]]  # (in, out, k…) of the TRUE weight shape (in/groups)
        if len(ranks) != len(dims):
            raise CodecConfigError(f"FLoRA needs {len(dims)} ranks for a {list(w.shape)} weight, got {ranks}.")
        self.flora_core = nn.Parameter(torch.zeros(*ranks, dtype=w.dtype, device=w.device))
        for k, (d, r) in enumerate(zip(dims, ranks)):
            u = nn.Parameter(torch.empty(d, r, dtype=w.dtype, device=w.device))
            nn.init.kaiming_normal_(u, a=math.sqrt(3))
            setattr(self, f"flora_U{k}", u)
        self.ranks = list(ranks)

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"flora_U{k}") for k in range(len(self.ranks))]

    def delta(self) -> torch.Tensor:
        core, us = self.flora_core, self.factors()
        if self.bits is not None:
            from deltahub.adapters.quant import quantized

            core, us = quantized(core, self.bits), [quantized(u, self.bits) for u in us]
        return tucker_delta(core, us, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if self.kind == "linear":
            return b(x) + nn.functional.linear(x, self.delta())
        return b(x) + nn.functional.conv2d(x, self.delta(), None, b.stride, b.padding, b.dilation, b.groups)


def _ranks(config: Mapping[str, Any], module: nn.Module) -> list[int]:
    r = config.get("r", 8)
    n = module.weight.dim()
    ranks = [int(x) for x in r] if isinstance(r, (list, tuple)) else [int(r)] * 2 + [min(int(r), 2)] * (n - 2)
    dims = [module.weight.shape[1], module.weight.shape[0], *module.weight.shape[2:]]
    return [min(rk, d) for rk, d in zip(ranks, dims)] if len(ranks) == n else ranks


def inject_flora(model: nn.Module, config: Mapping[str, Any]) -> list[nn.Parameter]:
    """Wrap the targeted ``nn.Linear`` / ``nn.Conv2d`` layers; returns cores and factors.

    Config: ``target_modules`` (required), ``r`` (8, or one rank per mode: [in, out, k_h, k_w]; kernel modes
    default to 2), ``scale`` (1.0), ``bits`` (QAT, :mod:`deltahub.adapters.quant`).

    Raises:
        CodecConfigError: no target, or ranks that do not fit the weight.
    """
    from deltahub.adapters.quant import check_bits

    bits = check_bits(config.get("bits"))
    found = find_targets(model, config.get("target_modules"), lambda m: isinstance(m, (nn.Linear, nn.Conv2d)),
                         "Linear or Conv2d", "FLoRA")
    params: list[nn.Parameter] = []
    for name, module in found:
        layer = FloraLayer(module, _ranks(config, module), float(config.get("scale", 1.0)), bits)
        swap(model, name, layer)
        params += [layer.flora_core, *layer.factors()]
    return params


class FloraAdapter(AdapterKind):
    name = "flora"
    version = 1
    pretty_name = "FLoRA (Tucker core per weight)"
    reference_url = "https://arxiv.org/abs/2405.14739"

    def inject(self, model: nn.Module, config: Mapping[str, Any]) -> list[nn.Parameter]:
        return inject_flora(model, config)

    def native_tensors(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, Any] = {}
        for name, m in model.named_modules():
            if isinstance(m, FloraLayer):
                tensors[f"{name}.flora_core"] = m.flora_core.detach().clone()
                for k, u in enumerate(m.factors()):
                    tensors[f"{name}.flora_U{k}"] = u.detach().clone()
                modules[name] = {"layer": m.kind, "shape": list(m.base_layer.weight.shape), "ranks": m.ranks,
                                 "scale": m.scale}
        return tensors, {"modules": dict(sorted(modules.items()))}

    def targets(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[Target]:
        out = []
        for module, m in config["modules"].items():
            keys = (f"{module}.flora_core", *(f"{module}.flora_U{k}" for k in range(len(m["ranks"]))))
            if not all(k in tensors for k in keys):
                raise ManifestError(f"FLoRA module {module!r} lacks its core or factors {keys}; the artifact is corrupt.")
            out.append(Target(module + ".weight", tuple(m["shape"]), keys))
        return out

    def materialize(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for t in self.targets(tensors, config):
            m = config["modules"][t.weight.removesuffix(".weight")]
            core, *us = (tensors[k].float() for k in t.tensors)
            shape = tuple(m["shape"])
            dims = [shape[1], shape[0], *shape[2:]]
            if tuple(core.shape) != tuple(m["ranks"]) or [tuple(u.shape) for u in us] != list(zip(dims, m["ranks"])):
                raise ManifestError(f"FLoRA module {t.weight!r}: core/factor shapes do not fit {list(shape)}; the "
                                    "artifact is corrupt.")
            if len(shape) == 2:  # ΔW = s·U_1 Gᵀ U_0ᵀ: LoRA with A = U_0ᵀ, B = U_1 Gᵀ
                res[t.weight] = LowRank(us[0].T.contiguous(), (us[1] @ core.T).contiguous(), float(m["scale"]), shape)
            else:
                res[t.weight] = Dense(tucker_delta(core, us, float(m["scale"])).contiguous())
        return res
