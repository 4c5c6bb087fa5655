"""Plain-torch CPU paths: apply a resident layout to a weight in place, and the dense reference.

The rule everywhere (DESIGN §2.3): compute ``w + α·Δ`` in fp32 (fp64 if Δ is fp64) and round once into
the weight's dtype. Work is chunked: allocation and page faults dominate naive whole-tensor code, and
chunks of ~0.5 M elements ran 2-3x faster than whole tensors here (research/perf.md §4.1).
"""

from __future__ import annotations

import torch

from deltahub.kernels.layouts import Dense, LowRank, Resident, SignBits, SparseCOO, TernaryPlanes

CHUNK = 1 << 19  # elements per chunk: 2 MB of fp32, fits L2 on the 2-core VM

# byte -> its 8 bits as ±1 (little bit order), shared by SignBits and TernaryPlanes.
_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.float32)
_PM1 = _BITS * 2 - 1


def _compute_dtype(delta_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if delta_dtype == torch.float64 else torch.float32


def to_dense(res: Resident) -> torch.Tensor:
    """The delta as a dense fp32 (or fp64) tensor: the reference every fast path is checked against."""
    if isinstance(res, Dense):
        return res.values.to(_compute_dtype(res.values.dtype))
    if isinstance(res, SparseCOO):
        n = 1
        for s in res.shape:
            n *= s
        out = torch.zeros(n, dtype=torch.float32, device=res.values.device)
        out[res.indices.long()] = res.values.to(torch.float32) * res.scale
        return out.view(res.shape)
    if isinstance(res, SignBits):
        rows = res.shape[0] if res.shape else 1
        cols = (res.bits.shape[1] * 8) if rows else 0
        n_cols = _numel(res.shape) // max(rows, 1)
        signs = _PM1[res.bits.long()].reshape(rows, cols)[:, :n_cols]
        return (signs * res.scale.view(-1, 1) + res.offset.view(-1, 1)).reshape(res.shape)
    if isinstance(res, TernaryPlanes):
        n = _numel(res.shape)
        plus = _BITS[res.plus.long()].reshape(-1)[:n]
        minus = _BITS[res.minus.long()].reshape(-1)[:n]
        return ((plus - minus) * res.scale).reshape(res.shape)
    if isinstance(res, LowRank):
        return (res.scale * (res.B.float() @ res.A.float())).reshape(res.shape)
    raise TypeError(f"unknown resident layout {type(res).__name__}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@torch.no_grad()
def apply_(weight: torch.Tensor, res: Resident, *, alpha: float = 1.0) -> torch.Tensor:
    """``weight ← round(weight + α·Δ)`` in place; returns ``weight``.

    Raises:
        ValueError: the layout's shape differs from the weight's.
    """
    if tuple(weight.shape) != tuple(res.shape):
        raise ValueError(f"delta shape {tuple(res.shape)} does not match weight shape {tuple(weight.shape)}")
    flat = weight.view(-1) if weight.is_contiguous() else None
    if flat is None:  # rare (transposed views); fall back to the reference path
        weight.copy_(_round(weight.to(torch.float32) + alpha * to_dense(res), weight.dtype))
        return weight
    if isinstance(res, SparseCOO):
        return _apply_sparse(weight, flat, res, alpha)
    if isinstance(res, Dense):
        _apply_dense(flat, res.values.reshape(-1), alpha)
        return weight
    if isinstance(res, SignBits):
        return _apply_signbits(weight, res, alpha)
    _apply_dense(flat, to_dense(res).reshape(-1), alpha)
    return weight


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def _apply_dense(flat: torch.Tensor, delta: torch.Tensor, alpha: float) -> None:
    cdt = _compute_dtype(delta.dtype)
    if flat.dtype == cdt and alpha == 1.0:
        flat.add_(delta)  # already the compute dtype: one rounding, no temporaries
        return
    for start in range(0, flat.numel(), CHUNK):
        w = flat[start:start + CHUNK]
        d = delta[start:start + CHUNK].to(cdt)
        w.copy_(w.to(cdt).add_(d, alpha=alpha) if alpha != 1.0 else w.to(cdt).add_(d))


def _apply_sparse(weight: torch.Tensor, flat: torch.Tensor, res: SparseCOO, alpha: float) -> torch.Tensor:
    vals = res.values.to(torch.float32) * (res.scale * alpha)
    if flat.dtype == torch.float32:
        flat.index_add_(0, res.indices, vals)  # unique indices: each element rounded once
        return weight
    idx = res.indices
    flat[idx] = (flat[idx].to(torch.float32) + vals).to(flat.dtype)
    return weight


def _apply_signbits(weight: torch.Tensor, res: SignBits, alpha: float) -> torch.Tensor:
    rows = res.shape[0]
    w2 = weight.view(rows, -1)
    cols = w2.shape[1]
    step = max(1, CHUNK // max(cols, 1))
    scale = res.scale.to(torch.float32).expand(rows) * alpha
    offset = res.offset.to(torch.float32).expand(rows) * alpha
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        signs = _PM1[res.bits[r0:r1].long()].reshape(r1 - r0, -1)[:, :cols]
        delta = signs.mul_(scale[r0:r1, None]).add_(offset[r0:r1, None])
        w = w2[r0:r1]
        w.copy_(w.to(torch.float32).add_(delta))
    return weight
