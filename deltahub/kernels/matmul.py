"""``delta_matmul`` (out += α·x Δ₂ᵀ without a dense Δ) and mixed-expert batches (one expert per row).

A mixed batch is the base GEMM once for every row, then each row's expert term (research/perf.md §1:
every prior system keeps the delta path separate from the base GEMM). On CUDA the Triton kernels run one
launch per layout kind present, whatever the number of experts; on CPU each expert present takes its rows
(experts applied on the fly are the GPU's game; on CPU merging wins, perf.md §2.4). Numerics: the term is
computed in fp32 (fp64 with fp64 inputs) and added to ``out`` with one rounding, as
:func:`deltahub.kernels.reference.delta_matmul`; matmuls sum in the BLAS's order, so results agree with
the reference within a tolerance, not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from deltahub.errors import LayoutError
from deltahub.kernels import backends
from deltahub.kernels.apply import block_rows, block_term, compiled_rows
from deltahub.kernels.layouts import LAYOUTS, Dense, LowRank, Resident
from deltahub.kernels.reference import compute_dtype

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x: torch.Tensor, layout: Resident, out: torch.Tensor | None) -> None:
    if not isinstance(layout, LAYOUTS):
        raise LayoutError(f"{type(layout).__name__} is not a resident layout.")
    rows, cols = layout.matrix
    if x.dtype not in FLOATS or x.dim() == 0 or x.shape[-1] != cols:
        raise LayoutError(f"x must be a float tensor (..., {cols}) for a delta of shape {list(layout.shape)}, "
                          f"got {x.dtype} {list(x.shape)}.")
    if x.device != layout.device:
        raise LayoutError(f"x is on {x.device} and the delta on {layout.device}; move one with .to().")
    if out is not None and (tuple(out.shape) != (*x.shape[:-1], rows) or out.device != x.device
                            or out.dtype not in FLOATS):
        raise LayoutError(f"out must be a float tensor {[*x.shape[:-1], rows]} on {x.device}, "
                          f"got {out.dtype} {list(out.shape)}.")


@torch.no_grad()
def delta_matmul(x: torch.Tensor, layout: Resident, *, alpha: float = 1.0, out: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """``out ← round(out + α·x Δ₂ᵀ)``; with ``out=None`` a new tensor of x's dtype holding α·x Δ₂ᵀ.

    Args:
        x: (..., cols) with cols = prod(shape[1:]) of the delta (the in-features of a linear layer).
        layout: a resident layout on x's device.
        alpha: scale of Δ.
        out: (..., rows) accumulated in place, any float dtype.
        backend: ``auto``/``torch``/``compiled``/``triton``; None reads DELTAHUB_KERNEL_BACKEND.

    Raises:
        LayoutError: shapes, dtypes or devices do not fit.
        KernelError: an explicit backend that cannot run here.
    """
    _check(x, layout, out)
    rows, cols = layout.matrix
    m = math.prod(x.shape[:-1])  # not reshape(-1, cols): ambiguous when cols = 0
    x2 = x.reshape(m, cols)
    which = backends.select(x.device, backend)
    if which == "triton":
        from deltahub.kernels import matmul_triton

        target = torch.zeros(x2.shape[0], rows, dtype=x.dtype, device=x.device) if out is None \
            else out.reshape(m, rows).contiguous()
        matmul_triton.delta_matmul_(target, x2, layout, float(alpha))
        if out is None:
            return target.reshape(*x.shape[:-1], rows)
        return out.copy_(target.reshape(out.shape)) if target.data_ptr() != out.data_ptr() else out
    term = _term(x2, layout, float(alpha), which)
    if out is None:
        return term.to(x.dtype).reshape(*x.shape[:-1], rows)
    target = out.reshape(m, rows)
    target.copy_((target.to(term.dtype) + term).to(out.dtype))
    if target.data_ptr() != out.data_ptr():  # reshape copied a non-contiguous out
        out.copy_(target.reshape(out.shape))
    return out


def _term(x2: torch.Tensor, layout: Resident, alpha: float, which: str) -> torch.Tensor:
    """α·x Δ₂ᵀ in the compute dtype, Δ decoded one block of rows at a time."""
    rows, cols = layout.matrix
    c = compute_dtype(x2.dtype, layout.compute_dtype)
    xc = x2.to(c)
    a = torch.tensor(alpha, dtype=c, device=x2.device)
    if isinstance(layout, LowRank):
        cl = layout.compute_dtype
        A, B = layout.A.to(cl).to(c), layout.B.to(cl).to(c)
        t = (xc @ B) @ A if layout.transposed else (xc @ A.T) @ B.T
        return t * torch.tensor(layout.scale, dtype=cl, device=x2.device).to(c) * a
    term = torch.empty(x2.shape[0], rows, dtype=c, device=x2.device)
    step = block_rows(layout)
    buf = None
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if isinstance(layout, Dense):
            block = layout.values.reshape(rows, cols)[r0:r1].to(c)
        elif which == "compiled":
            buf = torch.empty(step, cols, dtype=c, device=x2.device) if buf is None else buf
            block = buf[:r1 - r0].zero_()
            compiled_rows(block, layout, 1.0, r0, r1, w_row0=r0)  # 0 + Δ: the block of Δ exactly
        else:
            block = block_term(layout, r0, r1, c, 1.0)
        term[:, r0:r1] = xc @ block.T
    return term.mul_(a)


def _row_experts(index: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """The expert of every row of x: ``index`` covers the leading dims (per token) or a prefix (per sequence)."""
    idx = torch.as_tensor(index)
    if idx.dim() > len(lead) or tuple(lead[:idx.dim()]) != tuple(idx.shape) or idx.dtype.is_floating_point:
        raise LayoutError(f"index must be an integer tensor of shape {list(lead)} or a prefix of it, "
                          f"got {idx.dtype} {list(idx.shape)}.")
    return idx.reshape(*idx.shape, *([1] * (len(lead) - idx.dim()))).expand(*lead).reshape(-1)


@torch.no_grad()
def mixed_matmul_(out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, experts: Sequence[Resident | None], *,
                  alphas: Sequence[float] | None = None, backend: str | None = None) -> torch.Tensor:
    """``out[i] ← round(out[i] + α_e·x_i Δ_eᵀ)`` with e = index[i]; e = −1 (or a None expert) leaves row i.

    ``experts`` is a list of layouts (any mix of kinds and codecs, one shape), or an
    :class:`~deltahub.kernels.stack.ExpertStack` (or, for LoRA experts on CPU, a :class:`LowRankBatch` built
    with no ``alphas`` of its own) built once for them. Rows may come in any order.

    Raises:
        LayoutError: an index out of range, or shapes that do not fit.
    """
    if isinstance(experts, LowRankBatch) and alphas is None and x.device.type == "cpu" and \
            backends.select(x.device, backend) != "triton":
        return _lowrank_batch_(out, x, index, experts)
    stack = experts if hasattr(experts, "experts") else None
    members = list(stack.experts if stack is not None else experts)
    first = next((e for e in members if e is not None), None)
    if first is None:
        return out
    rows, cols = first.matrix
    _check(x, first, out)
    idx = _row_experts(index, tuple(x.shape[:-1])).to(x.device)
    if idx.numel() and (int(idx.max()) >= len(members) or int(idx.min()) < -1):
        raise LayoutError(f"index holds experts outside [-1, {len(members) - 1}].")
    alist = [1.0] * len(members) if alphas is None else [float(a) for a in alphas]
    which = backends.select(x.device, backend)
    m = math.prod(x.shape[:-1])
    x2, out2 = x.reshape(m, cols), out.reshape(m, rows)
    if which == "triton":
        from deltahub.kernels import matmul_triton
        from deltahub.kernels.stack import ExpertStack

        stack = stack if isinstance(stack, ExpertStack) else ExpertStack(members)
        target = out2.contiguous()
        matmul_triton.mixed_matmul_(target, x2, idx, stack, alist)
    else:
        target = out2
        _cpu_mixed(target, x2, idx, members, alist, which)
    if target.data_ptr() != out.data_ptr():
        out.copy_(target.reshape(out.shape))
    return out


def _lowrank_batch_(out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, batch: LowRankBatch) -> torch.Tensor:
    """mixed_matmul_ for a prepared LoRA batch: the checks that matter, then two GEMMs (no per-layout work)."""
    rows, cols = batch.right.shape[1], batch.left.shape[0]
    if x.shape[-1] != cols or out.shape[-1] != rows or out.shape[:-1] != x.shape[:-1]:
        raise LayoutError(f"x {list(x.shape)} and out {list(out.shape)} do not fit a {rows} x {cols} delta.")
    idx = _row_experts(index, tuple(x.shape[:-1]))
    if idx.numel() and (int(idx.max()) >= len(batch.experts) or int(idx.min()) < -1):
        raise LayoutError(f"index holds experts outside [-1, {len(batch.experts) - 1}].")
    m = math.prod(x.shape[:-1])
    target = out.reshape(m, rows)
    batch.run_(target, x.reshape(m, cols), idx)
    if target.data_ptr() != out.data_ptr():
        out.copy_(target.reshape(out.shape))
    return out


def _cpu_mixed(out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, members: list, alphas: list[float],
               which: str) -> None:
    """Rows gathered once in expert order; each expert present works on its contiguous slice; one scatter.

    LoRA experts only: two GEMMs over every row instead (:class:`LowRankBatch`).
    """
    batch = LowRankBatch.build(members, alphas, x.dtype)
    if batch is not None:
        batch.run_(out, x, idx)
        return
    order = torch.argsort(idx, stable=True)
    order = order[int((idx < 0).sum()):]  # the base rows sort first and stay as they are
    if order.numel() == 0:
        return
    counts = torch.bincount(idx[order], minlength=len(members)).tolist()
    xs, ys = x.index_select(0, order), out.index_select(0, order)
    start = 0
    for e, n in enumerate(counts):
        if n and members[e] is not None:
            delta_matmul(xs[start:start + n], members[e], alpha=alphas[e], out=ys[start:start + n], backend=which)
        start += n
    out.index_copy_(0, order, ys)


class LowRankBatch:
    """LoRA experts of one weight prepared once for :func:`mixed_matmul_` on CPU: Punica's SGMV as two GEMMs.

    H = x·[L₁ … L_E] (m × Σr); each row keeps its own expert's columns, scaled by s_e·α_e; out += H·[R₁; …; R_E].
    With 8 experts of r = 16 on MiniLM's 384-wide layers a loop over experts runs 16 small GEMMs, a gather
    and a scatter per layer; this runs two GEMMs of inner size Σr = 128 (the factors concatenated here, once
    per batch of requests, not per call). Worth it while Σr ≤ min(rows, cols): the extra FLOPs stay below the
    base GEMM's. Build with :meth:`build`, which says None when the experts do not qualify.
    """

    def __init__(self, experts: list, left: torch.Tensor, right: torch.Tensor, own: torch.Tensor,
                 gain: torch.Tensor):
        self.experts, self.left, self.right = experts, left, right
        # row e + 1: expert e's gains on its own columns, 0 elsewhere; row 0 (the base, index −1): all 0
        self.gains = torch.zeros(len(experts) + 1, left.shape[1], dtype=left.dtype, device=left.device)
        self.gains[own + 1, torch.arange(own.numel(), device=own.device)] = gain

    @classmethod
    def build(cls, experts: Sequence[Resident | None], alphas: Sequence[float] | None = None,
              x_dtype: torch.dtype = torch.float32) -> LowRankBatch | None:
        members = list(experts)
        present = [(e, m) for e, m in enumerate(members) if m is not None]
        if not present or not all(isinstance(m, LowRank) for _, m in present):
            return None
        rows, cols = present[0][1].matrix
        if len({m.compute_dtype for _, m in present}) != 1 or sum(m.rank for _, m in present) > min(rows, cols):
            return None
        cl = present[0][1].compute_dtype
        c = compute_dtype(x_dtype, cl)
        lefts, rights, owner, gain = [], [], [], []
        for e, m in present:
            a, b = m.A.to(cl).to(c), m.B.to(cl).to(c)
            left, right = (b, a) if m.transposed else (a.T, b.T)  # term = (x @ left) @ right, as _term
            lefts.append(left)
            rights.append(right)
            owner += [e] * m.rank
            gain += [float(torch.tensor(m.scale, dtype=cl).to(c)) * (1.0 if alphas is None else float(alphas[e]))] \
                * m.rank
        dev = present[0][1].device
        return cls(members, torch.cat(lefts, 1), torch.cat(rights, 0), torch.tensor(owner, device=dev),
                   torch.tensor(gain, dtype=c, device=dev))

    def run_(self, out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> None:
        """out (m, rows) += each row's term; rows with idx −1 (or an absent expert) get exactly nothing."""
        c = self.left.dtype
        h = x.to(c) @ self.left
        h.mul_(self.gains.index_select(0, idx + 1))
        if out.dtype == c and out.is_contiguous():
            out.addmm_(h, self.right)  # one pass; base rows add exact zeros
        else:
            out.copy_((out.to(c) + h @ self.right).to(out.dtype))


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, experts: Sequence[Resident | None], *,
                 bias: torch.Tensor | None = None, alphas: Sequence[float] | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """A linear layer over a batch whose rows name their own expert: F.linear once + each row's term."""
    y = torch.nn.functional.linear(x, weight, bias)
    return mixed_matmul_(y, x, index, experts, alphas=alphas, backend=backend)
