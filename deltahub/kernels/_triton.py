"""The one place that imports triton (Fast-LLM's gate): imported lazily by the ``*_triton.py`` modules only.

Every launch passes ``enable_fp_fusion=False``: a fused multiply-add rounds once where the reference
(``kernels/reference.py``) rounds the product α·Δ and then the sum, and Triton 3.9 warns that its default
changes in 3.10. Under ``TRITON_INTERPRET=1`` (CPU tests) kernels run one program at a time on numpy; keep
shapes small there, and no bf16 ``tl.dot`` (the interpreter multiplies bf16 bit patterns, triton#11584).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LAUNCH = {"enable_fp_fusion": False}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


# The interpreter casts fp32 → bf16 by truncation (runtime/interpreter.py: cast_impl passes no rounding mode);
# GPUs round to nearest even, as torch and the reference do. Under the interpreter only, ``rounded`` rounds
# with integer ops instead (identical results for finite values); compiled kernels keep the native cast.
_MANUAL_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def rounded(x, dst):
    """``x`` (fp32/fp64) rounded to nearest even into the element type of pointer ``dst``."""
    ty: tl.constexpr = dst.dtype.element_ty
    if _MANUAL_BF16 and ty == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(ty)


def compute(*dtypes: torch.dtype) -> tl.dtype:
    """tl.float64 when any input is fp64, else tl.float32 (the reference's rule)."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def dot_dtype(x_dtype: torch.dtype) -> tl.dtype:
    """Operand type of ``tl.dot``: the activations' own type (exact for 0/±1 operands), fp32 for fp32/fp64."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(x_dtype, tl.float32)


__all__ = ["INTERPRET", "LAUNCH", "TL_DTYPES", "compute", "dot_dtype", "rounded", "tl", "triton"]
