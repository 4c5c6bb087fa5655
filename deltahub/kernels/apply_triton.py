"""Triton ``apply_`` kernels: W ← round(W + α·Δ) in place, one program per row (block), Δ unpacked in registers.

Scalars that take part in the arithmetic (α·codebook, α·scale, α) are computed on the host by torch in
the reference's dtypes and passed as one-element device tensors, so the kernels make exactly the
reference's roundings. As the C kernels, the mask and CSR kernels write only the entries Δ touches.
``LowRank`` is two matmuls: the torch path (cuBLAS) serves it.
"""

from __future__ import annotations

import torch

from deltahub.kernels._triton import LAUNCH, compute, rounded, tl, triton
from deltahub.kernels.layouts import Codes, Dense, LowRank, Resident, SparseRows, TernaryMask, row_bytes
from deltahub.kernels.reference import compute_dtype

BLOCK = 1024  # elements a program step: 4 KB of fp32, 8 warps of 128-bit loads


@triton.jit
def _apply_dense_kernel(W, D, ALPHA, n, C: tl.constexpr, ALPHA_ONE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d = tl.load(D + offs, mask=m, other=0).to(C)
    if not ALPHA_ONE:
        d = d * tl.load(ALPHA)
    w = tl.load(W + offs, mask=m)
    tl.store(W + offs, rounded(w.to(C) + d, W), mask=m)


@triton.jit
def _apply_codes_kernel(W, P, TABLE, cols, plane_stride, table_stride, C: tl.constexpr, BITS: tl.constexpr,
                        BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < cols
    rb = (cols + 7) // 8
    code = tl.zeros([BLOCK], dtype=tl.int32)
    for j in tl.static_range(BITS):
        byte = tl.load(P + j * plane_stride + r * rb + offs // 8, mask=m, other=0).to(tl.int32)
        code |= ((byte >> (offs % 8)) & 1) << j
    t = tl.load(TABLE + r * table_stride + code, mask=m, other=0)  # α·codebook, already in C
    w = tl.load(W + r * cols + offs, mask=m)
    tl.store(W + r * cols + offs, rounded(w.to(C) + t, W), mask=m)


@triton.jit
def _apply_mask_kernel(W, MASK, SIGNS, ROW_PTR, T, cols, C: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    rb = (cols + 7) // 8
    t = tl.load(T)  # fp32(scale)·α in C
    k = tl.load(ROW_PTR + r).to(tl.int64)  # kept entries before this row: the first sign bit of the row
    for c0 in range(0, cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = offs < cols
        bit = (tl.load(MASK + r * rb + offs // 8, mask=m, other=0).to(tl.int32) >> (offs % 8)) & 1
        rank = k + tl.cumsum(bit, axis=0) - bit  # exclusive prefix: the sign index of each kept column
        kept = m & (bit == 1)
        neg = (tl.load(SIGNS + rank // 8, mask=kept, other=0).to(tl.int32) >> (rank % 8).to(tl.int32)) & 1
        w = tl.load(W + r * cols + offs, mask=kept)
        tl.store(W + r * cols + offs, rounded(w.to(C) + tl.where(neg == 1, -t, t), W), mask=kept)
        k += tl.sum(bit, axis=0)


@triton.jit
def _apply_csr_kernel(W, ROW_PTR, COLS, VALUES, S, ALPHA, cols, C: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    k0 = tl.load(ROW_PTR + r).to(tl.int64)
    k1 = tl.load(ROW_PTR + r + 1).to(tl.int64)
    s = tl.load(S)  # fp32 scale
    a = tl.load(ALPHA)  # α in C
    for k in range(k0, k1, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        m = offs < k1
        c = tl.load(COLS + offs, mask=m, other=0).to(tl.int64)
        d = tl.load(VALUES + offs, mask=m, other=0).to(tl.float32) * s  # Δ in fp32, as the layout computes it
        w = tl.load(W + r * cols + c, mask=m)
        tl.store(W + r * cols + c, rounded(w.to(C) + d.to(C) * a, W), mask=m)


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([value], dtype=dtype, device=device)


def apply_(w: torch.Tensor, layout: Resident, alpha: float) -> None:
    """Launch the kernel for ``layout`` on a contiguous, non-empty ``w`` (checked by the caller)."""
    rows, cols = layout.matrix
    c = compute_dtype(w.dtype, layout.compute_dtype)
    tc = compute(c)
    dev = w.device
    if isinstance(layout, Dense):
        n = w.numel()
        _apply_dense_kernel[(triton.cdiv(n, BLOCK),)](w, layout.values, _scalar(alpha, c, dev), n, C=tc,
                                                      ALPHA_ONE=alpha == 1.0, BLOCK=BLOCK, **LAUNCH)
    elif isinstance(layout, Codes):
        table = (layout.codebook.to(c) * torch.tensor(alpha, dtype=c, device=dev)).contiguous()
        grid = (rows, triton.cdiv(cols, BLOCK))
        _apply_codes_kernel[grid](w, layout.planes, table, cols, rows * row_bytes(cols),
                                  0 if table.shape[0] == 1 else table.shape[1], C=tc, BITS=layout.bits, BLOCK=BLOCK,
                                  **LAUNCH)
    elif isinstance(layout, TernaryMask):
        t = _scalar(layout.scale, torch.float32, dev).to(c) * torch.tensor(alpha, dtype=c, device=dev)
        _apply_mask_kernel[(rows,)](w, layout.mask, layout.signs, layout.row_ptr, t, cols, C=tc, BLOCK=BLOCK,
                                    **LAUNCH)
    elif isinstance(layout, SparseRows):
        _apply_csr_kernel[(rows,)](w, layout.row_ptr, layout.cols, layout.values,
                                   _scalar(layout.scale, torch.float32, dev), _scalar(alpha, c, dev), cols, C=tc,
                                   BLOCK=256, **LAUNCH)
    elif isinstance(layout, LowRank):
        from deltahub.kernels.apply import _torch_apply

        _torch_apply(w, layout, alpha)
    else:
        raise TypeError(f"no Triton apply kernel for {type(layout).__name__}")
