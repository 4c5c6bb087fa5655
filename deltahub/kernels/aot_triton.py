"""Compile every Triton kernel ahead of time for a GPU target, without a GPU (research/perf.md §3.2).

``python -m deltahub.kernels.aot_triton [80 90 ...]`` builds ttir → ttgir → PTX → cubin for each kernel
at representative signatures, as ``@triton.jit`` would on that device, and prints one line per kernel
(shared memory, registers where the metadata has them). The test suite runs it in a subprocess without
``TRITON_INTERPRET`` (the JIT decides at import whether to interpret). Catches what the interpreter cannot:
tile-shape rules, unsupported casts and layouts, and register blow-ups.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from deltahub.kernels import apply_triton as A
from deltahub.kernels import matmul_triton as M
from deltahub.kernels._triton import tl, triton

OPTIONS = {"enable_fp_fusion": False, "num_warps": 4}


def _sig(fn: Any, types: dict[str, str], consts: dict[str, Any]) -> tuple[Any, dict[str, str], dict[str, Any]]:
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    return fn, sig, consts


def specs() -> list[tuple[str, tuple[Any, dict[str, str], dict[str, Any]]]]:
    """(label, (kernel, signature, constexprs)) for every kernel and its main type variants."""
    f32, bf16 = tl.float32, tl.bfloat16
    mm = {"Y": "*bf16", "X": "*bf16", "ORDER": "*i64", "SEG_START": "*i64", "SEG_COUNT": "*i64", "SCALE": "*fp32",
          "N": "i32", "K": "i32"}
    tiles = {"BM": M.BM, "BN": M.BN, "BK": M.BK}
    out = [
        ("apply dense bf16", _sig(A._apply_dense_kernel, {"W": "*bf16", "D": "*fp32", "ALPHA": "*fp32", "n": "i32"},
                                  {"C": f32, "ALPHA_ONE": False, "BLOCK": A.BLOCK})),
        ("apply dense fp32+fp64", _sig(A._apply_dense_kernel, {"W": "*fp32", "D": "*fp64", "ALPHA": "*fp64",
                                                               "n": "i64"},
                                       {"C": tl.float64, "ALPHA_ONE": True, "BLOCK": A.BLOCK})),
        ("apply mask fp16", _sig(A._apply_mask_kernel, {"W": "*fp16", "MASK": "*u8", "SIGNS": "*u8", "ROW_PTR": "*i32",
                                                        "T": "*fp32", "cols": "i32"}, {"C": f32, "BLOCK": A.BLOCK})),
        ("apply csr bf16/u16/fp16", _sig(A._apply_csr_kernel, {"W": "*bf16", "ROW_PTR": "*i32", "COLS": "*u16",
                                                               "VALUES": "*fp16", "S": "*fp32", "ALPHA": "*fp32",
                                                               "cols": "i32"}, {"C": f32, "BLOCK": 256})),
        ("mixed mask bf16", _sig(M._mask_mm_kernel, {**mm, "MASK": "*u8", "SIGNS": "*u8", "SIGN_OFF": "*i64",
                                                     "ROW_PTR": "*i64"}, {"DOT": bf16, **tiles})),
        ("mixed csr bf16/i8", _sig(M._csr_mm_kernel, {**mm, "ROW_PTR": "*i64", "COLS": "*i32", "VALUES": "*i8",
                                                      "VSCALE": "*fp32"}, {"BM": M.BM, "BE": M.BE})),
        ("mixed dense fp16", _sig(M._dense_mm_kernel, {**mm, "Y": "*fp16", "X": "*fp16", "D": "*fp32"},
                                  {"DOT": tl.float16, **tiles})),
        ("mixed lora shrink bf16", _sig(M._lora_shrink_kernel, {**mm, "T": "*fp32", "U": "*bf16"},
                                        {"R": 16, "DOT": bf16, "BM": M.BM, "BK": M.BK})),
        ("mixed lora expand bf16", _sig(M._lora_expand_kernel, {**mm, "T": "*fp32", "V": "*bf16"},
                                        {"R": 64, "BM": M.BM, "BN": M.BN})),
    ]
    for bits in (1, 2, 4):
        out.append((f"apply codes b={bits} bf16", _sig(A._apply_codes_kernel, {
            "W": "*bf16", "P": "*u8", "TABLE": "*fp32", "cols": "i32", "plane_stride": "i64", "table_stride": "i32"},
            {"C": f32, "BITS": bits, "BLOCK": A.BLOCK})))
        out.append((f"mixed codes b={bits} bf16", _sig(M._codes_mm_kernel, {**mm, "P": "*u8", "BOOK": "*fp32"},
                                                       {"BITS": bits, "DOT": bf16, **tiles})))
    return out


def compile_all(capability: int) -> list[str]:
    """One line per kernel compiled for ``sm_<capability>``; raises on the first kernel that fails."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lines = []
    for label, (fn, sig, consts) in specs():
        t0 = time.perf_counter()
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", capability, 32),
                           options=OPTIONS)
        assert "cubin" in k.asm, f"{label}: no cubin for sm_{capability}"
        lines.append(f"sm_{capability} {label}: shared {k.metadata.shared} B, {time.perf_counter() - t0:.2f} s")
    return lines


if __name__ == "__main__":
    for cc in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print("\n".join(compile_all(cc)), flush=True)
