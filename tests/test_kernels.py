"""Resident layouts and the CPU kernels (torch and compiled) against the plain-torch reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltahub.codecs import get_codec
from deltahub.errors import IntegrityError, KernelError, LayoutError
from deltahub.kernels import (
    Codes,
    Dense,
    LowRank,
    SparseRows,
    TernaryMask,
    apply_,
    delta_matmul,
    mixed_linear,
    to_dense,
)
from deltahub.kernels import reference as ref
from deltahub.kernels.layouts import _Layout
from deltahub.testing import LAYOUT_KINDS, LayoutContract, pico_pair, random_layout


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
class TestLayouts(LayoutContract):
    @pytest.fixture(autouse=True)
    def _kind(self, kind: str) -> None:
        self.kind = kind

    def make(self, shape: tuple[int, ...], seed: int):
        return random_layout(self.kind, shape, seed=seed)


def _resident(codec: str, shape: tuple[int, ...], **params: object):
    c = get_codec(codec)
    config = c.parse_config(params)
    d = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.01
    return c.to_resident(c.encode(d, config, c.fit_one("t", d, config), name="t"), shape)


@pytest.mark.parametrize("codec,params,kind,limit", [
    ("compeft", {"density": 0.1}, TernaryMask, 1.25),
    ("compeft", {"density": 0.01}, SparseRows, 0.26),
    ("dare", {"p": 0.99}, SparseRows, 0.45),
    ("darex", {"p": 0.99, "q": 0.02}, SparseRows, 0.45),
    ("bitdelta", {}, Codes, 1.01),
    ("binary", {"bits": 1}, Codes, 1.01),
    ("binary", {"bits": 2}, Codes, 2.05),
    ("binary", {"bits": 4}, Codes, 4.05),
])
def test_resident_size_on_a_4096_square(codec: str, params: dict, kind: type, limit: float) -> None:
    res = _resident(codec, (4096, 4096), **params)
    assert isinstance(res, kind)
    assert res.bits_per_param() <= limit
    assert res.nbytes() == sum(t.numel() * t.element_size() for t in res.tensors().values())


def test_resident_indices_are_narrow() -> None:
    mask = _resident("compeft", (64, 96), density=0.2)
    csr = _resident("dare", (64, 70000), p=0.999)
    assert mask.row_ptr.dtype == torch.int32
    assert csr.row_ptr.dtype == torch.int32 and csr.cols.dtype == torch.int32  # > 65,536 columns
    assert _resident("dare", (64, 96), p=0.9).cols.dtype == torch.uint16


def test_codec_layouts_decode_like_the_codec() -> None:
    for codec, params in [("compeft", {"density": 0.1}), ("dare", {"p": 0.9, "value_dtype": "bfloat16"}),
                          ("bitdelta", {}), ("binary", {"bits": 3}), ("dense", {})]:
        c = get_codec(codec)
        config = c.parse_config(params)
        d = torch.randn(37, 29) * 0.01
        enc = c.encode(d, config, c.fit_one("t", d, config), name="t")
        assert torch.equal(to_dense(c.to_resident(enc, (37, 29))).double(), c.decode(enc, (37, 29)).double()), codec


@pytest.mark.parametrize("build,message", [
    (lambda: Codes(torch.zeros(1, 3, 2, dtype=torch.uint8), torch.zeros(1, 2, dtype=torch.float64), (3, 9)),
     "Codes layout is inconsistent: codebook must be a 2-D fp32 tensor."),
    (lambda: Codes(torch.zeros(1, 3, 2, dtype=torch.uint8), torch.zeros(1, 2).expand(3, 2), (3, 9)),
     "Codes layout is inconsistent: codebook is not a contiguous dense tensor."),
    (lambda: Codes(torch.full((1, 3, 2), 255, dtype=torch.uint8), torch.zeros(1, 2), (3, 9)).validate(),
     "Codes layout is inconsistent: padding bits past the last column are not zero."),
    (lambda: TernaryMask(torch.full((2, 1), 3, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8),
                         torch.tensor([0, 2, 3], dtype=torch.int32), 0.1, (2, 8)).validate(),
     "TernaryMask layout is inconsistent: row_ptr does not count the set bits of each mask row."),
    (lambda: TernaryMask(torch.zeros(2, 1, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8),
                         torch.tensor([0, 0, 0]), 0.1, (2, 8)),
     "TernaryMask layout is inconsistent: signs must be 1-D uint8 holding ceil(nnz/8) = 0 bytes."),
    (lambda: SparseRows(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([3, 1], dtype=torch.uint16),
                        torch.ones(2, dtype=torch.float16), 1.0, (1, 8)).validate(),
     "SparseRows layout is inconsistent: column indices are not strictly increasing within a row."),
    (lambda: SparseRows(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([8], dtype=torch.uint16),
                        torch.ones(1, dtype=torch.float16), 1.0, (1, 8)).validate(),
     "SparseRows layout is inconsistent: a column index is outside [0, 8)."),
    (lambda: SparseRows(torch.tensor([0, 1], dtype=torch.int64), torch.tensor([1], dtype=torch.uint16),
                        torch.tensor([float("nan")]), 1.0, (1, 8)).validate(),
     "SparseRows layout is inconsistent: values holds NaN or Inf."),
    (lambda: SparseRows(torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1], dtype=torch.uint16),
                        torch.ones(1), 1.0, (1, 8)),
     "SparseRows layout is inconsistent: 1 cols and 1 values for 3 entries."),
    (lambda: LowRank(torch.zeros(2, 5), torch.zeros(4, 3), 1.0, (4, 5)),
     "LowRank layout is inconsistent: A has rank 2 and B rank 3."),
    (lambda: LowRank(torch.zeros(2, 5), torch.zeros(4, 2), 1.0, (5, 4)),
     "LowRank layout is inconsistent: factors give a 4 x 5 delta, the shape [5, 4] needs 5 x 4."),
    (lambda: Dense(torch.zeros(3, dtype=torch.int32)), "Dense layout is inconsistent: values must be a float tensor."),
])
def test_inconsistent_layouts_are_refused(build, message: str) -> None:
    with pytest.raises(LayoutError) as err:
        build()
    assert str(err.value) == (f"{message[:-1]}. The codec that built it has a bug, or its payload is corrupt; "
                              "re-encode the expert.")


def test_equality_never_crashes() -> None:
    a, b = random_layout("mask", (9, 13), seed=1), random_layout("mask", (9, 13), seed=2)
    assert a == random_layout("mask", (9, 13), seed=1)
    assert a != b and a != random_layout("csr", (9, 13), seed=1) and a != "mask"
    assert random_layout("lowrank", (4, 6)) != random_layout("lowrank_t", (4, 6))
    with pytest.raises(TypeError):
        hash(a)


def test_to_moves_every_tensor_and_keeps_the_original() -> None:
    a = random_layout("codes2", (5, 11))
    b = a.to("meta")
    assert b.device.type == "meta" and a.device.type == "cpu"
    assert all(t.device.type == "meta" for t in b.tensors().values())


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_reference_builds_its_tables_on_the_layouts_device(kind: str) -> None:
    # regression: to_dense indexed CPU lookup tables with the layout's tensors (broke on CUDA); the meta
    # device raises on any CPU/device mix, so the reference must run there end to end
    layout = random_layout(kind, (6, 21)).to("meta")
    assert to_dense(layout).device.type == "meta"
    assert ref.apply_(torch.zeros(6, 21, device="meta"), layout, 0.5).device.type == "meta"


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_one_bit_apply_on_zero_rows(backend: str) -> None:
    # regression: SignBits apply on a zero-row matrix crashed in view(0, -1)
    res = _resident("bitdelta", (0, 12))
    w = torch.zeros(0, 12)
    assert apply_(w, res, backend=backend) is w


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_dense_alpha_rounds_like_the_math(backend: str) -> None:
    # regression: add_(d, alpha=0.3) fuses the product into the sum and differed from round(w + 0.3·Δ)
    g = torch.Generator().manual_seed(3)
    w, d = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    want = w + d * torch.tensor(0.3)
    assert not torch.equal(w.clone().add_(d, alpha=0.3), want)  # the old path really differs here
    assert torch.equal(apply_(w.clone(), Dense(d), alpha=0.3, backend=backend), want)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("kind", ["codes1", "mask", "csr", "dense"])
def test_fp64_weights_are_not_rounded_through_fp32(backend: str, kind: str) -> None:
    layout = random_layout(kind, (40, 24), seed=4)
    w = torch.randn(40, 24, dtype=torch.float64)
    want = w + to_dense(layout).double() * 0.3
    got = apply_(w.clone(), layout, alpha=0.3, backend=backend)
    assert torch.equal(got, want)
    assert not torch.equal(got, (w.float() + to_dense(layout) * 0.3).double())


def test_out_of_memory_on_the_device_is_not_called_corruption(tmp_path: Path, monkeypatch) -> None:
    import deltahub

    base, ft = pico_pair(tmp_path)
    art = deltahub.compress(ft, base=base, codec="compeft", out=tmp_path / "art")
    entry = next(e for e in art.manifest.tensors if e.codec == "compeft")

    real_to = _Layout.to

    def no_room_on_the_gpu(self, device):
        if str(device) != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_to(self, device)

    monkeypatch.setattr(_Layout, "to", no_room_on_the_gpu)
    with pytest.raises(torch.OutOfMemoryError):
        art.resident(entry, device="cuda")


def test_a_corrupt_payload_is_an_integrity_error(tmp_path: Path, monkeypatch) -> None:
    import deltahub

    base, ft = pico_pair(tmp_path)
    art = deltahub.compress(ft, base=base, codec="compeft", out=tmp_path / "art")
    entry = next(e for e in art.manifest.tensors if e.codec == "compeft")
    codec = art.codec(entry)
    monkeypatch.setattr(type(codec), "to_resident", lambda self, enc, shape, device="cpu": Dense(torch.zeros(2, 2)))
    with pytest.raises(IntegrityError, match="to_resident gave shape"):
        art.resident(entry)


def test_shape_and_device_mismatches_are_typed() -> None:
    layout = random_layout("codes1", (4, 8))
    with pytest.raises(LayoutError, match=r"The delta has shape \[4, 8\] but the weight \[8, 4\]"):
        apply_(torch.zeros(8, 4), layout)
    with pytest.raises(LayoutError, match="is on cpu and the weight on meta"):
        apply_(torch.zeros(4, 8, device="meta"), layout)
    with pytest.raises(LayoutError, match=r"x must be a float tensor \(\.\.\., 8\)"):
        delta_matmul(torch.zeros(3, 7), layout)


def test_backend_selection_errors(monkeypatch) -> None:
    layout = random_layout("dense", (3, 3))
    with pytest.raises(KernelError, match="Unknown kernel backend 'cuda'; use one of auto, torch, compiled, triton"):
        apply_(torch.zeros(3, 3), layout, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelError, match="Triton kernels run on CUDA tensors, or on CPU with TRITON_INTERPRET=1"):
        apply_(torch.zeros(3, 3), layout, backend="triton")
    monkeypatch.setenv("DELTAHUB_KERNEL_BACKEND", "torch")
    assert torch.equal(apply_(torch.zeros(3, 3), layout), layout.values)


def test_without_a_compiler_the_torch_path_serves_and_says_why(tmp_path: Path) -> None:
    code = ("import logging, torch; logging.basicConfig(); from deltahub.testing import random_layout, check_layout\n"
            "from deltahub.kernels import apply_, backends\n"
            "check_layout(random_layout('mask', (9, 70)))\n"
            "print(backends.select(torch.device('cpu')))\n"
            "try:\n    apply_(torch.zeros(2, 2), random_layout('dense', (2, 2)), backend='compiled')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "DELTAHUB_KERNEL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "torch"
    assert lines[1].startswith("KernelError The compiled CPU kernels are unavailable: no C compiler found (CC=")
    assert "using the slower torch CPU paths" in proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_portable_c_loops_without_avx512_or_bmi2(tmp_path: Path) -> None:
    # this machine's build takes the AVX-512 paths; the portable loops (and the software pdep) must agree too
    code = ("from deltahub.kernels import native\nfrom deltahub.testing import LAYOUT_KINDS, check_layout, "
            "random_layout\nassert native.library() is not None, native.unavailable_reason()\n"
            "for kind in LAYOUT_KINDS:\n    for shape in [(33, 17), (3, 200), (1, 1), (300,)]:\n"
            "        check_layout(random_layout(kind, shape, density=0.4))\nprint('ok')\n")
    env = {**os.environ, "DELTAHUB_KERNEL_CFLAGS": "-mno-avx512f -mno-bmi2",
           "DELTAHUB_KERNEL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_mixed_batch_of_every_layout_kind(backend: str) -> None:
    shape = (24, 40)
    kinds = ["mask", "csr", "csr_int8", "codes1", "codes2", "codes_rows", "lowrank", "dense"]
    experts = [random_layout(k, shape, seed=i) for i, k in enumerate(kinds)] + [None]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(29, 40, generator=g)
    weight, bias = torch.randn(shape, generator=g), torch.randn(24, generator=g)
    index = torch.randint(-1, len(experts), (29,), generator=g)  # −1 and the None expert: the base alone
    alphas = [0.5 + 0.25 * i for i in range(len(experts))]
    got = mixed_linear(x, weight, index, experts, bias=bias, alphas=alphas, backend=backend)
    want = ref.mixed_linear(x, weight, experts, index, alphas, bias)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for i in range(29):  # each row equals that row through its expert's merged weight
        e = int(index[i])
        merged = weight.clone() if e < 0 or experts[e] is None else apply_(weight.clone(), experts[e], alpha=alphas[e])
        assert torch.allclose(got[i], torch.nn.functional.linear(x[i], merged, bias), rtol=1e-4, atol=1e-4)


def test_mixed_batch_index_per_sequence_and_bad_index() -> None:
    experts = [random_layout("codes1", (6, 10), seed=1), random_layout("mask", (6, 10), seed=2)]
    x = torch.randn(3, 5, 10)
    w = torch.randn(6, 10)
    got = mixed_linear(x, w, torch.tensor([1, -1, 0]), experts)
    assert torch.allclose(got[1], torch.nn.functional.linear(x[1], w))
    assert torch.allclose(got[0], torch.nn.functional.linear(x[0], apply_(w.clone(), experts[1])), atol=1e-5)
    with pytest.raises(LayoutError, match=r"index holds experts outside \[-1, 1\]"):
        mixed_linear(x, w, torch.tensor([2, 0, 0]), experts)
    with pytest.raises(LayoutError, match="index must be an integer tensor of shape"):
        mixed_linear(x, w, torch.zeros(4, dtype=torch.long), experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_of_lora_experts_as_two_gemms(dtype: torch.dtype) -> None:
    """LoRA-only batches on CPU take LowRankBatch (factors concatenated): same rows as the reference."""
    from deltahub.kernels.layouts import LowRank
    from deltahub.kernels.matmul import LowRankBatch

    g = torch.Generator().manual_seed(3)
    experts = [LowRank(A=torch.randn(2, 40, generator=g), B=torch.randn(24, 2, generator=g), scale=2.0, shape=(24, 40)),
               None,
               LowRank(A=torch.randn(3, 24, generator=g), B=torch.randn(40, 3, generator=g), scale=0.5, shape=(24, 40),
                       transposed=True),
               LowRank(A=torch.randn(4, 40, generator=g).half(), B=torch.randn(24, 4, generator=g).half(), scale=1.0,
                       shape=(24, 40))]
    x = torch.randn(2, 13, 40, generator=g).to(dtype)
    weight = torch.randn(24, 40, generator=g).to(dtype)
    index = torch.tensor([3, -1])
    index2 = torch.randint(-1, 4, (26,), generator=g)  # per token of the flattened batch
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for xs, idx in ((x, index), (x.reshape(26, 40), index2)):
        want = ref.mixed_linear(xs, weight, experts, idx, [1.0] * 4, None)
        prepared = LowRankBatch.build(experts, x_dtype=dtype)
        assert prepared is not None
        torch.testing.assert_close(mixed_linear(xs, weight, idx, prepared), want, **tol)
        torch.testing.assert_close(mixed_linear(xs, weight, idx, experts), want, **tol)
    alphas = [0.5, 1.0, -1.0, 2.0]
    torch.testing.assert_close(mixed_linear(x.reshape(26, 40), weight, index2, experts, alphas=alphas),
                               ref.mixed_linear(x.reshape(26, 40), weight, experts, index2, alphas, None), **tol)
    base_rows = mixed_linear(x, weight, torch.tensor([-1, -1]), LowRankBatch.build(experts, x_dtype=dtype))
    assert torch.equal(base_rows, torch.nn.functional.linear(x, weight))  # base rows get exactly nothing
    assert LowRankBatch.build([experts[0], random_layout("mask", (24, 40), seed=1)]) is None
    with pytest.raises(LayoutError, match=r"index holds experts outside \[-1, 3\]"):
        mixed_linear(x, weight, torch.tensor([4, 0]), LowRankBatch.build(experts))
