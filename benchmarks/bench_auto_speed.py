"""`auto` encode time against its slowest single candidate (issue 13 item 4), on the MiniLM demo fine-tune.

    python benchmarks/bench_auto_speed.py [--workdir DIR] [--repeats 3]

Each setting is one ``deltahub.compress`` call (read both checkpoints, fit, encode, write, verify) of the
fine-tune in ``WORKDIR/finetuned`` (made by ``bench_fidelity.py``; fine-tuned here if missing). Rounds are
interleaved (every setting once per round, ``--repeats`` rounds) and the median per setting is reported;
the figure is ``auto``'s median over the slowest single-codec median, one per codec family of its grid at
the setting whose encode is the slowest. Calibrated ``auto`` is timed separately (its activation capture
and Fisher pass are part of the call, the first one builds them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DELTAHUB_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import polarity_task as task  # noqa: E402
import torch  # noqa: E402

import deltahub  # noqa: E402

SINGLES = [("dense", {}), ("dense", {"dtype": "float16"}), ("compeft", {"density": 0.5}), ("dare", {"p": 0.8}),
           ("darex", {"p": 0.95, "q": 0.1}), ("bitdelta", {"include_embeddings": True}), ("binary", {"bits": 4})]


def main(argv: list[str] | None = None) -> int:
    from bench_fidelity import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "deltahub-bench-fidelity"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "auto_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    machine = machine_info()
    ft = Path(args.workdir) / "finetuned"
    if not (ft / "model.safetensors").is_file():
        task.finetune(ft, steps=200)
    base = task.base_model_dir()
    settings = [*SINGLES, ("auto", {}), ("auto", {"max_bits_per_param": 0.3})]
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for codec, params in settings:
                label = " ".join([codec, *(f"{k}={v}" for k, v in params.items())])
                t0 = time.perf_counter()
                deltahub.compress(str(ft), base=str(base), codec=codec, out=Path(tmp) / "a", **params)
                times.setdefault(label, []).append(time.perf_counter() - t0)
                print(f"{label:34s} {times[label][-1]:6.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    slowest = max((k for k in med if not k.startswith("auto")), key=med.get)
    ratios = {k: round(v / med[slowest], 2) for k, v in med.items() if k.startswith("auto")}
    out = {"machine": machine, "repeats": args.repeats, "median_s": med, "runs_s": times, "slowest_single": slowest,
           "auto_over_slowest_single": ratios}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nslowest single: {slowest} ({med[slowest]:.2f} s median); auto / slowest: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
