"""``compeft``: sparse ternary task deltas.

Yadav, Choshen, Raffel, Bansal. *ComPEFT: Compression for Communicating Parameter Efficient Updates
via Sparsification and Quantization* (2023), https://arxiv.org/abs/2311.13171.

Math (research/codecs.md §1). For a delta τ of N elements and density d, keep the K = max(1, ⌊d·N⌋)
entries of largest magnitude (threshold t = the K-th largest |τ|; ties keep extra entries), and store
only their signs: τ̂ = s · sign(τ) ⊙ m with m = [|τ| ≥ t]. The scale s is

- ``scale=auto`` (default): mean |τ_i| over the kept support, the L2-optimal scale for that support;
- ``scale=α`` (a number): α·σ with σ the unbiased std of the dense, unpruned τ, as in the paper.

``mode=global`` is paper parity: one σ and one threshold over all encoded tensors of the model (sorted
by name, as the authors flatten them). ``mode=per_tensor`` computes both per tensor.

Storage: positions as Golomb-Rice coded gaps (quotient and remainder streams kept apart so decoding
vectorises) plus one sign bit per kept entry and one fp32 scale: within 1-2% of the entropy bound
H_b(d) + d bits per parameter on random masks (0.569 at d = 0.1, i.e. 28× smaller than fp16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from deltahub.codecs import Codec, CodecConfig, DeltaSource, Encoded
from deltahub.entropy import decode_positions, encode_positions, pack_signs, unpack_signs
from deltahub.kernels.layouts import SparseRows, TernaryMask
from deltahub.kernels.pack import ternary_layout

_HI_SHIFT = 15  # fp32 |τ| bit patterns are monotonic; split them 16 + 15 bits for a two-level histogram


class CompeftConfig(CodecConfig):
    """Options of ``compeft``."""

    density: float = Field(0.1, gt=0, le=1)
    """Fraction of entries kept, in (0, 1]."""
    scale: float | Literal["auto"] = "auto"
    """``auto`` (mean |τ| over the kept entries) or α > 0 for the paper's α·σ."""
    mode: Literal["global", "per_tensor"] = "per_tensor"
    """``global``: one σ and one threshold over the whole model (paper parity); ``per_tensor``."""

    @field_validator("scale")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not v > 0:
            raise ValueError("scale must be 'auto' or a number > 0")
        return v


def _keep_count(n: int, density: float) -> int:
    return min(n, max(1, int(n * density))) if n else 0


def _threshold_exact(absval: torch.Tensor, k: int) -> float:
    """The k-th largest value of a 1-D tensor (k ≥ 1)."""
    return float(torch.topk(absval, k, sorted=False).values.min()) if k < absval.numel() else float(absval.min())


def _global_threshold(deltas: DeltaSource, k: int) -> float:
    """The k-th largest |τ| over the whole model in two streaming histogram passes (exact).

    Non-negative fp32 bit patterns sort like the values, so a 65,536-bin histogram of the high 16 bits
    finds the bin holding the k-th largest, and a 32,768-bin histogram of the low 15 bits inside it
    finds the exact value. Memory stays O(bins), whatever the model size (a 7B model's flattened
    |τ| would be 28 GB; torch.quantile refuses more than 16M elements).
    """
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for _, d in deltas:
        bits = d.float().abs().reshape(-1).view(torch.int32)
        hist += torch.bincount(bits >> _HI_SHIFT, minlength=1 << 16)
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[b] = #values in bins ≥ b
    hi = int(torch.nonzero(above >= k).max())
    k_in_bin = k - (int(above[hi + 1]) if hi + 1 < len(above) else 0)
    low = torch.zeros(1 << _HI_SHIFT, dtype=torch.int64)
    for _, d in deltas:
        bits = d.float().abs().reshape(-1).view(torch.int32)
        sel = bits[(bits >> _HI_SHIFT) == hi]
        low += torch.bincount(sel & ((1 << _HI_SHIFT) - 1), minlength=1 << _HI_SHIFT)
    low_above = torch.flip(torch.cumsum(torch.flip(low, [0]), 0), [0])
    lo = int(torch.nonzero(low_above >= k_in_bin).max())
    return float(torch.tensor([(hi << _HI_SHIFT) | lo], dtype=torch.int32).view(torch.float32))


