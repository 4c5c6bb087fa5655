"""``mos``: Mixture of Shards, LoRA factors assembled from global shard pools.

Wang et al. *MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards* (ICLR 2025),
https://arxiv.org/abs/2410.00938; code Forence1999/MoS, ``modules/Tied_LoRA.py`` (research/codecs.md §4).

Math. Target modules are grouped by *projection type* τ (their last name component and their (out, in)
shape: every layer's ``query`` is one type). Each type owns two pools shared by its L layers,
P_A ∈ R^{N×(d_in/c)} and P_B ∈ R^{N×(d_out/c)}, N = v·L·c shards (v: the equivalent rank, c: shards per
vector). Rows [0, (v−p)Lc) are public (inter-layer sharing); rows (v−p)Lc + [ℓpc, (ℓ+1)pc) are private to
layer ℓ (shard privatization). Layer ℓ draws, independently for A and for B (pair dissociation), the index
list I = (randperm((v−p)Lc)[:(r−p)c], private_ℓ) of length r·c, once, at injection. Then

    A_ℓ = P_A[I_A].reshape(r, d_in),   B_ℓ = P_B[I_B].reshape(r, d_out)ᵀ,   ΔW_ℓ = (α/r)·B_ℓ A_ℓ,

so the last p rank vectors of a layer are private and the other r − p are each c public shards. With c = 1
and p = v = r, A_ℓ = P_A[ℓr:(ℓ+1)r]: plain LoRA (a test). Init as LoRA: P_A Kaiming-uniform (a = √5, fan
d_in), P_B zero, so ΔW = 0. Trainable parameters: v·L·(d_in + d_out) per type, LoRA's at rank v.

Storage (native, never the dense per-layer factors): the pools ``mos_pools.<type>.pool_A|pool_B`` and, per
module, ``<module>.mos_index_A|mos_index_B`` (int32, stored exactly whatever the codec: indices are never
re-derived from an RNG at load). The manifest's ``adapter.config`` keeps per type (N, c, v, p, shapes) and per
module (type, layer, r, α, scale). Resident form: ``LowRank`` per target, so the ExpertPool and ``apply``
treat it as LoRA.
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
from deltahub.kernels.layouts import LowRank

POOLS = "mos_pools"


class MosLayer(nn.Module):
    """base(x) + (α/r)·B A x with A, B gathered from the shared pools of ``pools`` by fixed indices."""

    def __init__(self, base: nn.Linear, pools: nn.Module, tau: str, idx_a: torch.Tensor, idx_b: torch.Tensor,
                 r: int, alpha: float, bits: int | None = None):
        super().__init__()
        self.bits = bits
        self.base_layer, self.tau, self.r, self.alpha, self.scaling = base, tau, r, float(alpha), float(alpha) / r
        object.__setattr__(self, "_pools", pools)  # not a child: the pools are owned (and saved) once, at the root
        self.register_buffer("mos_index_A", idx_a)
        self.register_buffer("mos_index_B", idx_b)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self._pools[self.tau]
        pa, pb = pool.pool_A, pool.pool_B
        if self.bits is not None:  # QAT: the pools as a b-bit artifact stores them (deltahub.adapters.quant)
            from deltahub.adapters.quant import quantized

            pa, pb = quantized(pa, self.bits), quantized(pb, self.bits)
        return assemble(pa, pb, self.mos_index_A, self.mos_index_B, self.r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return self.base_layer(x) + (x @ a.T) @ b.T * self.scaling


def assemble(pool_a: torch.Tensor, pool_b: torch.Tensor, idx_a: torch.Tensor, idx_b: torch.Tensor,
             r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) of one layer from its pools and shard indices (the module docstring)."""
    a = pool_a[idx_a.long()].reshape(r, -1)
    b = pool_b[idx_b.long()].reshape(r, -1).T
    return a, b


def _draw(gen: torch.Generator, public: int, take: int, private: range) -> torch.Tensor:
    picked = torch.randperm(public, generator=gen)[:take] if take else torch.empty(0, dtype=torch.int64)
    return torch.cat([picked, torch.tensor(list(private), dtype=torch.int64)]).to(torch.int32)


