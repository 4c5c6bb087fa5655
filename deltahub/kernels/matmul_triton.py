"""Triton mixed-batch kernels: out[i] += α_e·x_i Δ_eᵀ for rows grouped by expert, one launch per layout kind.

Rows are sorted by expert on the host; a program takes (a tile of output features, one expert of the
group, a tile of that expert's rows), gathers its rows of x, unpacks Δ's tile in registers and adds into
``out`` (each (row, feature) has one writer: no atomics). This is vLLM's ``lora_shrink`` grid
(research/perf.md §1.6) extended to packed deltas. Packed tiles become exact ``tl.dot`` operands: a
1-bit..4-bit code tile is split into one 0/1 indicator per codebook level (Σ_ℓ cb_ℓ·(x·[code = ℓ])), a
ternary tile is ±1/0, so the only roundings are x's own and the fp32 accumulation; dense and LoRA
tiles are cast to x's type (fp32 operands use ``input_precision="ieee"``). CSR rows are gathered
(no ``tl.dot``). LoRA takes two launches (shrink to the rank, expand), as Punica and vLLM.
The output is rounded once: out ← round(out + α·acc).
"""

from __future__ import annotations

import torch

from deltahub.kernels._triton import LAUNCH, dot_dtype, rounded, tl, triton
from deltahub.kernels.layouts import row_bytes
from deltahub.kernels.stack import ExpertStack, Group

BM, BN, BK = 16, 32, 32  # tl.dot's smallest tiles (16) for decode-size batches; one config (no autotune yet)
BE = 64  # CSR entries per step


@triton.jit
def _rows(ORDER, SEG_START, SEG_COUNT, g, tile, BM: tl.constexpr):
    count = tl.load(SEG_COUNT + g)
    offs = tile * BM + tl.arange(0, BM)
    mm = offs < count
    rows = tl.load(ORDER + tl.load(SEG_START + g) + offs, mask=mm, other=0)
    return rows, mm, tile * BM < count


@triton.jit
def _finish(Y, rows, mm, offs_n, mn, N, acc, scale):
    ptr = Y + rows[:, None] * N + offs_n[None, :]
    m2 = mm[:, None] & mn[None, :]
    y = tl.load(ptr, mask=m2, other=0)
    tl.store(ptr, rounded(y.to(tl.float32) + acc * scale, Y), mask=m2)


