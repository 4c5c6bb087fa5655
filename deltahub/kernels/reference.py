"""Plain-torch references of every kernel operation, written from the math of each layout.

Like flash-linear-attention's ``naive.py``: whole-tensor, obviously correct, slow, device-agnostic (every
index and table is built on the layout's own device), and never edited to match a fast path. The fast
paths (``apply.py``, ``matmul.py``, the compiled CPU kernels, the Triton kernels) are tested against them.

Numerics (DESIGN §2.3). The compute dtype c is fp64 when the weight, the input or the layout holds fp64,
else fp32. ``apply_``: W ← round_W(W_c + α_c·Δ_c), where α_c·Δ_c is one fp32 (or fp64) product and the
sum is rounded once into W's dtype. ``delta_matmul``: out ← round_out(out_c + α_c·(x_c Δ₂ᵀ)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltahub.kernels.layouts import Codes, Dense, LowRank, Resident, SparseRows, TernaryMask


def _bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack the last dim of a little-bit-order uint8 tensor into n int64 0/1 values."""
    col = torch.arange(n, device=packed.device)
    return (packed.long()[..., col // 8] >> (col % 8)) & 1


def to_dense(layout: Resident) -> torch.Tensor:
    """Δ as a dense tensor of the layout's shape, in its compute dtype (fp32, or fp64)."""
    c = layout.compute_dtype
    rows, cols = layout.matrix
    if isinstance(layout, Dense):
        return layout.values.to(c)
    if isinstance(layout, Codes):
        code = torch.zeros(rows, cols, dtype=torch.long, device=layout.device)
        for j in range(layout.bits):
            code += _bits(layout.planes[j], cols) << j
        book = layout.codebook.expand(rows, -1)
        return torch.gather(book, 1, code).to(c).reshape(layout.shape)
    if isinstance(layout, TernaryMask):
        kept = _bits(layout.mask, cols).reshape(-1)
        zero = torch.zeros((), dtype=c, device=layout.device)
        nbits = 8 * layout.signs.numel()  # shapes only, no .item(): runs on any device, meta included
        if nbits == 0:
            return torch.zeros(layout.shape, dtype=c, device=layout.device)
        rank = (torch.cumsum(kept, 0) - 1).clamp(0, nbits - 1)  # k of the k-th kept entry, row-major
        sign = _bits(layout.signs, nbits)[rank]
        value = torch.tensor(layout.scale, dtype=c, device=layout.device) * (1 - 2 * sign).to(c)
        return torch.where(kept.bool(), value, zero).reshape(layout.shape)
    if isinstance(layout, SparseRows):
        k = torch.arange(layout.nnz, device=layout.device)
        row = torch.searchsorted(layout.row_ptr.long(), k, right=True) - 1
        col = layout.cols.to(torch.int32).long()
        out = torch.zeros(rows, cols, dtype=c, device=layout.device)
        out[row, col] = layout.values.to(c) * torch.tensor(layout.scale, dtype=c, device=layout.device)
        return out.reshape(layout.shape)
    if isinstance(layout, LowRank):
        prod = torch.tensor(layout.scale, dtype=c, device=layout.device) * (layout.B.to(c) @ layout.A.to(c))
        return (prod.T if layout.transposed else prod).reshape(layout.shape)
    raise TypeError(f"not a resident layout: {type(layout).__name__}")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def apply_(weight: torch.Tensor, layout: Resident, alpha: float = 1.0) -> torch.Tensor:
    """W ← round(W + α·Δ), one rounding into W's dtype; in place, returns ``weight``."""
    c = compute_dtype(weight.dtype, layout.compute_dtype)
    term = to_dense(layout).to(c) * torch.tensor(alpha, dtype=c, device=weight.device)
    weight.copy_((weight.to(c) + term).to(weight.dtype))
    return weight


def delta_matmul(x: torch.Tensor, layout: Resident, alpha: float = 1.0,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """out ← round(out + α·x Δ₂ᵀ) (``out`` None: a new tensor of x's dtype holding α·x Δ₂ᵀ)."""
    rows, cols = layout.matrix
    c = compute_dtype(x.dtype, layout.compute_dtype)
    term = (x.to(c) @ to_dense(layout).to(c).reshape(rows, cols).T) * torch.tensor(alpha, dtype=c, device=x.device)
    if out is None:
        return term.to(x.dtype)
    out.copy_((out.to(c) + term).to(out.dtype))
    return out


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, experts: Sequence[Resident | None], index: torch.Tensor,
                 alphas: Sequence[float] | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Row i: F.linear(x_i, W, b) + α_e·x_i Δ_eᵀ with e = index[i] (−1: the base alone), rows in any order."""
    y = torch.nn.functional.linear(x, weight, bias)
    for i in range(x.shape[0]):
        e = int(index[i])
        if e >= 0 and experts[e] is not None:
            delta_matmul(x[i:i + 1], experts[e], 1.0 if alphas is None else float(alphas[e]), out=y[i:i + 1])
    return y
