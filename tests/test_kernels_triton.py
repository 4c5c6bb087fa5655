"""Triton kernels against the plain-torch reference: in the interpreter on CPU (TRITON_INTERPRET=1, set by
conftest before triton is imported), on the GPU when there is one; and compiled ahead of time for sm_80 and
sm_90 without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from deltahub.errors import LayoutError
from deltahub.kernels import apply_, delta_matmul, mixed_linear
from deltahub.kernels import reference as ref
from deltahub.kernels.stack import ExpertStack
from deltahub.testing import LAYOUT_KINDS, random_layout

pytest.importorskip("triton")
pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(33, 17), (5, 3, 7), (1, 1), (1, 130), (300,), (0, 4), (4, 0)]
# the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584): bf16 matmuls only on a GPU
MM_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _equal(got: torch.Tensor, want: torch.Tensor, exact: bool, tol: float = 1e-2) -> None:
    if exact:
        assert torch.equal(got, want), (got.double() - want.double()).abs().max()
    elif got.numel():
        err = (got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1.0)
        assert err <= tol, err


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_apply_matches_the_reference(kind: str, dtype: torch.dtype) -> None:
    for shape in SHAPES:
        layout = random_layout(kind, shape, seed=len(shape)).to(DEVICE)
        for alpha in (1.0, -0.37):
            w = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
            want = ref.apply_(w.clone(), layout, alpha)
            got = apply_(w.clone(), layout, alpha=alpha, backend="triton")
            _equal(got, want, exact=not kind.startswith("lowrank"))


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("dtype", MM_DTYPES, ids=str)
def test_delta_matmul_matches_the_reference(kind: str, dtype: torch.dtype) -> None:
    for shape in [(33, 17), (70, 40), (1, 1), (5, 3, 7)]:
        layout = random_layout(kind, shape, seed=3).to(DEVICE)
        rows, cols = layout.matrix
        g = torch.Generator().manual_seed(6)
        x = torch.randn(3, cols, generator=g).to(dtype).to(DEVICE)
        out = torch.randn(3, rows, generator=g).to(dtype).to(DEVICE)
        want = ref.delta_matmul(x, layout, 0.5, out=out.clone())
        got = delta_matmul(x, layout, alpha=0.5, out=out.clone(), backend="triton")
        _equal(got, want, exact=False, tol=1e-5 if dtype == torch.float32 else 1e-2)
        _equal(delta_matmul(x, layout, alpha=0.5, backend="triton"), ref.delta_matmul(x, layout, 0.5), exact=False,
               tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", MM_DTYPES, ids=str)
def test_mixed_batch_of_every_kind_in_one_call(dtype: torch.dtype) -> None:
    shape = (37, 45)
    kinds = ["mask", "mask", "csr", "csr_int8", "codes1", "codes2", "codes_rows", "codes3", "lowrank", "lowrank_t",
             "dense", "dense64"]
    experts = [random_layout(k, shape, seed=i).to(DEVICE) for i, k in enumerate(kinds)] + [None]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 45, generator=g).to(dtype).to(DEVICE)
    w, b = torch.randn(shape, generator=g).to(dtype).to(DEVICE), torch.randn(37, generator=g).to(dtype).to(DEVICE)
    index = torch.randint(-1, len(experts), (40,), generator=g).to(DEVICE)
    alphas = [0.3 + 0.1 * i for i in range(len(experts))]
    stack = ExpertStack(experts)
    assert sorted(grp.kind for grp in stack.groups) == ["codes", "codes", "codes", "csr", "dense", "lowrank", "mask"]
    got = mixed_linear(x, w, index, stack, bias=b, alphas=alphas, backend="triton")
    want = ref.mixed_linear(x, w, experts, index, alphas, b)
    _equal(got, want, exact=False, tol=1e-5 if dtype == torch.float32 else 2e-2)


def test_a_stack_holds_one_weight_shape() -> None:
    with pytest.raises(LayoutError, match="one shape and one device"):
        ExpertStack([random_layout("mask", (4, 5)), random_layout("mask", (5, 4))])


def test_every_kernel_compiles_for_sm80_and_sm90_without_a_gpu() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the JIT decides at import time
    proc = subprocess.run([sys.executable, "-m", "deltahub.kernels.aot_triton", "80", "90"], check=False, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 30 and all(line.startswith(("sm_80 ", "sm_90 ")) for line in lines)


def test_compiled_kernels_do_not_fuse_the_product_into_the_sum() -> None:
    # an FMA would round α·Δ + w once where the reference rounds twice; the flag must reach the PTX
    code = ("import triton.language as tl, triton\nfrom triton.compiler import ASTSource\n"
            "from triton.backends.compiler import GPUTarget\nfrom deltahub.kernels import apply_triton as A\n"
            "from deltahub.kernels.aot_triton import OPTIONS\n"
            "sig = {'W': '*fp32', 'D': '*fp32', 'ALPHA': '*fp32', 'n': 'i32', 'C': 'constexpr', "
            "'ALPHA_ONE': 'constexpr', 'BLOCK': 'constexpr'}\n"
            "src = ASTSource(A._apply_dense_kernel, sig, constexprs={'C': tl.float32, 'ALPHA_ONE': False, 'BLOCK': 1024})\n"
            "for fuse in (False, True):\n"
            "    k = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={**OPTIONS, 'enable_fp_fusion': fuse})\n"
            "    print('fma.rn.f32' in k.asm['ptx'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"]
