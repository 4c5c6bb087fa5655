"""Adapter kinds on the demo task (issue 11): trainable parameters, bytes on disk, task accuracy.

    python benchmarks/bench_adapters.py [--steps 200] [--only TEXT]

Each row trains one adapter with ``examples/train_adapter.py``'s ``train`` (all-MiniLM-L6-v2, adapter on
``query``/``key``/``value``/``dense``, a new 2-way head trained whole; AdamW lr 1e-3, batch 32, seed 0,
2 threads), stores it (``store``: native tensors, the head dense fp32), applies the stored artifact to a
fresh base classifier and scores that on the 1112 test words: the accuracy a user of the artifact gets.
1-bit rows: ``QAT`` trains with the straight-through estimator at b = 1 and stores with ``binary`` bits=1;
``PTQ`` trains in full precision and stores the same way (the loss quantization-aware training avoids).
``bytes on disk`` is the artifact folder (payload, manifest, card); ``adapter params`` excludes the head
(770 parameters, 3,080 bytes, in every row). Writes ``benchmarks/adapters.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_adapter as ex

# (label, kind, inject config overrides, QAT bits, storage bits)
ROWS = [
    ("lora r=8", "lora", {"r": 8, "lora_alpha": 16}, None, None),
    ("lora r=2 (MoS's budget)", "lora", {"r": 2, "lora_alpha": 4}, None, None),
    ("mos r=6 v=2 p=1 c=2", "mos", {}, None, None),
    ("flora r=8", "flora", {"r": 8, "scale": 2.0}, None, None),
    ("compacter n=4 reduction=32 (lr 3e-3)", "compacter", {"lr": 3e-3}, None, None),  # the paper's lr
    ("lora r=8 1-bit PTQ", "lora", {"r": 8, "lora_alpha": 16}, None, 1),
    ("lora r=8 1-bit QAT", "lora", {"r": 8, "lora_alpha": 16}, 1, 1),
    ("mos 1-bit PTQ", "mos", {}, None, 1),
    ("mos 1-bit QAT", "mos", {}, 1, 1),
]


def run_row(label: str, kind: str, cfg: dict, qat: int | None, store_bits: int | None, steps: int,
            work: Path) -> dict:
    cfg = dict(cfg)
    lr = cfg.pop("lr", 1e-3)
    model, m = ex.train(kind, bits=qat, steps=steps, lr=lr, config=cfg)
    out = work / label.replace(" ", "_").replace("=", "-").replace("(", "").replace(")", "").replace("'", "")
    art = ex.store(model, kind, out, bits=store_bits)
    disk = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    fresh = ex.task._init_classifier(seed=123)
    ex.load_into(out, fresh)
    _, test = ex.task.load_dataset(seed=0)
    acc = ex.task.evaluate(fresh, test, tokenizer=ex.task._tokenizer())
    native = sum(e.stored_bytes() for e in art.manifest.tensors if e.op == "native")
    return {"label": label, "kind": kind, "config": cfg, "qat_bits": qat, "stored_bits": store_bits,
            "adapter_params": m["adapter_params"], "head_params": m["head_params"], "native_bytes": native,
            "disk_bytes": disk, "trained_accuracy": m["test_accuracy"], "stored_accuracy": acc,
            "loss_before": m["loss_before"], "loss_after": m["loss_after"], "train_s": m["train_s"]}


def table(rows: list[dict]) -> str:
    lines = [("| adapter | adapter params | native bytes | bytes on disk | accuracy (trained) | accuracy (stored) "
              "| loss before → after | train s |"), "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['adapter_params']:,} | {r['native_bytes']:,} | {r['disk_bytes']:,} | "
                     f"{r['trained_accuracy']:.4f} | {r['stored_accuracy']:.4f} | {r['loss_before']:.3f} → "
                     f"{r['loss_after']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", action="append", default=[], metavar="TEXT")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "adapters.json"))
    args = parser.parse_args(argv)
    from bench_fidelity import machine_info

    t0 = time.perf_counter()
    machine = machine_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="deltahub-bench-adapters-") as work:
        for label, kind, cfg, qat, bits in ROWS:
            if args.only and not any(s in label for s in args.only):
                continue
            rows.append(run_row(label, kind, cfg, qat, bits, args.steps, Path(work)))
            r = rows[-1]
            print(f"{label:28s} {r['adapter_params']:>9,} params  {r['disk_bytes']:>9,} B on disk  acc "
                  f"{r['trained_accuracy']:.4f} trained / {r['stored_accuracy']:.4f} stored  ({r['train_s']:.0f} s)",
                  flush=True)
    results = {"machine": machine, "steps": args.steps, "rows": rows,
               "total_runtime_s": round(time.perf_counter() - t0, 1)}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
