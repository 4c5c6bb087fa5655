"""Builders that turn decoded codec data (flat positions, codes, signs) into packed resident layouts.

CPU work done once per expert at load time (numpy's packbits runs at ~12 Gparam/s here,
research/perf.md §4.1), so a codec's ``to_resident`` stays a few lines.
"""

from __future__ import annotations

import numpy as np
import torch

from deltahub.kernels.layouts import Codes, SparseRows, TernaryMask, matrix_shape, row_bytes


def pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) 0/1 tensor packed along each row, little bit order, zero padding: (rows, ceil(cols/8))."""
    a = bits.detach().cpu().numpy().astype(np.bool_, copy=False)
    return torch.from_numpy(np.packbits(a, axis=-1, bitorder="little")).reshape(a.shape[0], row_bytes(a.shape[1]))


def codes_layout(codes: torch.Tensor, bits: int, codebook: torch.Tensor, shape: tuple[int, ...]) -> Codes:
    """``Codes`` from integer codes of every entry (any shape with ``numel(shape)`` elements)."""
    rows, cols = matrix_shape(shape)
    c = codes.reshape(rows, cols).to(torch.int64)
    planes = torch.stack([pack_rows((c >> j) & 1) for j in range(bits)]) if rows else \
        torch.zeros(bits, 0, row_bytes(cols), dtype=torch.uint8)
    return Codes(planes.contiguous(), codebook.to(torch.float32).reshape(-1, 1 << bits).contiguous(), tuple(shape))


def sign_plane(flat_packed: torch.Tensor, bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The (1, rows, ceil(cols/8)) plane of a flat LSB-first bit stream: zero-copy when rows are whole bytes."""
    rows, cols = matrix_shape(shape)
    if cols % 8 == 0:
        return flat_packed.reshape(1, rows, cols // 8).contiguous()
    return pack_rows(bits.reshape(rows, cols)).unsqueeze(0)


def _row_ptr(positions: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    counts = np.bincount(positions // max(cols, 1), minlength=rows) if positions.size else np.zeros(rows, np.int64)
    ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return torch.from_numpy(ptr.astype(np.int32 if positions.size < 2**31 else np.int64))


def ternary_mask(positions: torch.Tensor, signs: torch.Tensor, scale: float, shape: tuple[int, ...]) -> TernaryMask:
    """``TernaryMask`` from sorted flat positions and their packed sign stream (bit 1 = negative)."""
    rows, cols = matrix_shape(shape)
    pos = positions.cpu().numpy().astype(np.int64, copy=False)
    keep = np.zeros(rows * cols, dtype=np.bool_)
    keep[pos] = True
    mask = torch.from_numpy(np.packbits(keep.reshape(rows, cols), axis=1, bitorder="little"))
    return TernaryMask(mask.reshape(rows, row_bytes(cols)), signs.contiguous(), _row_ptr(pos, rows, cols), scale,
                       tuple(shape))


def sparse_rows(positions: torch.Tensor, values: torch.Tensor, scale: float, shape: tuple[int, ...]) -> SparseRows:
    """``SparseRows`` (CSR) from sorted flat positions and the values there."""
    rows, cols = matrix_shape(shape)
    pos = positions.cpu().numpy().astype(np.int64, copy=False)
    c = pos % max(cols, 1)
    col_t = torch.from_numpy(c.astype(np.uint16)) if cols <= 1 << 16 else torch.from_numpy(c.astype(np.int32))
    return SparseRows(_row_ptr(pos, rows, cols), col_t, values.contiguous(), scale, tuple(shape))


def ternary_layout(positions: torch.Tensor, signs: torch.Tensor, scale: float,
                   shape: tuple[int, ...]) -> TernaryMask | SparseRows:
    """The smaller of ``TernaryMask`` (1 + d bits/param) and ``SparseRows`` with int8 ±1 (≈ 24·d) for these signs.

    The crossover is d ≈ 1/23 (4.3%) on wide matrices: below it the CSR form is smaller.
    """
    rows, cols = matrix_shape(shape)
    nnz = positions.numel()
    mask_bytes = rows * row_bytes(cols) + row_bytes(nnz)
    csr_bytes = nnz * (1 + (2 if cols <= 1 << 16 else 4))
    if mask_bytes <= csr_bytes:
        return ternary_mask(positions, signs, scale, shape)
    bits = np.unpackbits(signs.cpu().numpy(), count=nnz, bitorder="little")
    values = torch.from_numpy((1 - 2 * bits.astype(np.int8)).astype(np.int8))
    return sparse_rows(positions, values, scale, shape)
