"""The machinery of ``auto``: candidates per tensor, their measured (bits, distortion), and the allocation.

A *candidate* is a codec with one setting from its ``auto_grid``. :func:`measure` encodes a tensor with every
candidate that accepts it and records stored bits, squared weight error and the objective's distortion;
only the points on the lower convex hull of (bits, distortion) are kept, since a Lagrangian allocation (each
tensor minimises distortion + λ·bits) never picks another. :func:`allocate` is that allocation for one λ,
:func:`fit_bits` the λ that meets a bit budget (bisection; exact up to the hull of each tensor's points).

Objectives (distortion of an error e = Δ̂ − Δ of one tensor):

- ``weight``: ‖e‖² (plain rate-distortion in weight space);
- ``heuristic`` (no calibration): ‖e_b‖² + ‖e − e_b‖²/n, with e_b = (g − 1)·Δ the part of the error that
  survives averaging over the codec's randomness (g from :meth:`Codec.expected_gain`; e_b = e for a
  deterministic codec) and n = the tensor's last dimension (a row's inputs). Independent zero-mean noise
  on the n inputs of an output adds up incoherently, where a deterministic error (trimmed entries, a
  shared scale) adds up coherently; n is the ratio of the two for unit-variance inputs;
- ``fisher`` (calibration): Σ_s ⟨e, g_s⟩² ≈ 2·outputs·KL (:mod:`deltahub.sensitivity`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from deltahub.codecs import Codec, CodecConfig, Encoded, available_codecs, get_codec

_GRID: list[tuple[Codec, CodecConfig, str]] | None = None


def label(codec: str, params: dict[str, Any]) -> str:
    return " ".join([codec, *(f"{k}={json.dumps(v)}" for k, v in sorted(params.items()))])


def grid() -> list[tuple[Codec, CodecConfig, str]]:
    """Every installed codec's ``auto_grid`` settings, parsed once per process."""
    global _GRID
    if _GRID is None:
        out = []
        for name in available_codecs():
            codec = get_codec(name)
            for params in codec.auto_grid if name != "auto" else ():
                out.append((codec, codec.parse_config(params), label(name, dict(params))))
        _GRID = out
    return _GRID


def candidates(name: str, shape: tuple[int, ...]) -> list[tuple[Codec, CodecConfig, str]]:
    return [c for c in grid() if c[0].accepts(name, shape, c[1])]


@dataclass
class Trial:
    label: str
    bits: int
    err2: float  # ‖Δ − Δ̂‖²
    score: float  # the objective's distortion
    enc: Encoded | None = field(default=None, repr=False)


def encode_with(codec: Codec, config: CodecConfig, delta: torch.Tensor, name: str) -> Encoded:
    d = delta if codec.lossless else delta.float()
    return codec.encode(d.contiguous(), config, codec.fit_one(name, d, config), name=name)


def heuristic(codec: Codec, enc: Encoded, delta: torch.Tensor, err: torch.Tensor) -> float:
    gain = codec.expected_gain(enc)
    n = delta.shape[-1] if delta.dim() >= 2 else 1
    if gain is None:
        return float(err.double().pow(2).sum())
    biased = (gain - 1.0) * delta.double()
    return float(biased.pow(2).sum()) + float((err.double() - biased).pow(2).sum()) / n


Scorer = Callable[[str, torch.Tensor, list[torch.Tensor]], "list[float] | None"]


def measure(name: str, delta: torch.Tensor, *, objective: str, scorer: Scorer | None = None,
            keep: bool = True, prune: bool = True) -> list[Trial]:
    """Every candidate on one tensor, cheapest first; ``prune``: only the lower convex hull of (bits, score)."""
    trials, errors = [], []
    for codec, config, lab in candidates(name, tuple(delta.shape)):
        enc = encode_with(codec, config, delta, name)
        err = codec.decode(enc, tuple(delta.shape)).double() - delta.double()
        err2 = float(err.pow(2).sum())
        score = err2 if objective == "weight" else heuristic(codec, enc, delta, err)
        trials.append(Trial(lab, 8 * enc.nbytes(), err2, score, enc if keep else None))
        errors.append(err.float())
    if objective == "fisher" and scorer is not None:
        scores = scorer(name, delta, errors)
        for i, t in enumerate(trials):  # a tensor the model does not have stays exact
            t.score = scores[i] if scores is not None else 0.0 if t.err2 == 0 else math.inf
    return hull(trials) if prune else sorted(trials, key=lambda t: t.bits)


def hull(trials: list[Trial]) -> list[Trial]:
    """The lower convex hull of (bits, score): the only points a Lagrangian allocation can choose."""
    pts: list[Trial] = []
    for t in sorted(trials, key=lambda t: (t.bits, t.score)):
        if math.isinf(t.score) or (pts and t.score >= pts[-1].score):
            continue  # no better than a smaller candidate
        while len(pts) >= 2 and _cross(pts[-2], pts[-1], t) <= 0:
            pts.pop()
        pts.append(t)
    return pts


def _cross(a: Trial, b: Trial, c: Trial) -> float:
    return (b.bits - a.bits) * (c.score - a.score) - (b.score - a.score) * (c.bits - a.bits)


def allocate(table: dict[str, list[Trial]], lam: float) -> dict[str, int]:
    """Per tensor, the hull point minimising score + λ·bits."""
    return {n: min(range(len(ts)), key=lambda i: ts[i].score + lam * ts[i].bits) for n, ts in table.items()}


def total(table: dict[str, list[Trial]], choice: dict[str, int], what: str = "bits") -> float:
    return sum(getattr(table[n][i], what) for n, i in choice.items())


def fit_bits(table: dict[str, list[Trial]], budget_bits: float) -> tuple[float, dict[str, int]]:
    """The smallest λ (best score) whose allocation fits ``budget_bits``: (λ, choice)."""
    lo, hi = 0.0, 1.0
    while total(table, allocate(table, hi)) > budget_bits and hi < 1e60:
        hi *= 16
    for _ in range(80):  # bisection on log λ: larger λ means fewer bits
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e12
        lo, hi = (lo, mid) if total(table, allocate(table, mid)) <= budget_bits else (mid, hi)
        if lo > 0 and hi / lo < 1 + 1e-9:
            break
    return hi, allocate(table, hi)


def lambda_for_score(table: dict[str, list[Trial]], target: float) -> float:
    """λ whose allocation's summed score is closest to ``target`` from below (the start of a checked search)."""
    lo, hi = 1e-30, 1e30
    for _ in range(120):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if total(table, allocate(table, mid), "score") <= target else (lo, mid)
    return lo
