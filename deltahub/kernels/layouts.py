"""The closed set of in-memory delta layouts the kernels understand (DESIGN §2.3).

A codec joins the fast paths by returning one of these from ``to_resident``. Every layout describes a
delta ``Δ`` of a known ``shape``; ``alpha`` is applied by the kernel, never baked in, so one resident
expert serves any merge weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dense:
    """Δ as a dense tensor (fp32, or fp64 for the exact ``dense`` codec on fp32 weights)."""

    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


@dataclass(frozen=True)
class SparseCOO:
    """Δ.flatten()[indices] = scale · values, zero elsewhere.

    ``indices`` are sorted unique flat int64 (or int32 below 2**31 elements) positions. ``values`` are
    fp32, fp16, or int8 signs (ternary codecs keep ±1 in one byte and a single ``scale``).
    """

    indices: torch.Tensor
    values: torch.Tensor
    scale: float
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.values))


@dataclass(frozen=True)
class SignBits:
    """Δ[r, c] = scale[r] · (+1 if bit else −1) + offset[r] for a matrix viewed as (rows, cols).

    ``bits`` is uint8 (rows, ceil(cols / 8)), little bit order (bit j of byte b is column 8b + j).
    ``scale`` and ``offset`` are fp32 of length ``rows`` (or 1, broadcast). N-d tensors are viewed as
    (shape[0], prod(shape[1:])).
    """

    bits: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bits, self.scale, self.offset))


@dataclass(frozen=True)
class TernaryPlanes:
    """Δ = scale · (plus − minus), two packed bit planes over the flattened tensor (little bit order)."""

    plus: torch.Tensor
    minus: torch.Tensor
    scale: float
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        return self.plus.numel() + self.minus.numel()


@dataclass(frozen=True)
class LowRank:
    """Δ = scale · B @ A with A (r, in) and B (out, r); N-d weights are viewed as (out, prod(rest))."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B))


Resident = Dense | SparseCOO | SignBits | TernaryPlanes | LowRank