class CompeftCodec(Codec):
    name = "compeft"
    version = 1
    pretty_name = "ComPEFT (sparse ternary)"
    reference_url = "https://arxiv.org/abs/2311.13171"
    Config = CompeftConfig
    auto_grid = tuple({"density": d} for d in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5))

    def fit(self, deltas: DeltaSource, config: CompeftConfig, *, calibration: Any = None) -> dict[str, Any] | None:
        """Global mode: σ of the whole dense τ (fp64 sums) and the global top-k threshold."""
        if config.mode != "global":
            return None
        n, s1, s2 = 0, 0.0, 0.0
        for _, d in deltas:
            dd = d.double()
            n, s1, s2 = n + d.numel(), s1 + float(dd.sum()), s2 + float((dd * dd).sum())
        if n == 0:
            return {"sigma": 0.0, "threshold": 0.0, "numel": 0}
        sigma = ((s2 - s1 * s1 / n) / max(n - 1, 1)) ** 0.5
        return {"sigma": sigma, "threshold": _global_threshold(deltas, _keep_count(n, config.density)), "numel": n}

    def encode(self, delta: torch.Tensor, config: CompeftConfig, stats: Mapping[str, Any] | None = None, *,
               name: str = "") -> Encoded:
        flat = delta.float().reshape(-1)
        absval = flat.abs()
        if config.mode == "global" and stats:
            threshold, sigma = float(stats["threshold"]), float(stats["sigma"])
        else:
            k = _keep_count(flat.numel(), config.density)
            threshold = _threshold_exact(absval, k) if k else float("inf")
            sigma = float(flat.double().std()) if flat.numel() > 1 else 0.0
        return self._encode_at(flat, absval, threshold, sigma, config)

    def encode_grid(self, delta: torch.Tensor, configs: list[CodecConfig], *, name: str = "") -> list[Encoded]:
        """Per-tensor settings share one multi-pivot selection of |τ| (``np.partition`` with every density's
        rank at once; the k-th largest sits at ascending position n − k), instead of a top-k per density: the
        8 densities of ``auto`` on MiniLM take 0.3 s instead of 1.7 s for a full sort."""
        if any(c.mode == "global" for c in configs) or delta.numel() == 0:
            return super().encode_grid(delta, configs, name=name)
        flat = delta.float().reshape(-1)
        absval = flat.abs()
        n = flat.numel()
        ks = [_keep_count(n, c.density) for c in configs]
        ranked = np.partition(absval.numpy(), sorted({n - k for k in ks}))
        sigma = float(flat.double().std()) if n > 1 else 0.0
        return [self._encode_at(flat, absval, float(ranked[n - k]), sigma, c) for c, k in zip(configs, ks)]

    def _encode_at(self, flat: torch.Tensor, absval: torch.Tensor, threshold: float, sigma: float,
                   config: CompeftConfig) -> Encoded:
        # a zero threshold would keep exact zeros; they carry no information
        mask = (absval >= threshold) & (absval > 0)
        positions = torch.nonzero(mask).reshape(-1)
        kept = flat[positions]
        if config.scale == "auto":
            scale = float(kept.abs().double().mean()) if kept.numel() else 0.0
        else:
            scale = float(config.scale) * sigma
        streams, meta = encode_positions(positions, flat.numel())
        tensors = {**streams, "signs": pack_signs(kept < 0), "scale": torch.tensor([scale], dtype=torch.float32)}
        return Encoded(tensors, {**meta, "threshold": repr(threshold), "sigma": repr(sigma)})

    def _parts(self, enc: Encoded, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
        numel = math.prod(shape)
        missing = {"q", "r", "signs", "scale"} - set(enc.tensors)
        if missing:  # the contract's error, as dare's (was a bare KeyError)
            raise ValueError(f"{self.name} payload lacks tensors {sorted(missing)}")
        try:
            count = int(enc.meta["count"])
        except (KeyError, ValueError):
            raise ValueError("compeft payload has no valid 'count' in its metadata") from None
        positions = decode_positions({"q": enc.tensors["q"], "r": enc.tensors["r"]}, dict(enc.meta),
                                     numel=numel, count=count)
        signs = unpack_signs(enc.tensors["signs"], count)
        scale_t = enc.tensors["scale"]
        if scale_t.numel() != 1 or scale_t.dtype != torch.float32 or not torch.isfinite(scale_t).all():
            raise ValueError("compeft payload needs one finite fp32 scale")
        return positions, signs, float(scale_t)

    def sparse(self, enc: Encoded, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept positions, ±scale): O(kept) work, what TIES and task arithmetic of ComPEFT experts need."""
        positions, signs, scale = self._parts(enc, shape)
        return positions, signs.to(torch.float32) * scale

    def decode(self, enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        positions, values = self.sparse(enc, shape)
        out = torch.zeros(math.prod(shape), dtype=torch.float32)
        out[positions] = values
        return out.reshape(shape)

    def to_resident(self, enc: Encoded, shape: tuple[int, ...], *, device: Any = "cpu") -> TernaryMask | SparseRows:
        """A mask plane + the stored sign stream (1 + d bits/param), or CSR with int8 signs when d < ~4%."""
        positions, _, scale = self._parts(enc, shape)
        return ternary_layout(positions, enc.tensors["signs"], scale, tuple(shape)).to(device)
