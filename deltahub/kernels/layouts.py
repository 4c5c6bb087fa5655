"""The closed set of resident layouts: how an expert's delta Δ lives in memory beside its base (DESIGN §2.3).

A codec joins the fast paths by returning one of these from ``to_resident``. Every layout describes a
delta of a known ``shape``, viewed as a matrix Δ₂ of ``matrix_shape(shape)`` = (shape[0], prod(shape[1:]))
(a 1-D tensor is one row, a scalar 1 x 1). ``alpha`` is applied by the kernels, never baked in, so one
resident expert serves any merge weight. The layouts stay packed (research/perf.md §2.1); entropy coding
is for disk and network only. Bits per parameter on a 4096 x 4096 delta (BENCHMARKS.md, kernels):

| layout | holds | bits/param |
|---|---|---|
| ``Dense`` | Δ itself, any float dtype | 16 or 32 |
| ``Codes`` | b bit planes + a 2^b-entry codebook (BitDelta, ``binary``, ternary planes) | b + 2^b·32/numel |
| ``TernaryMask`` | kept-entry mask plane + one sign bit per kept entry + row prefix counts (ComPEFT) | 1 + d + 32/cols |
| ``SparseRows`` | CSR: int32 row pointers, uint16 columns, fp16/bf16/fp32/int8 values (DARE) | d·(16 + value bits) |
| ``LowRank`` | LoRA factors at their own dtype | r·(rows + cols)·bits / numel |

Bit conventions: bit j of byte k in a packed row is column 8k + j (little bit order, as
``np.packbits(bitorder="little")``). ``Codes`` bits are code bits of an *ascending* codebook (for b = 1,
bit 1 selects the upper level: BitDelta's bit = [Δ ≥ 0]). ``TernaryMask`` sign bits follow the entropy
coder (:func:`deltahub.entropy.pack_signs`): bit 1 = negative, so compeft's stored sign stream is used
as it is. Padding bits are zero. Scalars (``scale``) are used in the compute dtype (fp32 unless fp64).

Construction checks structure (dtypes, lengths, shapes, devices, contiguity) in O(1); ``validate()``
also checks contents (prefix counts, sorted in-range columns, finite values) in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from deltahub.errors import LayoutError

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_POPCOUNT = None  # 256-entry popcount table, built on first use


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the matrix view Δ₂ of a delta of ``shape``."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def row_bytes(cols: int) -> int:
    return (cols + 7) // 8


def _fail(layout: str, what: str) -> None:
    raise LayoutError(f"{layout} layout is inconsistent: {what}. The codec that built it has a bug, or its payload is "
                      "corrupt; re-encode the expert.")


def _popcount(bytes_: torch.Tensor) -> torch.Tensor:
    global _POPCOUNT
    if _POPCOUNT is None:
        _POPCOUNT = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).sum(1)
    return _POPCOUNT.to(bytes_.device)[bytes_.long()]


def _padding_is_zero(packed: torch.Tensor, nbits: int) -> bool:
    """Bits past ``nbits`` in the last byte of each packed row (last dim) are zero."""
    if nbits % 8 == 0 or packed.numel() == 0:
        return True
    return not bool((packed[..., -1] >> (nbits % 8)).any())


class _Layout:
    """Shared behaviour: tensors(), nbytes(), to(), equality, compute dtype."""

    shape: tuple[int, ...]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        """Bytes held by the layout's tensors (what it costs in memory; scalars are not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_param(self) -> float:
        return 8 * self.nbytes() / max(1, math.prod(self.shape))

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    @property
    def matrix(self) -> tuple[int, int]:
        return matrix_shape(self.shape)

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp32, or fp64 when the layout holds fp64 values (exact ``dense`` deltas)."""
        wide = any(t.dtype == torch.float64 for t in self.tensors().values())
        return torch.float64 if wide else torch.float32

    def to(self, device: Any) -> Any:
        """The same layout with every tensor on ``device`` (a new object; this one is unchanged)."""
        return replace(self, **{k: t.to(device) for k, t in self.tensors().items()})

    def validate(self) -> Any:
        """Check contents as well as structure; returns ``self``.

        Raises:
            LayoutError: lengths, indices, counts or values are inconsistent.
        """
        self._check_contents()
        return self

    def _check_contents(self) -> None:
        for name, t in self.tensors().items():
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                _fail(type(self).__name__, f"{name} holds NaN or Inf")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                _fail(type(self).__name__, f"{f.name} is {v}")

    def _check_common(self) -> None:
        name = type(self).__name__
        ts = self.tensors()
        if not all(isinstance(s, int) and s >= 0 for s in self.shape):
            _fail(name, f"shape {self.shape} is not a tuple of non-negative ints")
        if len({t.device for t in ts.values()}) > 1:
            _fail(name, f"tensors on several devices ({sorted({str(t.device) for t in ts.values()})})")
        for k, t in ts.items():
            if t.layout != torch.strided or not t.is_contiguous():
                _fail(name, f"{k} is not a contiguous dense tensor")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, torch.Tensor):
                if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape \
                        or not torch.equal(a.cpu(), b.cpu()):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # tensors are mutable


@dataclass(frozen=True, eq=False)
class Dense(_Layout):
    """Δ = values (fp16, bf16, fp32 or fp64; fp64 for exact ``dense`` deltas on fp32 weights)."""

    values: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.values, torch.Tensor) or self.values.dtype not in FLOATS:
            _fail("Dense", "values must be a float tensor")
        self._check_common()

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.values.shape)


@dataclass(frozen=True, eq=False)
class Codes(_Layout):
    """Δ₂[r, c] = codebook[r (or 0), code(r, c)], code = Σ_j bit(planes[j], r, c)·2^j.

    ``planes``: uint8 (bits, rows, ceil(cols/8)), plane j holds bit j of every code. ``codebook``: fp32
    (1 or rows, 2^bits), ascending per row for the built-ins (not required). b = 1 with codebook
    [−s, +s] is BitDelta; [μ − ℓσ, μ + ℓσ] is the 1-bit ``binary`` codec; b = 2 with [0, s, −s, 0] is a
    ternary delta as two planes (plus, minus).
    """

    planes: torch.Tensor
    codebook: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        rows, cols = self.matrix
        p, cb = self.planes, self.codebook
        if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.dim() != 3:
            _fail("Codes", "planes must be a uint8 tensor (bits, rows, ceil(cols/8))")
        if not 1 <= p.shape[0] <= 8 or tuple(p.shape[1:]) != (rows, row_bytes(cols)):
            _fail("Codes", f"planes have shape {tuple(p.shape)}, expected (1..8, {rows}, {row_bytes(cols)})")
        if not isinstance(cb, torch.Tensor) or cb.dtype != torch.float32 or cb.dim() != 2:
            _fail("Codes", "codebook must be a 2-D fp32 tensor")
        if cb.shape[0] not in (1, rows) or cb.shape[1] != 1 << p.shape[0]:
            _fail("Codes", f"codebook has shape {tuple(cb.shape)}, expected (1 or {rows}, {1 << p.shape[0]})")
        self._check_common()

    @property
    def bits(self) -> int:
        return int(self.planes.shape[0])

    def _check_contents(self) -> None:
        super()._check_contents()
        if not _padding_is_zero(self.planes, self.matrix[1]):
            _fail("Codes", "padding bits past the last column are not zero")


@dataclass(frozen=True, eq=False)
class TernaryMask(_Layout):
    """Δ₂[r, c] = scale·(1 − 2·sign_k) where mask bit (r, c) is set and it is the k-th set bit (row-major), else 0.

    ``mask``: uint8 (rows, ceil(cols/8)); ``signs``: uint8 (ceil(nnz/8),), bit k = 1 iff the k-th kept
    entry is negative; ``row_ptr``: int32 (int64 past 2^31 entries) (rows + 1,), kept entries before
    each row, so a GPU program finds the signs of its row without a scan of the rows above.
    """

    mask: torch.Tensor
    signs: torch.Tensor
    row_ptr: torch.Tensor
    scale: float
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "scale", float(self.scale))
        rows, cols = self.matrix
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.uint8 \
                or tuple(self.mask.shape) != (rows, row_bytes(cols)):
            _fail("TernaryMask", f"mask must be uint8 of shape ({rows}, {row_bytes(cols)})")
        _check_row_ptr("TernaryMask", self.row_ptr, rows)
        nnz = int(self.row_ptr[-1]) if self.row_ptr.device.type != "meta" else None
        if not isinstance(self.signs, torch.Tensor) or self.signs.dtype != torch.uint8 or self.signs.dim() != 1 \
                or (nnz is not None and self.signs.numel() != row_bytes(nnz)):
            _fail("TernaryMask", f"signs must be 1-D uint8 holding ceil(nnz/8) = {row_bytes(nnz or 0)} bytes")
        self._check_common()

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    def _check_contents(self) -> None:
        super()._check_contents()
        counts = _popcount(self.mask).sum(1) if self.mask.numel() else torch.zeros(self.matrix[0], dtype=torch.long)
        if not torch.equal(counts.to(self.row_ptr.device), self.row_ptr.diff().long()):
            _fail("TernaryMask", "row_ptr does not count the set bits of each mask row")
        if not _padding_is_zero(self.mask, self.matrix[1]) or not _padding_is_zero(self.signs, self.nnz):
            _fail("TernaryMask", "padding bits are not zero")


@dataclass(frozen=True, eq=False)
class SparseRows(_Layout):
    """Δ₂[r, cols[k]] = scale·values[k] for row_ptr[r] ≤ k < row_ptr[r + 1], zero elsewhere (CSR).

    ``row_ptr``: int32 (int64 past 2^31 entries) (rows + 1,); ``cols``: uint16 when the matrix has at
    most 65,536 columns, else int32, strictly increasing within a row; ``values``: fp16, bf16, fp32 or
    int8 (±1 of a ternary codec), unscaled.
    """

    row_ptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    scale: float
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "scale", float(self.scale))
        rows, ncols = self.matrix
        _check_row_ptr("SparseRows", self.row_ptr, rows)
        want = torch.uint16 if ncols <= 1 << 16 else torch.int32
        if not isinstance(self.cols, torch.Tensor) or self.cols.dtype != want or self.cols.dim() != 1:
            _fail("SparseRows", f"cols must be 1-D {want} for {ncols} columns")
        if not isinstance(self.values, torch.Tensor) or self.values.dim() != 1 \
                or self.values.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.int8):
            _fail("SparseRows", "values must be 1-D fp16, bf16, fp32 or int8")
        nnz = int(self.row_ptr[-1]) if self.row_ptr.device.type != "meta" else self.cols.numel()
        if self.cols.numel() != nnz or self.values.numel() != nnz:
            _fail("SparseRows", f"{self.cols.numel()} cols and {self.values.numel()} values for {nnz} entries")
        self._check_common()

    @property
    def nnz(self) -> int:
        return int(self.cols.numel())

    def _check_contents(self) -> None:
        super()._check_contents()
        ncols = self.matrix[1]
        c = self.cols.long() if self.cols.dtype != torch.uint16 else self.cols.to(torch.int32).long()
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= ncols):
            _fail("SparseRows", f"a column index is outside [0, {ncols})")
        if c.numel() > 1:
            rising = c[1:] > c[:-1]
            starts = self.row_ptr[1:-1].long()
            starts = starts[(starts > 0) & (starts < c.numel())]
            rising[starts - 1] = True  # a new row may restart at any column
            if not bool(rising.all()):
                _fail("SparseRows", "column indices are not strictly increasing within a row")


@dataclass(frozen=True, eq=False)
class LowRank(_Layout):
    """Δ₂ = scale·B @ A, or scale·(B @ A)ᵀ when ``transposed`` (PEFT embedding and ``fan_in_fan_out`` LoRA).

    ``A``: (r, k) and ``B``: (n, r), any float dtype (kept as stored); Δ₂ is (n, k), or (k, n) transposed.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    shape: tuple[int, ...]
    transposed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "scale", float(self.scale))
        for k in ("A", "B"):
            t = getattr(self, k)
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in FLOATS:
                _fail("LowRank", f"{k} must be a 2-D float tensor")
        if self.A.shape[0] != self.B.shape[1]:
            _fail("LowRank", f"A has rank {self.A.shape[0]} and B rank {self.B.shape[1]}")
        n, k = self.B.shape[0], self.A.shape[1]
        want = (k, n) if self.transposed else (n, k)
        if self.matrix != want:
            _fail("LowRank", f"factors give a {want[0]} x {want[1]} delta, the shape {list(self.shape)} needs "
                             f"{self.matrix[0]} x {self.matrix[1]}")
        self._check_common()

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def _check_row_ptr(layout: str, row_ptr: Any, rows: int) -> None:
    if not isinstance(row_ptr, torch.Tensor) or row_ptr.dtype not in (torch.int32, torch.int64) \
            or tuple(row_ptr.shape) != (rows + 1,):
        _fail(layout, f"row_ptr must be int32 or int64 of length rows + 1 = {rows + 1}")
    if row_ptr.device.type == "meta":
        return
    if int(row_ptr[0]) != 0 or (rows and bool((row_ptr.diff() < 0).any())):
        _fail(layout, "row_ptr does not start at 0 and rise")


Resident = Dense | Codes | TernaryMask | SparseRows | LowRank
LAYOUTS: tuple[type, ...] = (Dense, Codes, TernaryMask, SparseRows, LowRank)
