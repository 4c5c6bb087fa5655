"""Benchmark deltahub.entropy: size vs the entropy bound and encode/decode throughput.

Run: ``python benchmarks/bench_entropy.py`` (from the repo root). For each density d a
random i.i.d. mask over a 4096 x 4096 tensor (16.8 M parameters) is coded as Rice
positions ("q" + "r" streams) plus one sign bit per kept entry. Prints a markdown
table; timings are the median of 5 runs (time.perf_counter), throughput is in
millions of parameters (numel) per second.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltahub.entropy import (  # noqa: E402
    decode_positions,
    encode_positions,
    entropy_bound,
    pack_signs,
    unpack_signs,
)

SHAPE = (4096, 4096)
DENSITIES = (0.01, 0.05, 0.1, 0.2, 0.5)
RUNS = 5
TARGET_RATIO = 1.03  # project target at d = 0.05, 0.1, 0.2


def _median_s(fn) -> float:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_density(d: float, numel: int, rng: np.random.Generator) -> dict[str, float]:
    """Codes one random mask of density d; returns sizes and median timings."""
    positions = torch.from_numpy(np.flatnonzero(rng.random(numel) < d))
    signs = torch.from_numpy(rng.random(positions.numel()) < 0.5)  # True = negative
    count = positions.numel()

    def encode():
        return encode_positions(positions, numel), pack_signs(signs)

    (streams, meta), packed = encode()

    def decode():
        return decode_positions(streams, meta, numel=numel, count=count), unpack_signs(packed, count)

    out_pos, out_signs = decode()
    assert torch.equal(out_pos, positions) and torch.equal(out_signs < 0, signs)
    bits = 8 * (streams["q"].numel() + streams["r"].numel() + packed.numel())
    bound = entropy_bound(count / numel)
    return {
        "d": d,
        "k": int(meta["k"]),
        "count": count,
        "bpp": bits / numel,
        "bound": bound,
        "ratio": bits / numel / bound,
        "enc_s": _median_s(encode),
        "dec_s": _median_s(decode),
    }


def main() -> int:
    numel = SHAPE[0] * SHAPE[1]
    rng = np.random.default_rng(0)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, cpus={os.cpu_count()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"tensor: {SHAPE[0]}x{SHAPE[1]} = {numel:,} params, random i.i.d. masks, median of {RUNS} runs\n")
    print(
        "| d | k | kept | bits/param | bound H_b(d)+d | ratio "
        "| encode ms | encode Mparam/s | decode ms | decode Mparam/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for d in DENSITIES:
        r = bench_density(d, numel, rng)
        if d in (0.05, 0.1, 0.2):
            ok &= r["ratio"] <= TARGET_RATIO
        print(
            f"| {d} | {r['k']} | {r['count']:,} | {r['bpp']:.4f} | {r['bound']:.4f} | {r['ratio']:.4f} "
            f"| {1e3 * r['enc_s']:.1f} | {numel / r['enc_s'] / 1e6:.0f} "
            f"| {1e3 * r['dec_s']:.1f} | {numel / r['dec_s'] / 1e6:.0f} |"
        )
    print(f"\nsize target (ratio <= {TARGET_RATIO} at d = 0.05, 0.1, 0.2): {'met' if ok else 'MISSED'}")
    print("timings include sign packing/unpacking; positions are int64, signs bool")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
