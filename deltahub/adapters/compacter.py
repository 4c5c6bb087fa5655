"""``compacter``: bottleneck adapters of parameterized hypercomplex (PHM) layers with one shared rule.

Karimi Mahabadi, Henderson, Ruder. *Compacter: Efficient Low-Rank Hypercomplex Adapter Layers* (NeurIPS 2021),
https://arxiv.org/abs/2106.04647; code rabeehk/compacter, ``seq2seq/hypercomplex/layers.py`` (research/codecs.md §5).

Math. A PHM layer in → out (n divides both) has the weight H = Σ_{i=1..n} A_i ⊗ B_i ∈ R^{in×out} and computes
y = x H + b. The rule A ∈ R^{n×n×n} is ONE tensor shared by every PHM layer of the model (stored once, every
layer references it); B_i = s_i t_iᵀ is rank 1 (s ∈ R^{n×in/n×1}, t ∈ R^{n×1×out/n}). The adapter after a
module's output h is h + up(GELU_tanh(down(h))) with down: d → d/reduction and up back. Placement: after the
``target_modules`` outputs — the FFN output (``output.dense`` in BERT) for Compacter++, also the attention output
(``attention.output.dense``) for Compacter. Init: s, t Glorot-uniform (gain √2), the rule normal with σ = 0.01
(the reference's N(0, 1e-4) read as a variance), biases zero.

It is not a weight delta (the GELU): it materializes as an ``nn.Module`` to attach (``deltahub.attach``), which
the ExpertPool runs on the routed rows' module output (``pool.route``); ``apply`` and ``pool.activate`` refuse
it with :class:`~deltahub.errors.NotMergeableError`.

Storage (native): ``compacter.rule`` (n, n, n) once; per module ``<module>.compacter.{down,up}_{s,t,b}``.
``adapter.config``: n, reduction and per module its width d.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deltahub.adapter import AdapterKind, Target
from deltahub.adapters.injection import Attached, find_targets, swap
from deltahub.errors import CodecConfigError, ManifestError

RULE = "compacter.rule"


def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """H = Σ_i A_i ⊗ (s_i t_iᵀ), (in, out)."""
    b = s @ t  # (n, in/n, out/n)
    n, p, q = b.shape
    return torch.einsum("iab,ipq->apbq", rule, b).reshape(n * p, n * q)


class PhmAdapter(nn.Module):
    """h + up(GELU(down(h))), down and up PHM layers on a (referenced, not owned) shared rule."""

    def __init__(self, d: int, hidden: int, n: int, rule: nn.Parameter | torch.Tensor, *, dtype: Any = None):
        super().__init__()
        object.__setattr__(self, "_rule", rule)  # shared: owned once by the model (or by the loaded artifact)
        for side, (i, o) in (("down", (d, hidden)), ("up", (hidden, d))):
            s = nn.Parameter(torch.empty(n, i // n, 1, dtype=dtype))
            t = nn.Parameter(torch.empty(n, 1, o // n, dtype=dtype))
            nn.init.xavier_uniform_(s, gain=math.sqrt(2))
            nn.init.xavier_uniform_(t, gain=math.sqrt(2))
            setattr(self, f"{side}_s", s)
            setattr(self, f"{side}_t", t)
            setattr(self, f"{side}_b", nn.Parameter(torch.zeros(o, dtype=dtype)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = h @ phm_weight(self._rule, self.down_s, self.down_t) + self.down_b
        z = nn.functional.gelu(z, approximate="tanh")  # the reference's gelu_new
        return h + z @ phm_weight(self._rule, self.up_s, self.up_t) + self.up_b


def inject_compacter(model: nn.Module, config: Mapping[str, Any]) -> list[nn.Parameter]:
    """Put a PHM adapter after each targeted ``nn.Linear``'s output; returns the rule and the adapters' tensors.

    Config: ``target_modules`` (required; BERT Compacter++: ``["output.dense"]`` minus attention, Compacter:
    also ``attention.output.dense``), ``n`` (4), ``reduction`` (32).

    Raises:
        CodecConfigError: no target, or a width not divisible by n (or its bottleneck).
    """
    n, reduction = int(config.get("n", 4)), int(config.get("reduction", 32))
    if config.get("bits") is not None:
        raise CodecConfigError("Compacter has no quantization-aware mode yet; drop bits (store it with any codec).")
    found = find_targets(model, config.get("target_modules"), lambda m: isinstance(m, nn.Linear), "Linear",
                         "Compacter")
    w = found[0][1].weight
    rule = nn.Parameter(torch.randn(n, n, n, dtype=w.dtype) * 0.01)
    holder = nn.Module()
    holder.rule = rule
    model.add_module("compacter", holder)  # the rule's one owner: state-dict key compacter.rule
    params: list[nn.Parameter] = [rule]
    for name, m in found:
        d = m.out_features
        hidden = max(n, (d // reduction) // n * n)
        if d % n:
            raise CodecConfigError(f"Compacter's n={n} must divide {name}'s width {d}; pick another n.")
        adapter = PhmAdapter(d, hidden, n, rule, dtype=w.dtype)
        swap(model, name, Attached(m, adapter))
        params += list(adapter.parameters())
    model._compacter_config = {"n": n, "reduction": reduction}
    return params


class CompacterAdapter(AdapterKind):
    name = "compacter"
    version = 1
    pretty_name = "Compacter (PHM bottleneck adapters)"
    reference_url = "https://arxiv.org/abs/2106.04647"

    def inject(self, model: nn.Module, config: Mapping[str, Any]) -> list[nn.Parameter]:
        return inject_compacter(model, config)

    def native_tensors(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {RULE: model.compacter.rule.detach().clone()}
        modules = {}
        for name, m in model.named_modules():
            if isinstance(m, Attached) and isinstance(m.compacter, PhmAdapter):
                for k, v in m.compacter.named_parameters():
                    tensors[f"{name}.compacter.{k}"] = v.detach().clone()
                modules[name] = {"d": m.base_layer.out_features, "shape": list(m.base_layer.weight.shape)}
        return tensors, {**getattr(model, "_compacter_config", {}), "modules": dict(sorted(modules.items()))}

    def targets(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[Target]:
        out = []
        for module, m in config["modules"].items():
            keys = tuple(f"{module}.compacter.{side}_{x}" for side in ("down", "up") for x in "stb") + (RULE,)
            if not all(k in tensors for k in keys):
                raise ManifestError(f"Compacter module {module!r} lacks {keys}; the artifact is corrupt.")
            out.append(Target(module + ".weight", tuple(m["shape"]), keys))
        return out

    def materialize(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, nn.Module]:
        """Per target, a :class:`PhmAdapter` to attach after that module (all sharing one rule tensor)."""
        rule = tensors[RULE].float()
        n = int(config.get("n", rule.shape[0]))
        res = {}
        for t in self.targets(tensors, config):
            module = t.weight.removesuffix(".weight")
            d, hidden = int(config["modules"][module]["d"]), tensors[f"{module}.compacter.down_b"].numel()
            if rule.shape != (n, n, n) or d % n or hidden % n:
                raise ManifestError(f"Compacter module {module!r}: widths {d}/{hidden} do not fit n={n}; the "
                                    "artifact is corrupt.")
            adapter = PhmAdapter(d, hidden, n, rule)
            with torch.no_grad():
                for k, v in adapter.named_parameters():
                    src = tensors[f"{module}.compacter.{k}"]
                    if tuple(src.shape) != tuple(v.shape):
                        raise ManifestError(f"Compacter tensor {module}.compacter.{k} has shape {list(src.shape)}, "
                                            f"expected {list(v.shape)}; the artifact is corrupt.")
                    v.copy_(src)
            res[t.weight] = adapter.requires_grad_(False).eval()
        return res
