"""``darex``: DARE with a tuned rescale (DAREx-q).

Deng et al. *DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models* (ICLR 2025),
https://arxiv.org/abs/2410.09344 (research/codecs.md §2b).

Math. The same random mask as ``dare`` (same generator, seed and tensor names: the kept set is identical),
but the survivors are rescaled by 1/q with q ∈ [1−p, 1] instead of 1/(1−p): Δ̂_q = Δ ⊙ m / q. q = 1−p is
DARE (unbiased, Var = Δ²p/(1−p)); q = 1 is DropOnly. A larger q trades bias for variance, which wins at
high p (p = 0.99: DARE's per-entry variance is 99·Δ²).

``q=auto`` picks one global q in ``fit`` by the unlabeled output-change objective, in a per-layer form that
needs no forward pass of the compressed model. With X_ℓ the calibration inputs of linear layer ℓ of the
fine-tuned model (:class:`deltahub.calibration.Calibration`) and A_ℓ = Δ_ℓ ⊙ m_ℓ the kept values exactly as
stored (rounded to ``value_dtype``, masks generated as ``encode`` will), the change of the layer outputs is

    f(q) = Σ_ℓ ‖X_ℓ (Δ̂_q,ℓ − Δ_ℓ)ᵀ‖² = S_aa/q² − 2 S_ad/q + S_dd,
    S_aa = Σ_ℓ ‖X_ℓ A_ℓᵀ‖², S_ad = Σ_ℓ ⟨X_ℓ A_ℓᵀ, X_ℓ Δ_ℓᵀ⟩, S_dd = Σ_ℓ ‖X_ℓ Δ_ℓᵀ‖².

f is a convex quadratic in 1/q, so the minimiser over [1−p, 1] is exact: q* = clip(S_aa/S_ad, 1−p, 1). That
is the point the authors' coarse-to-fine grid search (step s, then s/10) converges to for this objective.
Deviation, labelled: the authors score −mean|h_last(pruned) − h_last(ft)| end to end over 4 mask seeds; we
score the sum of per-layer output changes for the actual stored masks (a first-order surrogate that ignores
how errors propagate through nonlinearities). Layers without activations (embeddings, conv) do not vote.

When to use ``q=auto``. Only where plain DARE at the chosen p loses accuracy (the paper's regime: DARE
collapsing at p = 0.99 on large models). On the demo task DARE at p = 0.99 loses 0.7 points and every fitted
q > 1−p costs accuracy (BENCHMARKS.md, fidelity): the per-layer objective does not see how DARE's unbiased
noise cancels downstream. To have the choice checked end to end, use ``auto`` with a fidelity target and
calibration: its darex candidates (q = 2(1−p)) compete with dare's and are kept only when the measured KL
says so.

Storage: the ``dare`` payload, with ``scale`` = fp32(1/q) as its own tensor and meta ``q`` (repr), apart
from the unscaled values: re-tuning q rewrites 4 bytes and one meta field, never the values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from deltahub.calibration import require
from deltahub.codecs import CodecConfig, DeltaSource, Encoded
from deltahub.errors import CodecConfigError
from deltahub.plugins.dare import _VALUE_DTYPES, DareCodec, keep_mask


class DarexConfig(CodecConfig):
    """Options of ``darex``."""

    p: float = Field(0.99, ge=0, lt=1)
    """Drop rate in [0, 1) (the mask is dare's for the same seed and p)."""
    q: float | Literal["auto"] = "auto"
    """Rescale survivors by 1/q, q in [1−p, 1]; ``auto``: searched in fit on calibration inputs."""
    seed: int = Field(0, ge=0)
    """Mask seed; with the tensor name it keys the portable Philox generator (as in dare)."""
    value_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage type of the kept (unscaled) values."""

    @model_validator(mode="after")
    def _q_range(self) -> DarexConfig:
        if self.q != "auto" and not (1.0 - self.p - 1e-12 <= self.q <= 1.0):  # 1e-12: decimal 1−p
            raise ValueError(f"q must be 'auto' or in [1-p, 1] = [{1.0 - self.p:.6g}, 1], got {self.q}")
        return self


class DarexCodec(DareCodec):
    name = "darex"
    version = 1
    pretty_name = "DAREx-q (drop, tuned rescale)"
    reference_url = "https://arxiv.org/abs/2410.09344"
    Config = DarexConfig
    auto_grid = ({"p": 0.99, "q": 0.02}, {"p": 0.95, "q": 0.1})  # half-way to DropOnly on the 1/q scale: q = 2(1−p)

    def fit(self, deltas: DeltaSource, config: DarexConfig, *, calibration: Any = None) -> dict[str, Any] | None:
        """``q=auto``: the global q minimising the per-layer output change (module docstring)."""
        if config.q != "auto":
            return None
        cal = require(calibration, self.name, "q=auto")
        s_aa = s_ad = s_dd = 0.0
        layers = 0
        for name, d in deltas:
            d = d.float()
            if d.dim() != 2 or cal.resolve(name) is None:
                continue
            keep = keep_mask(config.seed, name, d.numel(), config.p).reshape(d.shape)
            a = torch.where(keep, d.to(_VALUE_DTYPES[config.value_dtype]).float(), 0.0)
            prod = cal.products(name, a, d)
            if prod is None:
                continue
            s_aa, s_ad, s_dd = s_aa + float(prod[0, 0]), s_ad + float(prod[0, 1]), s_dd + float(prod[1, 1])
            layers += 1
        if not layers:
            raise CodecConfigError("darex q=auto: the calibration activations match none of the encoded weights; "
                                   "calibrate with the fine-tuned model folder, or give q.")
        lo = 1.0 - config.p
        q = min(1.0, max(lo, s_aa / s_ad)) if s_aa > 0 and s_ad > 0 else lo

        def rel(x: float) -> float:  # f(x) / S_dd: output change relative to the delta's own output
            return (s_aa / x**2 - 2 * s_ad / x + s_dd) / s_dd if s_dd > 0 else 0.0

        return {"q": q, "p": config.p, "layers": layers, "objective": rel(q), "objective_dare": rel(lo),
                "objective_droponly": rel(1.0)}

    def _keep_rate(self, config: DarexConfig, stats: Mapping[str, Any] | None) -> float:
        if config.q != "auto":
            return float(config.q)
        if not stats or "q" not in stats:
            raise CodecConfigError("darex q=auto needs fit() on calibration inputs first (pass --calibration "
                                   "FILE), or give q.")
        return float(stats["q"])

    def _meta(self, config: DarexConfig, q: float) -> dict[str, str]:
        return {"p": repr(config.p), "seed": str(config.seed), "q": repr(q)}


def retune(enc: Encoded, q: float) -> Encoded:
    """The same payload rescaled by 1/q (values untouched): DAREx-q re-tuning without re-encoding."""
    p = float(enc.meta.get("p", "nan"))
    if not (1.0 - p - 1e-12 <= q <= 1.0):
        raise ValueError(f"q must be in [1-p, 1] = [{1.0 - p:.6g}, 1], got {q}")
    return Encoded({**enc.tensors, "scale": torch.tensor([1.0 / q], dtype=torch.float32)}, {**enc.meta, "q": repr(q)})
