"""``bitdelta``: one sign bit per weight and one scale per matrix.

Liu, Yuan, Jin, Hu, Rajbhandari, Harris, Shah, Zhang, Han. *BitDelta: Your Fine-Tune May Only Be Worth One
Bit* (NeurIPS 2024), https://arxiv.org/abs/2402.10193; code FasterDecoding/BitDelta (research/codecs.md §7).

Math. B = sign(Δ) with zero mapped to +1 (bit = [Δ ≥ 0], as the authors' code), and Δ̂ = s·B with one fp32 s
per matrix. s = mean|Δ| (fp64) is the L2-optimal scale for those signs: ‖Δ − s·B‖² = ‖Δ‖² − 2s‖Δ‖₁ + n·s²
is minimal at s = ‖Δ‖₁/n, where it equals ‖Δ‖² − n·s².

Scale distillation (``distill=true``, needs calibration activations, :mod:`deltahub.calibration`): the signs
stay frozen and only s changes, to match the fine-tuned layer's outputs on the calibration inputs X of that
layer: minimise ‖X(s·B − Δ)ᵀ‖², whose closed form per matrix is

    ŝ = ⟨XΔᵀ, XBᵀ⟩ / ‖XBᵀ‖² = tr(Δ G Bᵀ) / tr(B G Bᵀ),   G = XᵀX.

Relation to the paper: the authors train all scales jointly by AdamW on the logit MSE between the fine-tuned
(teacher) model and the compressed model (C4, 100-200 steps), so each layer's scale also compensates for the
errors of the layers below. The per-layer least-squares fit above is the exact optimum of the layer-wise
(teacher-input) version of that objective: no optimiser, no learning rate, deterministic, and it never
increases the per-layer output error over mean|Δ| (mean|Δ| is one candidate of the same objective). A
non-positive or non-finite ŝ (degenerate inputs) falls back to mean|Δ|. Matrices without activations keep
mean|Δ|. Only scales are trained (not the authors' "all parameters" code path).

Scope: ≥2-D tensors; names containing "embed" stay dense (resized vocabularies) unless
``include_embeddings=true``; 1-D tensors and norms stay dense through the core.

Storage: ``signs`` packed LSB-first over the flattened tensor (row-major (shape[0], prod(shape[1:])) view,
bit 1 = +1), ceil(n/8) bytes, and ``scale`` fp32 (1,): 1 + 32/n bits per parameter. Meta ``scale_source``
(mean_abs|distilled). to_resident gives ``Codes`` (b = 1, codebook [−s, +s]): 1 + 64/n bits per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from deltahub.calibration import require
from deltahub.codecs import Codec, CodecConfig, DeltaSource, Encoded
from deltahub.errors import CodecConfigError
from deltahub.kernels.layouts import Codes
from deltahub.kernels.pack import sign_plane
from deltahub.plugins.binary import unpack_codes


class BitdeltaConfig(CodecConfig):
    """Options of ``bitdelta``."""

    distill: bool = False
    """Fit each matrix's scale to the fine-tuned layer outputs on calibration inputs (needs --calibration)."""
    include_embeddings: bool = False
    """Also encode tensors whose names contain 'embed' (kept dense by default: resized vocabularies)."""



def _mean_abs(d: torch.Tensor) -> float:
    return float(d.double().abs().mean()) if d.numel() else 0.0


class BitdeltaCodec(Codec):
    name = "bitdelta"
    version = 1
    pretty_name = "BitDelta (sign bit + per-matrix scale)"
    reference_url = "https://arxiv.org/abs/2402.10193"
    Config = BitdeltaConfig
    auto_grid = ({"include_embeddings": True},)  # auto decides per tensor, embeddings included

    def accepts(self, name: str, shape: tuple[int, ...], config: BitdeltaConfig) -> bool:
        return len(shape) >= 2 and (config.include_embeddings or "embed" not in name.lower())

    def fit(self, deltas: DeltaSource, config: BitdeltaConfig, *, calibration: Any = None) -> dict[str, Any] | None:
        """``distill=true``: the per-layer least-squares scale of each matrix with activations."""
        if not config.distill:
            return None
        cal = require(calibration, self.name, "distill=true")
        scales: dict[str, float] = {}
        gain = [0.0, 0.0]  # Σ‖X(s·B − Δ)ᵀ‖² at mean|Δ| and at ŝ
        for name, d in deltas:
            d = d.float()
            if d.dim() != 2 or cal.resolve(name) is None:
                continue
            b = torch.where(d >= 0, 1.0, -1.0)
            prod = cal.products(name, b, d)
            if prod is None:
                continue
            bb, db, dd = float(prod[0, 0]), float(prod[0, 1]), float(prod[1, 1])
            s0 = _mean_abs(d)
            s = db / bb if bb > 0 else float("nan")
            if not (math.isfinite(s) and s > 0):
                s = s0
            scales[name] = s
            gain[0] += s0 * s0 * bb - 2 * s0 * db + dd
            gain[1] += s * s * bb - 2 * s * db + dd
        if not scales:
            raise CodecConfigError("bitdelta distill=true: the calibration activations match none of the encoded "
                                   "weights; calibrate with the fine-tuned model folder.")
        return {"scales": scales, "layers": len(scales), "output_error_mean_abs": gain[0],
                "output_error_distilled": gain[1]}

    def encode(self, delta: torch.Tensor, config: BitdeltaConfig, stats: Mapping[str, Any] | None = None, *,
               name: str = "") -> Encoded:
        flat = delta.float().reshape(-1)
        distilled = (stats or {}).get("scales", {})
        source = "distilled" if name in distilled else "mean_abs"
        s = float(distilled[name]) if name in distilled else _mean_abs(flat)
        signs = torch.from_numpy(np.packbits((flat >= 0).numpy(), bitorder="little"))
        return Encoded({"signs": signs, "scale": torch.tensor([s], dtype=torch.float32)}, {"scale_source": source})

    def _parts(self, enc: Encoded, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        scale = enc.tensors.get("scale")
        if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.dtype != torch.float32 \
                or not torch.isfinite(scale).all():
            raise ValueError("bitdelta payload needs one finite fp32 scale")
        return unpack_codes(enc.tensors.get("signs"), math.prod(shape), 1, "bitdelta signs"), scale.reshape(1)

    def decode(self, enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        bits, s = self._parts(enc, shape)
        return torch.where(bits.bool(), s, -s).reshape(shape)

    def to_resident(self, enc: Encoded, shape: tuple[int, ...], *, device: Any = "cpu") -> Codes:
        bits, s = self._parts(enc, shape)
        book = torch.cat([-s, s]).reshape(1, 2)  # bit 1 = [Δ ≥ 0] selects the upper level
        return Codes(sign_plane(enc.tensors["signs"], bits, tuple(shape)), book, tuple(shape)).to(device)
