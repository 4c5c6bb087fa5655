"""``ExpertStack``: the experts of one weight, grouped by layout kind and packed for the mixed-batch kernels.

A mixed batch runs one launch per layout kind present (vLLM's and Punica's design, research/perf.md §1.3,
§1.6), so the experts of a kind are stacked into shared tensors once, not per batch: planes and
codebooks ``(E, …)``, masks ``(E, rows, ceil(cols/8))`` with every sign stream concatenated and offset,
CSR entries concatenated with global row pointers, LoRA factors zero-padded to one rank (a power of two
≥ 16, the smallest ``tl.dot`` tile). Zero padding adds exact zeros. The stack holds its own copies
(a one-member group uses views): serving code keeps the stack and may drop the layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from deltahub.errors import LayoutError
from deltahub.kernels.layouts import Codes, Dense, LowRank, Resident, SparseRows, TernaryMask


@dataclass
class Group:
    """Experts of one kind: ``members`` are their indices in the stack, ``tensors`` their packed data."""

    kind: str
    members: list[int]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    bits: int = 0
    rank: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _kind(layout: Resident) -> tuple[str, int]:
    if isinstance(layout, Codes):
        return "codes", layout.bits
    return {Dense: "dense", TernaryMask: "mask", SparseRows: "csr", LowRank: "lowrank"}[type(layout)], 0


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


def _common(dtypes: set[torch.dtype]) -> torch.dtype:
    if len(dtypes) == 1:
        return next(iter(dtypes))
    return torch.float64 if torch.float64 in dtypes else torch.float32


class ExpertStack:
    """Experts (resident layouts, or None for "no expert") of one weight shape, packed per kind.

    Raises:
        LayoutError: experts of different shapes or devices.
    """

    def __init__(self, experts: Sequence[Resident | None]):
        self.experts = list(experts)
        present = [e for e in self.experts if e is not None]
        if len({tuple(e.shape) for e in present}) > 1 or len({e.device for e in present}) > 1:
            raise LayoutError("An ExpertStack holds experts of one weight: one shape and one device.")
        self.shape = tuple(present[0].shape) if present else ()
        self._groups: list[Group] | None = None

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def groups(self) -> list[Group]:
        if self._groups is None:
            by_kind: dict[tuple[str, int], list[int]] = {}
            for i, e in enumerate(self.experts):
                if e is not None:
                    by_kind.setdefault(_kind(e), []).append(i)
            self._groups = [_BUILD[kind](self.experts, members, bits) for (kind, bits), members in by_kind.items()]
        return self._groups

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)


def _dense(experts: list, members: list[int], bits: int) -> Group:
    ls = [experts[i] for i in members]
    rows, cols = ls[0].matrix
    dt = _common({x.values.dtype for x in ls})
    return Group("dense", members, {"values": _stack([x.values.reshape(rows, cols).to(dt) for x in ls])})


def _codes(experts: list, members: list[int], bits: int) -> Group:
    ls = [experts[i] for i in members]
    rows = ls[0].matrix[0]
    books = [x.codebook.expand(rows, -1).contiguous() for x in ls]  # per row: 2^b·4 bytes a row
    return Group("codes", members, {"planes": _stack([x.planes for x in ls]), "book": _stack(books)}, bits=bits)


def _scales(ls: list, device: torch.device) -> torch.Tensor:
    return torch.tensor([x.scale for x in ls], dtype=torch.float32, device=device)


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return torch.tensor(out, dtype=torch.int64, device=device)


def _mask(experts: list, members: list[int], bits: int) -> Group:
    ls = [experts[i] for i in members]
    dev = ls[0].device
    return Group("mask", members, {
        "mask": _stack([x.mask for x in ls]),
        "signs": torch.cat([x.signs for x in ls]) if len(ls) > 1 else ls[0].signs,
        "sign_off": _offsets([x.signs.numel() for x in ls], dev),  # bytes: every stream starts on a byte
        "row_ptr": _stack([x.row_ptr.to(torch.int64) for x in ls]),
        "scale": _scales(ls, dev)})


def _csr(experts: list, members: list[int], bits: int) -> Group:
    ls = [experts[i] for i in members]
    dev = ls[0].device
    base = _offsets([x.nnz for x in ls], dev)
    col_dt = torch.uint16 if all(x.cols.dtype == torch.uint16 for x in ls) else torch.int32
    val_dt = _common({x.values.dtype for x in ls})
    cols = [x.cols if x.cols.dtype == col_dt else x.cols.to(torch.int32) for x in ls]
    return Group("csr", members, {
        "row_ptr": _stack([x.row_ptr.to(torch.int64) + base[i] for i, x in enumerate(ls)]),
        "cols": torch.cat(cols) if len(ls) > 1 else cols[0],
        "values": torch.cat([x.values.to(val_dt) for x in ls]) if len(ls) > 1 else ls[0].values,
        "scale": _scales(ls, dev)})


def _lowrank(experts: list, members: list[int], bits: int) -> Group:
    """Δ₂ = s·V @ U for every member: U (E, R, cols), V (E, rows, R), R padded to a power of two ≥ 16."""
    ls = [experts[i] for i in members]
    rows, cols = ls[0].matrix
    rank = max(16, 1 << (max(x.rank for x in ls) - 1).bit_length())
    dt = _common({x.A.dtype for x in ls} | {x.B.dtype for x in ls})
    U = torch.zeros(len(ls), rank, cols, dtype=dt, device=ls[0].device)
    V = torch.zeros(len(ls), rows, rank, dtype=dt, device=ls[0].device)
    for i, x in enumerate(ls):
        u, v = (x.B.T, x.A.T) if x.transposed else (x.A, x.B)  # (BA)ᵀ = Aᵀ Bᵀ
        U[i, :x.rank] = u.to(dt)
        V[i, :, :x.rank] = v.to(dt)
    return Group("lowrank", members, {"U": U, "V": V, "scale": _scales(ls, ls[0].device)}, rank=rank)


_BUILD = {"dense": _dense, "codes": _codes, "mask": _mask, "csr": _csr, "lowrank": _lowrank}