def inject_mos(model: nn.Module, config: Mapping[str, Any]) -> list[nn.Parameter]:
    """Wrap the targeted ``nn.Linear`` layers in :class:`MosLayer`; returns the pools (the only trainable tensors).

    Config: ``target_modules`` (required), ``r`` (8), ``v`` (2), ``p`` (1), ``c`` (2), ``lora_alpha`` (16),
    ``seed`` (0).

    Raises:
        CodecConfigError: no targets, a shape not divisible by c, or r − p > (v − p)·L.
    """
    r, v, p, c = (int(config.get(k, d)) for k, d in (("r", 8), ("v", 2), ("p", 1), ("c", 2)))
    alpha = float(config.get("lora_alpha", 16))
    from deltahub.adapters.quant import check_bits

    bits = check_bits(config.get("bits"))
    if not (0 <= p <= v <= r and c >= 1):
        raise CodecConfigError(f"MoS needs 0 <= p <= v <= r and c >= 1, got r={r} v={v} p={p} c={c}.")
    found = find_targets(model, config.get("target_modules"), lambda m: isinstance(m, nn.Linear), "Linear", "MoS")
    groups: dict[str, list[tuple[str, nn.Linear]]] = {}
    for name, m in found:
        if m.in_features % c or m.out_features % c:
            raise CodecConfigError(f"MoS shards vectors into c={c} pieces: {name} is {m.out_features}x"
                                   f"{m.in_features}, not divisible; pick c dividing both.")
        groups.setdefault(f"{name.rpartition('.')[2]}_{m.out_features}x{m.in_features}", []).append((name, m))
    pools, gen = nn.ModuleDict(), torch.Generator().manual_seed(int(config.get("seed", 0)))
    for tau, members in groups.items():
        L, w = len(members), members[0][1].weight
        if r - p > (v - p) * L:
            raise CodecConfigError(f"MoS type {tau}: r - p = {r - p} public vectors exceed the (v - p)·L = "
                                   f"{(v - p) * L} public shards per position; raise v or lower r.")
        pool = nn.Module()
        n = v * L * c
        pool.pool_A = nn.Parameter(torch.empty(n, w.shape[1] // c, dtype=w.dtype, device=w.device))
        pool.pool_B = nn.Parameter(torch.zeros(n, w.shape[0] // c, dtype=w.dtype, device=w.device))
        bound = 1 / math.sqrt(w.shape[1])  # kaiming_uniform(a=√5) with the fan of the whole vector, d_in
        nn.init.uniform_(pool.pool_A, -bound, bound)
        pools[tau] = pool
        public = (v - p) * L * c
        for layer, (name, m) in enumerate(members):
            private = range(public + layer * p * c, public + (layer + 1) * p * c)
            ia, ib = (_draw(gen, public, (r - p) * c, private) for _ in range(2))
            swap(model, name, MosLayer(m, pools, tau, ia, ib, r, alpha, bits))
    model.add_module(POOLS, pools)
    model._mos_config = {"r": r, "v": v, "p": p, "c": c, "lora_alpha": alpha, "seed": int(config.get("seed", 0))}
    return [q for pool in pools.values() for q in (pool.pool_A, pool.pool_B)]


def collect_mos(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(native tensors, adapter config) of an injected model, named as its state dict names them."""
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, Any] = {}
    for tau, pool in getattr(model, POOLS).items():
        tensors[f"{POOLS}.{tau}.pool_A"] = pool.pool_A.detach().clone()
        tensors[f"{POOLS}.{tau}.pool_B"] = pool.pool_B.detach().clone()
    modules: dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, MosLayer):
            tensors[f"{name}.mos_index_A"], tensors[f"{name}.mos_index_B"] = m.mos_index_A.clone(), m.mos_index_B.clone()
            w = m.base_layer.weight
            modules[name] = {"type": m.tau, "r": m.r, "alpha": m.alpha, "scale": m.scaling,
                             "shape": [w.shape[0], w.shape[1]]}
            types.setdefault(m.tau, {"layers": 0})["layers"] += 1
    return tensors, {**getattr(model, "_mos_config", {}), "types": types, "modules": dict(sorted(modules.items()))}


class MosAdapter(AdapterKind):
    name = "mos"
    version = 1
    pretty_name = "MoS (Mixture of Shards)"
    reference_url = "https://arxiv.org/abs/2410.00938"

    def inject(self, model: nn.Module, config: Mapping[str, Any]) -> list[nn.Parameter]:
        return inject_mos(model, config)

    def native_tensors(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return collect_mos(model)

    def targets(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[Target]:
        out = []
        for module, m in config["modules"].items():
            # the module's own indices first: an artifact binds a target to its base weight through tensors[0]
            keys = (f"{module}.mos_index_A", f"{module}.mos_index_B", f"{POOLS}.{m['type']}.pool_A",
                    f"{POOLS}.{m['type']}.pool_B")
            if not all(k in tensors for k in keys):
                raise ManifestError(f"MoS module {module!r} lacks its pools or indices {keys}; the artifact is corrupt.")
            out.append(Target(module + ".weight", tuple(m["shape"]), keys))
        return out

    def materialize(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, LowRank]:
        res = {}
        for t in self.targets(tensors, config):
            m = config["modules"][t.weight.removesuffix(".weight")]
            ia, ib, pool_a, pool_b = (tensors[k] for k in t.tensors)
            n = pool_a.shape[0]
            if ia.numel() != m["r"] * _c(pool_a, m) or int(ia.max()) >= n or int(ib.max()) >= n or int(ia.min()) < 0 \
                    or int(ib.min()) < 0:
                raise ManifestError(f"MoS module {t.weight!r} has shard indices outside its pool of {n}; the "
                                    "artifact is corrupt.")
            a, b = assemble(pool_a, pool_b, ia, ib, int(m["r"]))
            if tuple(b.shape[:1]) + tuple(a.shape[1:]) != t.shape:
                raise ManifestError(f"MoS module {t.weight!r} assembles to {[b.shape[0], a.shape[1]]}, not "
                                    f"{list(t.shape)}; the artifact is corrupt.")
            res[t.weight] = LowRank(a.contiguous(), b.contiguous(), float(m["scale"]), t.shape)
        return res


def _c(pool_a: torch.Tensor, m: Mapping[str, Any]) -> int:
    """Shards per vector, from the pool width and the weight's d_in."""
    return max(1, int(m["shape"][1]) // max(1, pool_a.shape[1]))
