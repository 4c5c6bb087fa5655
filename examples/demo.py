"""deltahub's main job, end to end on a real model, offline.

1. fine-tune all-MiniLM-L6-v2 on word polarity (the VADER lexicon) — a full fine-tune, every weight moves;
2. extract the delta against the base and compress it with ComPEFT;
3. push it to the local registry, pull it back (verified), and apply it to the base;
4. print the size ratio and the task accuracy of the base, the fine-tune and the compressed expert.

Usage: python examples/demo.py [--workdir DIR] [--steps 200] [--density 0.1]
The registry is DELTAHUB_HOME (default ~/.cache/deltahub); the artifact is named ``minilm-polarity``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polarity_task as task  # noqa: E402

import deltahub  # noqa: E402
from deltahub.constants import home  # noqa: E402

NAME = "minilm-polarity"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="where models and artifacts go (default: a temp folder)")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps (default 200)")
    ap.add_argument("--density", type=float, default=0.1, help="ComPEFT density (default 0.1)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deltahub-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    base = task.base_model_dir()
    _, test = task.load_dataset()
    t = {}

    print(f"[1/4] fine-tuning all-MiniLM-L6-v2 on VADER word polarity ({args.steps} steps) ...", flush=True)
    t0 = time.perf_counter()
    ft = task.finetune(work / "finetuned", steps=args.steps)
    t["fine-tune"] = time.perf_counter() - t0

    print(f"[2/4] compressing the delta with compeft (density {args.density}) ...", flush=True)
    t0 = time.perf_counter()
    art = deltahub.compress(ft, base=base, codec="compeft", density=args.density, out=work / NAME, name=NAME)
    t["compress"] = time.perf_counter() - t0

    print(f"[3/4] push -> pull through the local registry at {home()} ...", flush=True)
    t0 = time.perf_counter()
    registry = deltahub.Registry()
    registry.push(art)
    pulled = registry.pull(NAME)
    assert pulled.id == art.id, "the pulled artifact must be the pushed one"
    t["push+pull"] = time.perf_counter() - t0

    print("[4/4] applying the pulled expert to the base and evaluating ...", flush=True)
    t0 = time.perf_counter()
    merged = deltahub.apply(pulled, base, out=work / "merged")
    t["apply"] = time.perf_counter() - t0
    acc_base, acc_ft, acc_expert = task.evaluate_base(test), task.evaluate(ft, test), task.evaluate(merged, test)
    _summary(art, ft, acc_base, acc_ft, acc_expert, len(test), t, work)


def _summary(art: deltahub.Artifact, ft: Path, acc_base: float, acc_ft: float, acc_expert: float, n_test: int,
             t: dict[str, float], work: Path) -> None:
    s = art.manifest.stats
    ft_bytes = (ft / "model.safetensors").stat().st_size
    art_bytes = sum(f.size for f in art.manifest.files)
    print()
    print(f"artifact   {art.name}  id {art.id[:12]}  ({s['matched']} tensors matched, {s['new']} new, "
          f"{s['unchanged']} unchanged)")
    print(f"size       fine-tuned checkpoint {ft_bytes / 1e6:.1f} MB -> artifact {art_bytes / 1e6:.2f} MB "
          f"({ft_bytes / art_bytes:.0f}x smaller)")
    print(f"           delta: {s['bits_per_param']:.3f} bits/param, {s['ratio_vs_fp16']:.1f}x vs a dense fp16 delta, "
          f"relative error {s['rel_error']:.3f}")
    print(f"accuracy   on {n_test} held-out words:")
    print(f"             base (zero-shot)       {acc_base:.3f}")
    print(f"             fine-tuned             {acc_ft:.3f}")
    print(f"             compressed expert      {acc_expert:.3f}   (pulled from the registry, applied to the base)")
    print("time       " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    print(f"files      {work}")


if __name__ == "__main__":
    main()