@triton.jit
def _codes_mm_kernel(Y, X, ORDER, SEG_START, SEG_COUNT, SCALE, P, BOOK, N, K, BITS: tl.constexpr,
                     DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    g, tile = tl.program_id(1), tl.program_id(2)
    rows, mm, live = _rows(ORDER, SEG_START, SEG_COUNT, g, tile, BM)
    if live:
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = offs_n < N
        rb = (K + 7) // 8
        planes = P + g.to(tl.int64) * BITS * N * rb
        book = BOOK + g.to(tl.int64) * N * (1 << BITS) + offs_n * (1 << BITS)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            mk = kk < K
            x = tl.load(X + rows[:, None] * K + kk[None, :], mask=mm[:, None] & mk[None, :], other=0).to(DOT)
            code = tl.zeros([BK, BN], dtype=tl.int32)
            for j in tl.static_range(BITS):
                byte = tl.load(planes + j * N * rb + offs_n[None, :] * rb + kk[:, None] // 8,
                               mask=mk[:, None] & mn[None, :], other=0).to(tl.int32)
                code |= ((byte >> (kk[:, None] % 8)) & 1) << j
            for lvl in tl.static_range(1 << BITS):
                part = tl.dot(x, (code == lvl).to(DOT), input_precision="ieee")
                acc += part * tl.load(book + lvl, mask=mn, other=0)[None, :]
        _finish(Y, rows, mm, offs_n, mn, N, acc, tl.load(SCALE + g))


@triton.jit
def _mask_mm_kernel(Y, X, ORDER, SEG_START, SEG_COUNT, SCALE, MASK, SIGNS, SIGN_OFF, ROW_PTR, N, K,
                    DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    g, tile = tl.program_id(1), tl.program_id(2)
    rows, mm, live = _rows(ORDER, SEG_START, SEG_COUNT, g, tile, BM)
    if live:
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = offs_n < N
        rb = (K + 7) // 8
        mask = MASK + g.to(tl.int64) * N * rb
        first_bit = tl.load(SIGN_OFF + g) * 8
        carry = tl.load(ROW_PTR + g.to(tl.int64) * (N + 1) + offs_n, mask=mn, other=0)  # signs before each row
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            mk = kk < K
            x = tl.load(X + rows[:, None] * K + kk[None, :], mask=mm[:, None] & mk[None, :], other=0).to(DOT)
            byte = tl.load(mask + offs_n[None, :] * rb + kk[:, None] // 8, mask=mk[:, None] & mn[None, :], other=0)
            bit = (byte.to(tl.int32) >> (kk[:, None] % 8)) & 1
            rank = first_bit + carry[None, :] + tl.cumsum(bit, axis=0) - bit
            kept = bit == 1
            neg = (tl.load(SIGNS + rank // 8, mask=kept, other=0).to(tl.int32) >> (rank % 8).to(tl.int32)) & 1
            acc += tl.dot(x, tl.where(kept, 1 - 2 * neg, 0).to(DOT), input_precision="ieee")
            carry += tl.sum(bit, axis=0)
        _finish(Y, rows, mm, offs_n, mn, N, acc, tl.load(SCALE + g))


@triton.jit
def _csr_mm_kernel(Y, X, ORDER, SEG_START, SEG_COUNT, SCALE, ROW_PTR, COLS, VALUES, VSCALE, N, K,
                   BM: tl.constexpr, BE: tl.constexpr):
    n, g, tile = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    rows, mm, live = _rows(ORDER, SEG_START, SEG_COUNT, g, tile, BM)
    if live:
        k0 = tl.load(ROW_PTR + g.to(tl.int64) * (N + 1) + n)
        k1 = tl.load(ROW_PTR + g.to(tl.int64) * (N + 1) + n + 1)
        s = tl.load(VSCALE + g)
        acc = tl.zeros([BM], dtype=tl.float32)
        for k in range(k0, k1, BE):
            offs = k + tl.arange(0, BE)
            me = offs < k1
            c = tl.load(COLS + offs, mask=me, other=0).to(tl.int64)
            v = tl.load(VALUES + offs, mask=me, other=0).to(tl.float32) * s
            x = tl.load(X + rows[:, None] * K + c[None, :], mask=mm[:, None] & me[None, :], other=0).to(tl.float32)
            acc += tl.sum(x * v[None, :], axis=1)
        ptr = Y + rows * N + n
        y = tl.load(ptr, mask=mm, other=0)
        tl.store(ptr, rounded(y.to(tl.float32) + acc * tl.load(SCALE + g), Y), mask=mm)


@triton.jit
def _dense_mm_kernel(Y, X, ORDER, SEG_START, SEG_COUNT, SCALE, D, N, K, DOT: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
    g, tile = tl.program_id(1), tl.program_id(2)
    rows, mm, live = _rows(ORDER, SEG_START, SEG_COUNT, g, tile, BM)
    if live:
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = offs_n < N
        d = D + g.to(tl.int64) * N * K
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            mk = kk < K
            x = tl.load(X + rows[:, None] * K + kk[None, :], mask=mm[:, None] & mk[None, :], other=0).to(DOT)
            dt = tl.load(d + offs_n[None, :] * K + kk[:, None], mask=mk[:, None] & mn[None, :], other=0).to(DOT)
            acc += tl.dot(x, dt, input_precision="ieee")
        _finish(Y, rows, mm, offs_n, mn, N, acc, tl.load(SCALE + g))


@triton.jit
def _lora_shrink_kernel(T, X, ORDER, SEG_START, SEG_COUNT, U, K, R: tl.constexpr, DOT: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr):
    g, tile = tl.program_id(1), tl.program_id(2)
    rows, mm, live = _rows(ORDER, SEG_START, SEG_COUNT, g, tile, BM)
    if live:
        u = U + g.to(tl.int64) * R * K
        offs_r = tl.arange(0, R)
        acc = tl.zeros([BM, R], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            mk = kk < K
            x = tl.load(X + rows[:, None] * K + kk[None, :], mask=mm[:, None] & mk[None, :], other=0).to(DOT)
            ut = tl.load(u + offs_r[None, :] * K + kk[:, None], mask=mk[:, None], other=0).to(DOT)
            acc += tl.dot(x, ut, input_precision="ieee")
        tl.store(T + rows[:, None] * R + offs_r[None, :], acc, mask=mm[:, None])


@triton.jit
def _lora_expand_kernel(Y, T, ORDER, SEG_START, SEG_COUNT, SCALE, V, N, R: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr):
    g, tile = tl.program_id(1), tl.program_id(2)
    rows, mm, live = _rows(ORDER, SEG_START, SEG_COUNT, g, tile, BM)
    if live:
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = offs_n < N
        offs_r = tl.arange(0, R)
        t = tl.load(T + rows[:, None] * R + offs_r[None, :], mask=mm[:, None], other=0)
        v = tl.load(V + g.to(tl.int64) * N * R + offs_n[None, :] * R + offs_r[:, None], mask=mn[None, :], other=0)
        acc = tl.dot(t, v.to(tl.float32), input_precision="ieee")
        _finish(Y, rows, mm, offs_n, mn, N, acc, tl.load(SCALE + g))


def _segments(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by expert, and each expert's start and count in that order (base rows first)."""
    order = torch.argsort(idx, stable=True)
    live = idx[idx >= 0]
    counts = torch.bincount(live, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts + (idx.numel() - live.numel())
    return order, starts, counts


def mixed_matmul_(out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, stack: ExpertStack,
                  alphas: list[float]) -> None:
    """out (M, N) ← round(out + α_e·x Δ_eᵀ) per row; contiguous x (M, K) and out; idx (M,) int on the device."""
    M, K = x.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return
    x = x.contiguous()
    order, starts, counts = _segments(idx.to(torch.int64), len(stack))
    for group in stack.groups:
        members = torch.tensor(group.members, device=x.device)
        seg_start, seg_count = starts[members].contiguous(), counts[members].contiguous()
        longest = int(seg_count.max())
        if longest == 0:
            continue
        alpha = torch.tensor([alphas[i] for i in group.members], dtype=torch.float32, device=x.device)
        _launch(group, out, x, (order, seg_start, seg_count), alpha, longest, N, K)


def _launch(group: Group, out: torch.Tensor, x: torch.Tensor, seg: tuple, alpha: torch.Tensor, longest: int,
            N: int, K: int) -> None:
    g, m_tiles = len(group.members), triton.cdiv(longest, BM)
    grid = (triton.cdiv(N, BN), g, m_tiles)
    dot, t = dot_dtype(x.dtype), group.tensors
    if group.kind == "codes":
        _codes_mm_kernel[grid](out, x, *seg, alpha, t["planes"], t["book"], N, K, BITS=group.bits, DOT=dot,
                               BM=BM, BN=BN, BK=BK, **LAUNCH)
    elif group.kind == "mask":
        _mask_mm_kernel[grid](out, x, *seg, alpha * t["scale"], t["mask"], t["signs"], t["sign_off"], t["row_ptr"],
                              N, K, DOT=dot, BM=BM, BN=BN, BK=BK, **LAUNCH)
    elif group.kind == "csr":
        _csr_mm_kernel[(N, g, m_tiles)](out, x, *seg, alpha, t["row_ptr"], t["cols"], t["values"], t["scale"], N, K,
                                        BM=BM, BE=BE, **LAUNCH)
    elif group.kind == "dense":
        _dense_mm_kernel[grid](out, x, *seg, alpha, t["values"], N, K, DOT=dot, BM=BM, BN=BN, BK=BK, **LAUNCH)
    else:
        shrunk = torch.empty(x.shape[0], group.rank, dtype=torch.float32, device=x.device)
        _lora_shrink_kernel[(1, g, m_tiles)](shrunk, x, *seg, t["U"], K, R=group.rank, DOT=dot, BM=BM, BK=BK,
                                             **LAUNCH)
        _lora_expand_kernel[grid](out, shrunk, *seg, alpha * t["scale"], t["V"], N, R=group.rank, BM=BM, BN=BN,
                                  **LAUNCH)


def delta_matmul_(out: torch.Tensor, x: torch.Tensor, layout: object, alpha: float) -> None:
    """One expert for every row: the mixed kernels with a one-member stack (views, no copies)."""
    idx = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    mixed_matmul_(out, x, idx, ExpertStack([layout]), [alpha])


__all__ = ["delta_matmul_", "mixed_matmul_", "row_bytes"]
