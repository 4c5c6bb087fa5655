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
    alt: float = math.nan  # the heuristic distortion too, under the fisher objective (a second allocation to check)
    enc: Encoded | None = field(default=None, repr=False)


def encode_with(codec: Codec, config: CodecConfig, delta: torch.Tensor, name: str) -> Encoded:
    d = delta if codec.lossless else delta.float()
    return codec.encode_grid(d.contiguous(), [config], name=name)[0]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def heuristic(codec: Codec, enc: Encoded, delta: torch.Tensor, err: torch.Tensor, *,
              err2: float | None = None, norm2: float | None = None) -> float:
    """The ``heuristic`` distortion of the module docstring: ‖e_b‖² + ‖e − e_b‖²/n with e_b = (g − 1)·Δ."""
    err2 = _dot(err, err) if err2 is None else err2
    gain = codec.expected_gain(enc)
    if gain is None:
        return err2
    n = max(delta.shape[-1], 1) if delta.dim() >= 2 else 1
    norm2 = _dot(delta, delta) if norm2 is None else norm2
    b = gain - 1.0
    noise2 = err2 - 2 * b * _dot(err, delta) + b * b * norm2  # ‖e − bΔ‖², expanded: no second tensor
    return b * b * norm2 + max(noise2, 0.0) / n


Scorer = Callable[[str, torch.Tensor, list[torch.Tensor]], "list[float] | None"]


def measure(name: str, delta: torch.Tensor, *, objective: str, scorer: Scorer | None = None,
            keep: bool = True, prune: bool = True) -> list[Trial]:
    """Every candidate on one tensor, cheapest first; ``prune``: only the lower convex hull of (bits, score)."""
    trials, errors = [], []
    shape = tuple(delta.shape)
    d32 = delta.float().contiguous()
    norm2 = _dot(d32, d32)
    groups: dict[str, list[tuple[Codec, CodecConfig, str]]] = {}
    for cand in candidates(name, shape):
        groups.setdefault(cand[0].name, []).append(cand)
    for group in groups.values():
        codec = group[0][0]
        encs = codec.encode_grid(delta if codec.lossless else d32, [c for _, c, _ in group], name=name)
        for (_, _, lab), enc in zip(group, encs):
            dec = codec.decode(enc, shape)
            err = dec.float() - d32 if dec.dtype != torch.float64 else (dec - delta.double()).float()
            err2 = _dot(err, err)
            score = err2 if objective == "weight" else heuristic(codec, enc, d32, err, err2=err2, norm2=norm2)
            trials.append(Trial(lab, 8 * enc.nbytes(), err2, score, score, enc if keep else None))
            if objective == "fisher":
                errors.append(err)
    if objective == "fisher" and scorer is not None:
        scores = scorer(name, delta, errors)
        for i, t in enumerate(trials):  # a tensor the model does not have stays exact
            t.score = scores[i] if scores is not None else 0.0 if t.err2 == 0 else math.inf
        if prune:  # both objectives' hulls: the allocation by either is checked end to end
            keep_ids = {id(t) for t in hull(trials)} | {id(t) for t in hull(trials, "alt")}
            return sorted((t for t in trials if id(t) in keep_ids), key=lambda t: t.bits)
    return hull(trials) if prune else sorted(trials, key=lambda t: t.bits)


def hull(trials: list[Trial], key: str = "score") -> list[Trial]:
    """The lower convex hull of (bits, ``key``): the only points a Lagrangian allocation can choose."""
    pts: list[Trial] = []
    for t in sorted(trials, key=lambda t: (t.bits, getattr(t, key))):
        if math.isinf(getattr(t, key)) or (pts and getattr(t, key) >= getattr(pts[-1], key)):
            continue  # no better than a smaller candidate
        while len(pts) >= 2 and _cross(pts[-2], pts[-1], t, key) <= 0:
            pts.pop()
        pts.append(t)
    return pts


def _cross(a: Trial, b: Trial, c: Trial, key: str) -> float:
    ya, yb, yc = getattr(a, key), getattr(b, key), getattr(c, key)
    return (b.bits - a.bits) * (yc - ya) - (yb - ya) * (c.bits - a.bits)


def allocate(table: dict[str, list[Trial]], lam: float, key: str = "score") -> dict[str, int]:
    """Per tensor, the point minimising ``key`` + λ·bits (always a point of that key's hull)."""
    return {n: min(range(len(ts)), key=lambda i: getattr(ts[i], key) + lam * ts[i].bits) for n, ts in table.items()}


def total(table: dict[str, list[Trial]], choice: dict[str, int], what: str = "bits") -> float:
    return sum(getattr(table[n][i], what) for n, i in choice.items())


def fit_bits(table: dict[str, list[Trial]], budget_bits: float, key: str = "score") -> tuple[float, dict[str, int]]:
    """The smallest λ (least ``key``) whose allocation fits ``budget_bits``: (λ, choice)."""
    lo, hi = 0.0, 1.0
    while total(table, allocate(table, hi, key)) > budget_bits and hi < 1e60:
        hi *= 16
    for _ in range(80):  # bisection on log λ: larger λ means fewer bits
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e12
        lo, hi = (lo, mid) if total(table, allocate(table, mid, key)) <= budget_bits else (mid, hi)
        if lo > 0 and hi / lo < 1 + 1e-9:
            break
    return hi, allocate(table, hi, key)


def lambda_for_score(table: dict[str, list[Trial]], target: float) -> float:
    """λ whose allocation's summed score is closest to ``target`` from below (the start of a checked search)."""
    lo, hi = 1e-30, 1e30
    for _ in range(120):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if total(table, allocate(table, mid), "score") <= target else (lo, mid)
    return lo
