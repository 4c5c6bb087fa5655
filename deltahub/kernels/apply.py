"""``apply_``: W ← round(W + α·Δ) in place for every resident layout, without a dense Δ of W's size.

Semantics are those of :func:`deltahub.kernels.reference.apply_` (compute in fp32, or fp64 when W or Δ is
fp64; one rounding into W's dtype), bit for bit for every layout but ``LowRank`` (a matmul: its
summation order is the BLAS's). Dispatch (:mod:`deltahub.kernels.backends`): Triton for CUDA tensors, the
compiled C kernels on CPU, and the torch paths below everywhere else. The torch paths work in blocks of
about 0.5 M elements through the same few buffers: allocation and page faults dominate whole-tensor torch
code, and such blocks ran 2-3x faster than whole tensors (research/perf.md §4.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deltahub.errors import LayoutError
from deltahub.kernels import backends, native
from deltahub.kernels.layouts import LAYOUTS, Codes, Dense, LowRank, Resident, SparseRows, TernaryMask, row_bytes
from deltahub.kernels.reference import compute_dtype

CHUNK = 1 << 19  # elements per block: 2 MB of fp32, well inside L2
LOWRANK_WHOLE = 1 << 22  # LoRA deltas up to 16 MB of fp32 are one block: per-block GEMM calls cost more
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LUTS: dict[torch.device, torch.Tensor] = {}


@contextmanager
def _one_thread() -> Iterator[None]:
    """The calling thread's torch ops run single-threaded inside (the count is per thread; ~1 µs).

    A block loop is many small ops, and each op as an intra-op parallel region waits for a descheduled
    worker whenever the cores are shared: such loops ran 3-20x slower with 2 torch threads than with 1 on
    the loaded 2-core VM (BENCHMARKS.md, section 2).
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def check(weight: torch.Tensor, layout: Resident) -> None:
    """Raises LayoutError unless ``layout`` fits ``weight`` (type, shape, device, dtype)."""
    if not isinstance(layout, LAYOUTS):
        raise LayoutError(f"{type(layout).__name__} is not a resident layout; a codec's to_resident must return one "
                          f"of {', '.join(t.__name__ for t in LAYOUTS)}.")
    if tuple(weight.shape) != tuple(layout.shape):
        raise LayoutError(f"The delta has shape {list(layout.shape)} but the weight {list(weight.shape)}: it was made "
                          "for another model; use the expert's own base.")
    if weight.device != layout.device:
        raise LayoutError(f"The delta is on {layout.device} and the weight on {weight.device}; move one with .to().")
    if weight.dtype not in WEIGHT_DTYPES:
        raise LayoutError(f"Cannot apply a delta to a {weight.dtype} tensor; weights are fp16, bf16, fp32 or fp64.")


