"""``auto``: choose, per tensor, the codec and setting that fits a quality or size target.

Two targets (exactly one is given):

- ``max_error=ε``: for every tensor, the candidate with the fewest stored bits whose relative
  reconstruction error ‖Δ − Δ̂‖/‖Δ‖ is at most ε (the lossless ``dense`` is always a last resort);
- ``max_bits_per_param=B``: the smallest total squared error Σ‖Δ − Δ̂‖² such that all encoded tensors
  together use at most B bits per parameter. ``fit`` measures every candidate on every tensor, then a
  Lagrangian sweep (each tensor minimises err² + λ·bits; bisection on λ) meets the budget — the classic
  rate-distortion allocation, exact up to the convex hull of each tensor's (bits, error) points.

The payload is the chosen codec's payload; ``meta`` adds ``auto.codec``, ``auto.params``, ``auto.version``
and ``auto.reason`` so ``deltahub inspect`` can show what was chosen and why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, model_validator

from deltahub.codecs import Codec, CodecConfig, DeltaSource, Encoded, available_codecs, get_codec
from deltahub.errors import CodecVersionError

# (codec, params, estimated bits/param used only to order the search); unavailable codecs are skipped
CANDIDATES: list[tuple[str, dict[str, Any], float]] = [
    ("compeft", {"density": 0.005}, 0.05), ("compeft", {"density": 0.01}, 0.09), ("compeft", {"density": 0.02}, 0.16),
    ("compeft", {"density": 0.05}, 0.34), ("compeft", {"density": 0.1}, 0.57), ("compeft", {"density": 0.2}, 0.92),
    ("bitdelta", {}, 1.0), ("binary", {"bits": 1}, 1.0), ("compeft", {"density": 0.3}, 1.18),
    ("compeft", {"density": 0.5}, 1.5), ("binary", {"bits": 2}, 2.0), ("binary", {"bits": 3}, 3.0),
    ("binary", {"bits": 4}, 4.0), ("dense", {"dtype": "bfloat16"}, 16.0), ("dense", {"dtype": "float16"}, 16.0),
    ("dense", {}, 32.0),
]


class AutoConfig(CodecConfig):
    """Options of ``auto`` (give exactly one)."""

    max_error: float | None = Field(None, gt=0)
    """Per-tensor bound on the relative reconstruction error ‖Δ − Δ̂‖/‖Δ‖."""
    max_bits_per_param: float | None = Field(None, gt=0)
    """Total size budget over the encoded tensors, in bits per parameter."""

    @model_validator(mode="after")
    def _one_target(self) -> AutoConfig:
        if (self.max_error is None) == (self.max_bits_per_param is None):
            raise ValueError("give exactly one of max_error or max_bits_per_param")
        return self


def _candidates(name: str, shape: tuple[int, ...]) -> list[tuple[Codec, CodecConfig, float]]:
    have = set(available_codecs())
    out = []
    for cname, params, est in CANDIDATES:
        if cname in have:
            codec = get_codec(cname)
            config = codec.parse_config(params)
            if codec.accepts(name, shape, config):
                out.append((codec, config, est))
    return out


def _try(codec: Codec, config: CodecConfig, delta: torch.Tensor, name: str) -> tuple[Encoded, int, float]:
    """Encode with one candidate: (payload, stored bits, squared error)."""
    enc = codec.encode(delta if codec.lossless else delta.float(), config, codec.fit_one(name, delta, config), name=name)
    dec = codec.decode(enc, tuple(delta.shape))
    return enc, 8 * enc.nbytes(), float((dec.double() - delta.double()).pow(2).sum())


class AutoCodec(Codec):
    name = "auto"
    version = 1
    pretty_name = "auto (per-tensor codec choice)"
    reference_url = None
    Config = AutoConfig

    def accepts(self, name: str, shape: tuple[int, ...], config: CodecConfig) -> bool:
        return True

    def fit(self, deltas: DeltaSource, config: AutoConfig, *, calibration: Any = None) -> dict[str, Any] | None:
        """Budget mode: measure every candidate on every tensor and allocate bits by a Lagrangian sweep."""
        if config.max_bits_per_param is None:
            return None
        table: dict[str, list[tuple[int, float]]] = {}
        numel = 0
        for name, d in deltas:
            numel += d.numel()
            table[name] = [_try(c, cfg, d, name)[1:] for c, cfg, _ in _candidates(name, tuple(d.shape))]
        budget = config.max_bits_per_param * numel

        def pick(lam: float) -> dict[str, int]:
            return {n: min(range(len(r)), key=lambda i: r[i][1] + lam * r[i][0]) for n, r in table.items()}

        def bits(choice: dict[str, int]) -> int:
            return sum(table[n][i][0] for n, i in choice.items())

        lo, hi = 0.0, 1.0
        while bits(pick(hi)) > budget and hi < 1e30:
            hi *= 16
        for _ in range(60):  # bisection on λ: larger λ means fewer bits
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
            lo, hi = (lo, mid) if bits(pick(mid)) <= budget else (mid, hi)
        choice = pick(hi)
        return {"choice": choice, "bits": bits(choice), "budget_bits": budget}

    def encode(self, delta: torch.Tensor, config: AutoConfig, stats: Mapping[str, Any] | None = None, *,
               name: str = "") -> Encoded:
        cands = _candidates(name, tuple(delta.shape))
        norm = float(delta.double().norm()) or 1.0
        if config.max_bits_per_param is not None and stats and name in stats.get("choice", {}):
            codec, cfg, _ = cands[int(stats["choice"][name])]
            enc, _, err2 = _try(codec, cfg, delta, name)
            return self._wrap(codec, cfg, enc, f"budget {config.max_bits_per_param} bits/param; rel. error {math.sqrt(err2) / norm:.4g}")
        best: tuple[int, Codec, CodecConfig, Encoded, float] | None = None
        for codec, cfg, est in sorted(cands, key=lambda c: c[2]):
            if best is not None and est * delta.numel() >= best[0]:
                break  # every remaining candidate is estimated larger than the best passing one
            enc, nbits, err2 = _try(codec, cfg, delta, name)
            rel = math.sqrt(err2) / norm
            if rel <= (config.max_error or 0.0) and (best is None or nbits < best[0]):
                best = (nbits, codec, cfg, enc, rel)
        if best is None:  # nothing met the bound: the lossless codec always does
            codec, cfg = get_codec("dense"), get_codec("dense").Config()
            enc, nbits, err2 = _try(codec, cfg, delta, name)
            best = (nbits, codec, cfg, enc, 0.0)
        nbits, codec, cfg, enc, rel = best
        return self._wrap(codec, cfg, enc, f"fewest bits with rel. error {rel:.4g} <= {config.max_error}")

    @staticmethod
    def _wrap(codec: Codec, cfg: CodecConfig, enc: Encoded, reason: str) -> Encoded:
        meta = {**enc.meta, "auto.codec": codec.name, "auto.version": str(codec.version),
                "auto.params": json.dumps(cfg.model_dump(mode="json"), sort_keys=True), "auto.reason": reason}
        return Encoded(enc.tensors, meta)

    @staticmethod
    def _inner(enc: Encoded) -> tuple[Codec, Encoded]:
        try:
            codec = get_codec(enc.meta["auto.codec"])
            version = int(enc.meta["auto.version"])
        except (KeyError, ValueError):
            raise ValueError("auto payload does not name its codec") from None
        if version > codec.version:
            raise CodecVersionError(f"This auto payload was encoded with codec {codec.name} v{version}; the installed one "
                                    f"is v{codec.version}. Upgrade the plugin that provides it (`deltahub codecs`).")
        inner_meta = {k: v for k, v in enc.meta.items() if not k.startswith("auto.")}
        return codec, Encoded(enc.tensors, inner_meta)

    def decode(self, enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        codec, inner = self._inner(enc)
        return codec.decode(inner, shape).to(torch.float32) if codec.name != "dense" else codec.decode(inner, shape)

    def to_resident(self, enc: Encoded, shape: tuple[int, ...], *, device: Any = "cpu") -> Any:
        codec, inner = self._inner(enc)
        return codec.to_resident(inner, shape, device=device)
