"""Plain-torch CPU paths: apply a resident layout to a weight in place, and the dense reference.

The rule everywhere (DESIGN §2.3): compute ``w + α·Δ`` in fp32 (fp64 if Δ is fp64) and round once into
the weight's dtype. Work is chunked: allocation and page faults dominate naive whole-tensor code, and
chunks of ~0.5 M elements ran 2-3x faster than whole tensors here (research/perf.md §4.1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deltahub.kernels.layouts import Dense, LowRank, Resident, SignBits, SparseCOO, TernaryPlanes

CHUNK = 1 << 19  # elements per chunk: 2 MB of fp32, fits L2 on the 2-core VM
NNZ_CHUNK = 1 << 16  # sparse entries per chunk

# byte -> its 8 bits as ±1 (little bit order), shared by SignBits and TernaryPlanes.
_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.float32)
_PM1 = _BITS * 2 - 1
# the same ±1 signs as int8, each byte's 8 of them packed into one int64 (memory order kept): a 1-D gather
# of these unpacks 8 signs per index, ~4x faster than gathering rows of _PM1.
_PM1_I64 = _PM1.to(torch.int8).view(torch.int64).reshape(256)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The calling thread's torch ops run single-threaded inside (the count is per thread; ~1 µs).

    A chunk loop is many small ops, and each op as an intra-op parallel region waits for a
    descheduled worker whenever the cores are shared (other processes, the model's own threads): the
    loops ran 3-20x slower with 2 torch threads than with 1 on the loaded 2-core VM. Handing blocks to
    2 single-threaded Python threads instead was no faster than 1 thread there, loaded or not.
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _compute_dtype(delta_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if delta_dtype == torch.float64 else torch.float32


def to_dense(res: Resident) -> torch.Tensor:
    """The delta as a dense fp32 (or fp64) tensor: the reference every fast path is checked against."""
    if isinstance(res, Dense):
        return res.values.to(_compute_dtype(res.values.dtype))
    if isinstance(res, SparseCOO):
        out = torch.zeros(math.prod(res.shape), dtype=torch.float32, device=res.values.device)
        out[res.indices.long()] = res.values.to(torch.float32) * res.scale
        return out.view(res.shape)
    if isinstance(res, SignBits):
        rows = res.shape[0] if res.shape else 1
        cols = (res.bits.shape[1] * 8) if rows else 0
        n_cols = math.prod(res.shape) // max(rows, 1)
        signs = _PM1[res.bits.long()].reshape(rows, cols)[:, :n_cols]
        return (signs * res.scale.view(-1, 1) + res.offset.view(-1, 1)).reshape(res.shape)
    if isinstance(res, TernaryPlanes):
        n = math.prod(res.shape)
        plus = _BITS[res.plus.long()].reshape(-1)[:n]
        minus = _BITS[res.minus.long()].reshape(-1)[:n]
        return ((plus - minus) * res.scale).reshape(res.shape)
    if isinstance(res, LowRank):
        return (res.scale * (res.B.float() @ res.A.float())).reshape(res.shape)
    raise TypeError(f"unknown resident layout {type(res).__name__}")



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
        delta = to_dense(res)
        weight.copy_((weight.to(delta.dtype) + alpha * delta).to(weight.dtype))
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
    # In blocks of NNZ_CHUNK entries through preallocated buffers: whole-nnz temporaries (the scaled
    # values, the gathered weights) cost more in page faults than the arithmetic (research/perf.md §4.1).
    idx, values, nnz = res.indices, res.values, res.indices.numel()
    n = min(NNZ_CHUNK, nnz)
    vals = torch.empty(n, dtype=torch.float32, device=flat.device)
    gathered = None if flat.dtype == torch.float32 else torch.empty(n, dtype=flat.dtype, device=flat.device)
    wide = None if gathered is None else torch.empty(n, dtype=torch.float32, device=flat.device)
    long_idx = None if gathered is None or idx.dtype == torch.int64 else torch.empty(n, dtype=torch.int64,
                                                                                      device=flat.device)
    with _one_thread():
        for a in range(0, nnz, NNZ_CHUNK):
            b = min(nnz, a + NNZ_CHUNK)
            m = b - a
            i = idx[a:b]
            v = vals[:m]
            v.copy_(values[a:b])
            v.mul_(res.scale)  # the reference's steps: fp32(values) * scale, then * alpha
            if alpha != 1.0:
                v.mul_(alpha)
            if gathered is None or wide is None:
                flat.index_add_(0, i, v)  # unique indices: each element w + v, rounded once
                continue
            if long_idx is not None:  # index_copy_ takes int64 only
                i = long_idx[:m]
                i.copy_(idx[a:b])
            g, f = gathered[:m], wide[:m]
            torch.index_select(flat, 0, i, out=g)
            f.copy_(g)
            f.add_(v)
            g.copy_(f)
            flat.index_copy_(0, i, g)
    return weight


def _apply_signbits(weight: torch.Tensor, res: SignBits, alpha: float) -> torch.Tensor:
    # Unpack one byte -> 8 int8 signs with a 1-D int64 gather (_PM1_I64), widen to fp32, then
    # w + (±1)·(α·s): the product is exact, so addcmul's single rounding equals the reference's
    # round(w + α·(±s)). Rows in blocks of ~CHUNK elements through preallocated buffers.
    rows = res.shape[0] if res.shape else 1
    w2 = weight.view(rows, -1)
    cols = w2.shape[1]
    nb = res.bits.shape[-1] if res.bits.dim() else 0
    bits = res.bits.reshape(rows, nb)
    step = max(1, CHUNK // max(8 * nb, 1))
    scale = res.scale.to(torch.float32).expand(rows).reshape(rows, 1)
    offset = res.offset.to(torch.float32).expand(rows).reshape(rows, 1)
    plain = not bool(offset.any())  # Δ = ±s exactly: fold α into the scale (α·(±s) = ±(α·s))
    if plain and alpha != 1.0:
        scale = alpha * scale
    lut = _PM1_I64.to(weight.device)
    n = min(step, rows)
    idx = torch.empty(n * nb, dtype=torch.int32, device=weight.device)
    packed = torch.empty(n * nb, dtype=torch.int64, device=weight.device)
    signs = torch.empty(n, nb * 8, dtype=torch.float32, device=weight.device)
    wide = None if weight.dtype == torch.float32 else torch.empty(n, cols, dtype=torch.float32, device=weight.device)
    with _one_thread():
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            m = r1 - r0
            i, p = idx[:m * nb], packed[:m * nb]
            i.copy_(bits[r0:r1].reshape(-1))
            torch.index_select(lut, 0, i, out=p)
            d = signs[:m]
            d.view(-1).copy_(p.view(torch.int8))
            d = d[:, :cols]
            w = w2[r0:r1]
            acc = w if wide is None else wide[:m]
            if wide is not None:
                acc.copy_(w)
            if plain:
                acc.addcmul_(d, scale[r0:r1])
            else:  # the reference's own steps: (±1·s + offset), times α, then added
                d.mul_(scale[r0:r1]).add_(offset[r0:r1])
                if alpha != 1.0:
                    d.mul_(alpha)
                acc.add_(d)
            if wide is not None:
                w.copy_(acc)
    return weight