@torch.no_grad()
def apply_(weight: torch.Tensor, layout: Resident, *, alpha: float = 1.0, source: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """``weight ← round(source + α·Δ)`` in place (``source`` defaults to ``weight`` itself); returns ``weight``.

    Args:
        weight: fp16, bf16, fp32 or fp64, on the layout's device; non-contiguous views are handled.
        layout: a resident layout of the same shape.
        alpha: scale of Δ (a merge weight).
        source: a clean copy W₀ of the weight (same shape, dtype, device): a hot-swap W ← W₀ + α·Δ in one
            pass over memory on the compiled path, without a separate copy.
        backend: ``auto``/``torch``/``compiled``/``triton``; None reads DELTAHUB_KERNEL_BACKEND.

    Raises:
        LayoutError: the layout (or ``source``) does not fit the weight.
        KernelError: an explicit backend that cannot run here.
    """
    check(weight, layout)
    if source is not None and (source.shape != weight.shape or source.dtype != weight.dtype
                               or source.device != weight.device):
        raise LayoutError(f"source is {source.dtype} {list(source.shape)} on {source.device}; the weight is "
                          f"{weight.dtype} {list(weight.shape)} on {weight.device}.")
    if weight.numel() == 0:
        return weight
    if not weight.is_contiguous():
        tmp = weight.contiguous() if source is None else source.contiguous().clone()
        apply_(tmp, layout, alpha=alpha, backend=backend)
        return weight.copy_(tmp)
    src = None if source is None or source.data_ptr() == weight.data_ptr() else source.contiguous()
    which = backends.select(weight.device, backend)
    if which == "compiled" and compiled_rows(weight, layout, float(alpha), 0, layout.matrix[0], src=src):
        return weight
    if src is not None:
        weight.copy_(src)
    if which == "triton":
        from deltahub.kernels import apply_triton

        apply_triton.apply_(weight, layout, float(alpha))
        return weight
    if isinstance(layout, LowRank) and weight.numel() <= LOWRANK_WHOLE:
        _torch_apply(weight, layout, float(alpha))  # one GEMM, not a block loop: all threads help
        return weight
    with _one_thread():
        _torch_apply(weight, layout, float(alpha))
    return weight


# ------------------------------------------------------------------------------------ compiled (C)
def compiled_rows(w: torch.Tensor, layout: Resident, alpha: float, r0: int, r1: int, w_row0: int = 0,
                  src: torch.Tensor | None = None) -> bool:
    """Rows [r0, r1) of round(src + α·Δ) (``src`` None: w itself) by the C kernels, ``w`` (and ``src``) holding
    rows from ``w_row0`` on.

    False when there is no C kernel for the case (LowRank; fp64 Δ on half weights; no compiler).
    """
    lib = native.library()
    if lib is None or isinstance(layout, LowRank):
        return False
    if r0 >= r1:
        return True
    a, wdt, codes = native.addr, native.DTYPE_CODES[w.dtype], native.DTYPE_CODES
    rows, cols = layout.matrix
    work = (r1 - r0) * cols
    sp = None if src is None else a(src)
    if isinstance(layout, Dense):
        d = layout.values
        if d.dtype == torch.float64 and w.dtype not in (torch.float32, torch.float64):
            return False
        off = (r0 - w_row0) * cols * w.element_size()  # dense works on elements, not rows
        d_off = r0 * cols * d.element_size()
        native.run_split(lib.dh_apply_dense, 0, work, work,
                         (a(w) + off, None if sp is None else sp + off, wdt, a(d) + d_off, codes[d.dtype], ..., alpha))
    elif isinstance(layout, Codes):
        native.run_split(lib.dh_apply_codes, r0, r1, work, (a(w), sp, w_row0, wdt, rows, cols, ..., a(layout.planes),
                                                            layout.bits, a(layout.codebook),
                                                            layout.codebook.shape[0], alpha))
    elif isinstance(layout, TernaryMask):
        rp = layout.row_ptr.to(torch.int64)
        native.run_split(lib.dh_apply_mask, r0, r1, work, (a(w), sp, w_row0, wdt, cols, ..., a(layout.mask),
                                                           a(layout.signs), layout.signs.numel(), a(rp),
                                                           layout.scale, alpha))
    else:
        rp = layout.row_ptr.to(torch.int64)
        native.run_split(lib.dh_apply_csr, r0, r1, work, (a(w), sp, w_row0, wdt, cols, ..., a(rp), a(layout.cols),
                                                          codes[layout.cols.dtype], a(layout.values),
                                                          codes[layout.values.dtype], layout.scale, alpha))
    return True


# ------------------------------------------------------------------------------------------ torch
def _bit_lut(device: torch.device) -> torch.Tensor:
    """byte → its 8 bits as int8 0/1 (little bit order) packed in one int64: a 1-D gather unpacks 8 at once."""
    if device not in _LUTS:
        bits = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.int8)
        _LUTS[device] = bits.view(torch.int64).reshape(256).to(device)
    return _LUTS[device]


def _bit_table(device: torch.device) -> torch.Tensor:
    """(256, 8) int8: the bits of every byte value, little bit order."""
    return _bit_lut(device).view(torch.int8).view(256, 8)


