"""Row gathers and transposes of resident layouts, for embeddings and GPT-2 ``Conv1D`` in mixed batches.

An embedding lookup reads rows of W, so an expert's term for token ids ``t`` is α·Δ[t]: :func:`delta_rows`
gathers those rows from the packed form without building Δ (a MiniLM embedding delta is 11.7 M entries; a
batch reads a few hundred rows). ``Conv1D`` computes x·W with W of shape (in, out), the transpose of
``nn.Linear``; the kernels compute x·Δᵀ, so :func:`transpose` repacks Δᵀ once, at load, in the same kind.
The reference for both is :func:`deltahub.kernels.reference.to_dense`.
"""

from __future__ import annotations

import torch

from deltahub.kernels.layouts import Codes, Dense, LowRank, Resident, SparseRows, TernaryMask, matrix_shape
from deltahub.kernels.pack import codes_layout, pack_rows, sparse_rows, ternary_mask
from deltahub.kernels.reference import _bits, to_dense


def _scalar(v: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(v, dtype=dtype, device=device)


@torch.no_grad()
def delta_rows(layout: Resident, ids: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """α·Δ[ids] of a 2-D view of Δ, shape (len(ids), cols), in the layout's compute dtype.

    Each value is the reference's α·Δ (one product per entry), so ``W₀[t] + delta_rows(L, t)`` rounded to
    W's dtype equals the row of ``apply_(W₀, L)``: bit-exact embedding lookups in mixed batches.
    """
    rows, cols = matrix_shape(layout.shape)
    c, dev = layout.compute_dtype, layout.device
    ids = ids.reshape(-1).to(device=dev, dtype=torch.long)
    a = _scalar(alpha, c, dev)
    if isinstance(layout, Dense):
        return layout.values.reshape(rows, cols).index_select(0, ids).to(c) * a
    if isinstance(layout, Codes):
        code = sum(_bits(layout.planes[j].index_select(0, ids), cols) << j for j in range(layout.bits))
        book = layout.codebook.to(c) * a
        book = book.index_select(0, ids) if book.shape[0] > 1 else book.expand(ids.numel(), -1)
        return torch.gather(book, 1, code)
    if isinstance(layout, TernaryMask):
        kept = _bits(layout.mask.index_select(0, ids), cols)  # (n, cols) 0/1
        k = layout.row_ptr.long().index_select(0, ids)[:, None] + torch.cumsum(kept, 1) - 1
        k = k.clamp(0, max(8 * layout.signs.numel() - 1, 0))
        neg = (layout.signs.long()[k // 8] >> (k % 8)) & 1 if layout.signs.numel() else torch.zeros_like(k)
        t = _scalar(layout.scale, torch.float32, dev).to(c) * a
        return torch.where(kept.bool(), torch.where(neg.bool(), -t, t), torch.zeros((), dtype=c, device=dev))
    if isinstance(layout, SparseRows):
        ptr = layout.row_ptr.long()
        start, count = ptr.index_select(0, ids), ptr.diff().index_select(0, ids)
        out_row = torch.repeat_interleave(torch.arange(ids.numel(), device=dev), count)
        first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        k = torch.repeat_interleave(start, count) + torch.arange(out_row.numel(), device=dev) - first
        out = torch.zeros(ids.numel(), cols, dtype=c, device=dev)
        vals = layout.values.index_select(0, k).to(torch.float32) * _scalar(layout.scale, torch.float32, dev)
        out[out_row, layout.cols.to(torch.int32).long()[k]] = vals.to(c) * a
        return out
    if isinstance(layout, LowRank):
        A, B = layout.A.to(c), layout.B.to(c)
        d = A.index_select(1, ids).T @ B.T if layout.transposed else B.index_select(0, ids) @ A
        return (_scalar(layout.scale, c, dev) * d) * a
    raise TypeError(f"not a resident layout: {type(layout).__name__}")


@torch.no_grad()
def transpose(layout: Resident) -> Resident:
    """The layout of Δᵀ (a 2-D Δ), in the same kind where the kind can hold it.

    ``Codes`` with one codebook per row becomes ``Dense`` fp32 (its rows turn into columns, which no
    layout indexes); every other case keeps its kind and size. Values are moved, never recomputed, so
    ``to_dense(transpose(L)) == to_dense(L).T`` exactly.
    """
    if len(layout.shape) != 2:
        raise ValueError(f"transpose needs a 2-D delta, got shape {list(layout.shape)}")
    rows, cols = layout.shape
    shape_t = (cols, rows)
    dev = layout.device
    if isinstance(layout, Dense):
        return Dense(layout.values.T.contiguous())
    if isinstance(layout, LowRank):
        return LowRank(layout.A, layout.B, layout.scale, shape_t, transposed=not layout.transposed)
    if isinstance(layout, Codes):
        if layout.codebook.shape[0] > 1:
            return Dense(to_dense(layout).T.contiguous())
        code = sum(_bits(layout.planes[j].cpu(), cols) << j for j in range(layout.bits))
        return codes_layout(code.T.contiguous(), layout.bits, layout.codebook.cpu(), shape_t).to(dev)
    if isinstance(layout, TernaryMask):
        dense_t = to_dense(layout.to("cpu")).T.reshape(-1)
        pos = torch.nonzero(dense_t).reshape(-1)
        signs = pack_rows((dense_t[pos] < 0).reshape(1, -1))[0] if pos.numel() else torch.zeros(0, dtype=torch.uint8)
        return ternary_mask(pos, signs, layout.scale, shape_t).to(dev)
    if isinstance(layout, SparseRows):
        cpu = layout.to("cpu")
        row = torch.repeat_interleave(torch.arange(rows), cpu.row_ptr.long().diff())
        pos_t = cpu.cols.to(torch.int32).long() * rows + row
        order = torch.argsort(pos_t)
        return sparse_rows(pos_t[order], cpu.values[order], layout.scale, shape_t).to(dev)
    raise TypeError(f"not a resident layout: {type(layout).__name__}")
