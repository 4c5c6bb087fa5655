"""Benchmark the resident layouts and the CPU kernels (issue 7 item 7; DESIGN §3).

Run from the repository root::

    python benchmarks/bench_kernels.py            # full run, ~3-5 minutes on 2 cores
    python benchmarks/bench_kernels.py --quick    # smoke run (< 1 min): 1024 x 1024, few rounds

Prints markdown for BENCHMARKS.md; every speed is a ratio against a baseline timed in the same rounds
(``_common.interleaved``), median over rounds, with the per-run spread over ``--runs`` runs:

1. **Sizes**: stored and resident bits/param of every codec on a 4096 x 4096 Gaussian delta, beside the
   layout the code had before (computed from its formula) and the targets.
2. **apply_**: in place into a 4096 x 4096 weight (fp32, bf16; 1 and 2 torch threads), compiled C and
   torch paths, against a dense ``weight.add_(delta)`` of the weight's dtype. Target ≥ 0.5x for the packed
   layouts at d ≤ 0.1 and for 1-bit. Each path is first checked bit for bit against the reference.
3. **delta_matmul** at 1, 8 and 64 rows against ``F.linear(x, W)`` of the same shape and dtype.
4. **Mixed batch**: 8 experts (LoRA r=16, 1-bit, ComPEFT d=0.1) over 8 or 64 rows against the same batch
   through one merged weight. Target (DESIGN §3) ≤ 1.5x the merged time for LoRA-shaped experts.
5. **Compiled path**: first-call cost (build into an empty cache, then load).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import header, interleaved, mark, median, table

from deltahub.codecs import get_codec
from deltahub.kernels import LowRank, apply_, delta_matmul, mixed_linear
from deltahub.kernels import reference as ref
from deltahub.kernels.stack import ExpertStack

CODECS = [  # (label, codec, params, size target bits/param or None, apply target applies)
    ("compeft d=0.1", "compeft", {"density": 0.1}, 1.25, True),
    ("compeft d=0.05", "compeft", {"density": 0.05}, None, True),
    ("compeft d=0.01", "compeft", {"density": 0.01}, None, True),
    ("dare p=0.9 fp16", "dare", {"p": 0.9}, None, True),
    ("dare p=0.99 fp16", "dare", {"p": 0.99}, 0.45, True),
    ("bitdelta (1-bit)", "bitdelta", {}, 1.01, True),
    ("binary b=1", "binary", {"bits": 1}, 1.01, True),
    ("binary b=2", "binary", {"bits": 2}, 2.05, False),
    ("binary b=4", "binary", {"bits": 4}, 4.05, False),
]
APPLY = ["compeft d=0.1", "compeft d=0.05", "compeft d=0.01", "dare p=0.9 fp16", "dare p=0.99 fp16",
         "bitdelta (1-bit)", "binary b=2"]


def encode(codec_name: str, params: dict, shape: tuple[int, int]) -> tuple[object, object]:
    codec = get_codec(codec_name)
    config = codec.parse_config(params)
    d = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.01
    enc = codec.encode(d, config, codec.fit_one("t", d, config), name="t")
    return enc, codec.to_resident(enc, shape)


def _before(label: str, d: float) -> str:
    """Bits/param of the layout the code used before issue 7 (its formula; only tensor bytes)."""
    if label.startswith("compeft"):
        return f"{72 * d:.2f} (SparseCOO int64 + int8)"
    if label.startswith("dare"):
        return f"{80 * d:.2f} (SparseCOO int64 + fp16)"
    if label.startswith(("bitdelta", "binary b=1")):
        return "1.00 (SignBits, stride-0 scales)"
    return "32.00 (Dense fp32)"


def bench_sizes(shape: tuple[int, int], residents: dict) -> tuple[str, bool]:
    rows, ok = [], True
    n = math.prod(shape)
    for label, _, params, target, _ in CODECS:
        enc, res = residents[label]
        d = params.get("density", 1 - params.get("p", 0.0))
        bits = res.bits_per_param()
        good = None if target is None else bits <= target
        ok &= good is not False
        rows.append([label, f"{8 * enc.nbytes() / n:.3f}", type(res).__name__, f"{bits:.3f}", _before(label, d),
                     "—" if target is None else f"≤ {target}", mark(good)])
    text = (f"### 1. Stored vs resident bits/param ({shape[0]}x{shape[1]} Gaussian delta)\n\n"
            + table(["codec", "stored", "resident layout", "resident", "before", "target", "met"], rows))
    return text, ok


def _spread(ratios: list[float]) -> str:
    return f"{median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f})"


def bench_apply(shape: tuple[int, int], residents: dict, repeats: int, runs: int) -> tuple[str, bool]:
    rows, ok = [], True
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            w = w0.clone()
            dense = (torch.randn(shape) * 0.01).to(dtype)
            paths = {"dense add": lambda w=w, d=dense: w.add_(d)}
            for label in APPLY:
                res = residents[label][1]
                want = ref.apply_(w0.clone(), res)
                for backend in ("compiled", "torch"):
                    assert torch.equal(apply_(w0.clone(), res, backend=backend), want), (label, backend, dtype)
                    paths[f"{label} / {backend}"] = lambda w=w, res=res, b=backend: apply_(w, res, backend=b)
            per_run = [interleaved(paths, repeats=repeats, setup=lambda _, w=w, w0=w0: w.copy_(w0)) for _ in range(runs)]
            base = [median(t["dense add"]) for t in per_run]
            rows.append([threads, str(dtype)[6:], "dense `w.add_(delta)`", f"{median(base) * 1e3:.2f}", "1.00x",
                         "—", "—"])
            for name in list(paths)[1:]:
                ratios = [b / median(t[name]) for b, t in zip(base, per_run)]
                label, backend = name.split(" / ")
                target = next(c[4] for c in CODECS if c[0] == label) and backend == "compiled"  # the default
                good = median(ratios) >= 0.5 if target else None
                ok &= good is not False
                rows.append([threads, str(dtype)[6:], name, f"{median([median(t[name]) for t in per_run]) * 1e3:.2f}",
                             _spread(ratios), "≥ 0.5x" if target else ("fallback" if backend == "torch" else "—"),
                             mark(good)])
    torch.set_num_threads(default_threads)
    text = (f"### 2. CPU `apply_` into a {shape[0]}x{shape[1]} weight ({runs} runs of {repeats} rounds)\n\n"
            "Speed ratio = t(dense add) / t(path), same rounds; brackets: lowest and highest run.\n\n"
            + table(["threads", "weight", "path", "median ms", "speed vs dense add", "target", "met"], rows))
    return text, ok


def bench_matmul(shape: tuple[int, int], residents: dict, repeats: int) -> str:
    rows = []
    layouts = {k: residents[k][1] for k in ("compeft d=0.1", "dare p=0.99 fp16", "bitdelta (1-bit)")}
    g = torch.Generator().manual_seed(2)
    layouts["LoRA r=16"] = LowRank(torch.randn(16, shape[1], generator=g) * 0.01,
                                   torch.randn(shape[0], 16, generator=g) * 0.01, 2.0, shape)
    for dtype in (torch.float32, torch.bfloat16):
        W = torch.randn(shape, generator=g).to(dtype)
        for m in (1, 8, 64):
            x = torch.randn(m, shape[1], generator=g).to(dtype)
            paths = {"dense": lambda x=x, W=W: torch.nn.functional.linear(x, W)}
            for k, res in layouts.items():
                got, want = delta_matmul(x, res), ref.delta_matmul(x, res)
                assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * float(want.abs().max())), k
                paths[k] = lambda x=x, res=res: delta_matmul(x, res)
            t = interleaved(paths, repeats=repeats)
            base = median(t["dense"])
            rows.append([str(dtype)[6:], m, f"{base * 1e3:.2f}",
                         *[f"{median(t[k]) * 1e3:.2f} ({base / median(t[k]):.2f}x)" for k in layouts]])
    return (f"### 3. CPU `delta_matmul` vs `F.linear(x, W)` ({shape[0]}x{shape[1]}, median of {repeats} rounds)\n\n"
            "Cells: median ms (speed ratio vs the dense matmul of the same shape; 1.0 = as fast).\n\n"
            + table(["x dtype", "rows", "dense ms", *layouts], rows))


def bench_mixed(shape: tuple[int, int], residents: dict, repeats: int) -> tuple[str, bool]:
    g = torch.Generator().manual_seed(3)
    kinds = {
        "8 x LoRA r=16": [LowRank(torch.randn(16, shape[1], generator=g) * 0.01,
                                  torch.randn(shape[0], 16, generator=g) * 0.01, 2.0, shape) for _ in range(8)],
        "8 x 1-bit (bitdelta)": [encode("bitdelta", {}, shape)[1] for _ in range(1)] * 8,
        "8 x compeft d=0.1": [residents["compeft d=0.1"][1]] * 8,
    }
    rows, ok = [], True
    W = torch.randn(shape, generator=g)
    for label, experts in kinds.items():
        stack = ExpertStack(experts)
        for per in (1, 8):
            x = torch.randn(8 * per, shape[1], generator=g)
            index = torch.arange(8).repeat_interleave(per)
            merged = apply_(W.clone(), experts[0])
            want = ref.mixed_linear(x, W, experts, index)
            assert torch.allclose(mixed_linear(x, W, index, stack), want, rtol=1e-4, atol=1e-3)
            t = interleaved({"merged": lambda x=x, m=merged: torch.nn.functional.linear(x, m),
                             "mixed": lambda x=x, s=stack, i=index: mixed_linear(x, W, i, s)}, repeats=repeats)
            ratio = median(t["mixed"]) / median(t["merged"])
            good = ratio <= 1.5 if label.startswith("8 x LoRA") else None
            ok &= good is not False
            rows.append([label, 8 * per, f"{median(t['merged']) * 1e3:.2f}", f"{median(t['mixed']) * 1e3:.2f}",
                         f"{ratio:.2f}x", "≤ 1.5x" if good is not None else "—", mark(good)])
    return (f"### 4. Mixed batch of 8 experts vs one merged weight (fp32, {shape[0]}x{shape[1]}, median of "
            f"{repeats} rounds)\n\nTime ratio = t(mixed) / t(merged): 1.0 = free, 2.0 = twice the merged time.\n\n"
            + table(["experts", "rows", "merged ms", "mixed ms", "time ratio", "target", "met"], rows)), ok


def bench_compile() -> str:
    from deltahub.kernels import native

    cc = native._compiler()
    if cc is None:
        return f"### 5. Compiled CPU path\n\nNot available here: {native.unavailable_reason()}."
    saved = os.environ.get(native.ENV_CACHE)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[native.ENV_CACHE] = tmp
        try:
            t0 = time.perf_counter()
            lib = native._build(cc)
            built = time.perf_counter() - t0
            t0 = time.perf_counter()
            native._build(cc)
            cached = time.perf_counter() - t0
            size = lib.stat().st_size
        finally:
            if saved is None:
                os.environ.pop(native.ENV_CACHE)
            else:
                os.environ[native.ENV_CACHE] = saved
    return (f"### 5. Compiled CPU path\n\nFirst call (build `cpu_kernels.c` with `{cc} {' '.join(native._flags())}` "
            f"into an empty cache): {built:.2f} s; later processes find it cached ({cached * 1e3:.1f} ms to check "
            f"the key). Library: {size / 1024:.0f} KiB.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1024x1024, few rounds")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per run (default 11; quick 3)")
    ap.add_argument("--runs", type=int, default=None, help="runs of the apply timings (default 3; quick 1)")
    ap.add_argument("--only", default="sizes,apply,matmul,mixed,compile", help="comma list of sections")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    shape = (1024, 1024) if args.quick else (4096, 4096)
    repeats = args.repeats or (3 if args.quick else 11)
    runs = args.runs or (1 if args.quick else 3)
    t0 = time.perf_counter()
    from deltahub.kernels import native

    print(header("Machine", [f"mode: {'--quick' if args.quick else 'full'}; {shape[0]}x{shape[1]} tensors",
                             f"compiled CPU kernels: {'yes' if native.library() else native.unavailable_reason()}"]))
    residents = {label: encode(c, p, shape) for label, c, p, _, _ in CODECS}
    sections, ok = [], True
    for name, fn in [("sizes", lambda: bench_sizes(shape, residents)),
                     ("apply", lambda: bench_apply(shape, residents, repeats, runs)),
                     ("matmul", lambda: (bench_matmul(shape, residents, repeats), True)),
                     ("mixed", lambda: bench_mixed(shape, residents, repeats)),
                     ("compile", lambda: (bench_compile(), True))]:
        if name in only:
            text, good = fn()
            sections.append(text)
            ok &= good
    for s in sections:
        print("\n" + s)
    print(f"\n_{'all targets met' if ok else 'some targets missed'}; wall time {time.perf_counter() - t0:.0f} s_")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