def unpack_rows(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """(m, ceil(cols/8)) uint8 → (m, cols) int8 0/1."""
    m = packed.shape[0]
    out = _bit_lut(packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
    return out.view(torch.int8).view(m, -1)[:, :cols]


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def block_rows(layout: Resident) -> int:
    """Rows per block: about CHUNK elements."""
    return max(1, CHUNK // max(layout.matrix[1], 1))


def block_term(layout: Resident, r0: int, r1: int, c: torch.dtype, alpha: float) -> torch.Tensor:
    """Rows [r0, r1) of α·Δ₂ as a dense (r1 − r0, cols) tensor of dtype ``c``, computed as the reference does."""
    rows, cols = layout.matrix
    dev = layout.device
    a = _scalar(alpha, c, dev)
    if isinstance(layout, Dense):
        return layout.values.reshape(rows, cols)[r0:r1].to(c) * a
    if isinstance(layout, Codes):
        table = layout.codebook.to(c) * a  # the reference's α·Δ, one product per code
        tab = table[r0:r1] if table.shape[0] > 1 else table
        if layout.bits == 1 and table.shape[0] == 1:  # byte → its 8 final values: one gather a block
            lut = torch.where(_bit_table(dev).bool(), tab[0, 1], tab[0, 0])  # (256, 8)
            packed = layout.planes[0, r0:r1]
            return lut.index_select(0, packed.reshape(-1).to(torch.int32)).view(r1 - r0, -1)[:, :cols]
        if layout.bits == 1:
            return torch.where(unpack_rows(layout.planes[0, r0:r1], cols).bool(), tab[:, 1:2], tab[:, 0:1])
        code = sum(unpack_rows(layout.planes[j, r0:r1], cols).long() << j for j in range(layout.bits))
        return torch.gather(tab.expand(r1 - r0, -1), 1, code)
    if isinstance(layout, TernaryMask):
        t = _scalar(layout.scale, torch.float32, dev).to(c) * a
        k0, k1 = int(layout.row_ptr[r0]), int(layout.row_ptr[r1])
        term = torch.zeros(r1 - r0, cols, dtype=c, device=dev)
        if k1 > k0:
            packed = layout.signs[k0 // 8:row_bytes(k1)].unsqueeze(0)
            neg = unpack_rows(packed, packed.shape[1] * 8)[0, k0 % 8:k0 % 8 + (k1 - k0)].bool()
            term.masked_scatter_(unpack_rows(layout.mask[r0:r1], cols).bool(), torch.where(neg, -t, t))
        return term
    if isinstance(layout, SparseRows):
        row, col, k0, k1 = _csr_block(layout, r0, r1)
        term = torch.zeros(r1 - r0, cols, dtype=c, device=dev)
        term[row - r0, col] = (layout.values[k0:k1].to(torch.float32) * _scalar(layout.scale, torch.float32, dev)
                               ).to(c) * a
        return term
    cl = layout.compute_dtype
    A, B = layout.A.to(cl), layout.B.to(cl)
    d = A[:, r0:r1].T @ B.T if layout.transposed else B[r0:r1] @ A
    d = (_scalar(layout.scale, cl, dev) * d).to(c)
    return d if alpha == 1.0 else d * a  # x·1.0 is x exactly: one pass fewer over the block


def _csr_block(layout: SparseRows, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    ptr = layout.row_ptr.long()
    k0, k1 = int(ptr[r0]), int(ptr[r1])
    row = torch.repeat_interleave(torch.arange(r0, r1, device=ptr.device), ptr[r0 + 1:r1 + 1] - ptr[r0:r1])
    return row, layout.cols[k0:k1].to(torch.int32).long(), k0, k1


def _add_rows(w2: torch.Tensor, r0: int, r1: int, term: torch.Tensor) -> None:
    """w2[r0:r1] ← round(w2[r0:r1] + term), term already in the compute dtype."""
    block = w2[r0:r1]
    if block.dtype == term.dtype:
        block.add_(term)
    else:
        block.copy_(block.to(term.dtype).add_(term))


def _torch_apply(w: torch.Tensor, layout: Resident, alpha: float) -> None:
    rows, cols = layout.matrix
    c = compute_dtype(w.dtype, layout.compute_dtype)
    w2 = w.view(rows, cols)
    if isinstance(layout, Dense) and alpha == 1.0 and w.dtype == c == layout.values.dtype:
        w.add_(layout.values)  # one rounding, no temporaries
        return
    step = block_rows(layout)
    if isinstance(layout, LowRank) and rows * cols <= LOWRANK_WHOLE:
        step = rows  # one GEMM per weight: 300 small blocks per MiniLM swap cost 5x the swap's memory traffic
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if isinstance(layout, SparseRows):
            _csr_add(w2, layout, r0, r1, c, alpha)
        else:
            _add_rows(w2, r0, r1, block_term(layout, r0, r1, c, alpha))


def _csr_add(w2: torch.Tensor, layout: SparseRows, r0: int, r1: int, c: torch.dtype, alpha: float) -> None:
    """A CSR block by index_add (touches nnz entries, not the whole block)."""
    row, col, k0, k1 = _csr_block(layout, r0, r1)
    if k0 == k1:
        return
    flat, cols = w2.view(-1), layout.matrix[1]
    idx = row * cols + col
    s = _scalar(layout.scale, torch.float32, w2.device)
    term = (layout.values[k0:k1].to(torch.float32) * s).to(c) * _scalar(alpha, c, w2.device)
    if flat.dtype == c:
        flat.index_add_(0, idx, term)  # unique indices: each element w + t, rounded once
    else:
        flat.index_copy_(0, idx, flat.index_select(0, idx).to(c).add_(term).to(flat.dtype))
