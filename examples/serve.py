"""Serve three experts on one all-MiniLM-L6-v2 with ``deltahub.ExpertPool``: a mixed batch, then hot swaps.

1. make sure the local registry holds three polarity experts (a full fine-tune stored with ComPEFT and with
   DARE, and a PEFT LoRA); any that are missing are trained here (a few minutes on 2 cores, once);
2. load the base once and pull the three experts into a pool (packed residents beside the base weights);
3. answer one batch whose rows name different experts (on-the-fly mode) and print who served each row;
4. swap each expert into the weights (merged mode) and back to the base, bit for bit.

Usage: python examples/serve.py [--steps 100] [--workdir DIR]
The registry is DELTAHUB_HOME (default ~/.cache/deltahub).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polarity_task as task
import torch

import deltahub
from deltahub.constants import home

EXPERTS = {"polarity-compeft": ("full", "compeft", {"density": 0.1}),
           "polarity-dare": ("full", "dare", {"p": 0.99}),
           "polarity-lora": ("lora", "dense", {})}
WORDS = ["wonderful", "dreadful", "cheerful", "gloomy", "superb", "awful", "delight", "misery"]


def ensure_experts(registry: deltahub.Registry, work: Path, steps: int) -> None:
    """Push any of EXPERTS that the registry lacks, training the fine-tunes they come from."""
    have = {r.name for r in registry.ls()}
    missing = [n for n in EXPERTS if n not in have]
    base = task.base_model_dir()
    trained: dict[str, Path] = {}
    for name in missing:
        kind, codec, params = EXPERTS[name]
        if kind not in trained:
            print(f"  training a {kind} fine-tune ({steps} steps) for {name} ...", flush=True)
            train = task.finetune if kind == "full" else task.finetune_lora
            trained[kind] = train(work / kind, steps=steps)
        art = deltahub.compress(trained[kind], base=base, codec=codec, out=work / name, name=name, **params)
        registry.push(art)
        print(f"  pushed {name} ({codec}, {sum(f.size for f in art.manifest.files) / 1e6:.2f} MB)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps for experts made here (default 100)")
    ap.add_argument("--workdir", type=Path, help="where new fine-tunes go (default: a temp folder)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deltahub-serve-"))
    registry = deltahub.Registry()
    print(f"[1/4] experts in the local registry at {home()}", flush=True)
    ensure_experts(registry, work, args.steps)

    print("[2/4] loading the base and pulling three experts into a pool", flush=True)
    model = task._init_classifier(seed=0).eval()  # the head is each expert's own: experts replace it
    pool = deltahub.ExpertPool(model)
    for name in EXPERTS:
        pool.add(name, name)  # a registry ref: pulled, verified against the model's weights, packed
    stats = pool.stats()
    for name, e in stats["experts"].items():
        print(f"  {name:18s} {e['tensors']:3d} tensors, {e['bytes'] / 1e6:6.2f} MB resident, version {e['id'][:12]}")

    print("[3/4] one mixed batch (on-the-fly mode): each row names its expert", flush=True)
    tok = task._tokenizer()
    batch = tok(WORDS, padding=True, return_tensors="pt")
    names = [[*EXPERTS, None][i % 4] for i in range(len(WORDS))]
    times = []
    with torch.no_grad():
        for _ in range(5):
            t0 = time.perf_counter()
            with pool.route(names) as served:
                logits = model(**batch).logits
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model(**batch)
        plain = time.perf_counter() - t0
    p_pos = logits.softmax(-1)[:, 1]
    for word, name, vid, p in zip(WORDS, names, served, p_pos.tolist()):
        label = "positive" if p > 0.5 else "negative"
        print(f"  {word:10s} served by {name or '(base)':18s} {(vid or '-')[:12]:12s} -> {label:8s} p={p:.2f}")
    print(f"  batch of {len(WORDS)} rows, {len(set(names))} experts: {statistics.median(times) * 1e3:.1f} ms "
          f"(median of {len(times)}; the base alone {plain * 1e3:.1f} ms; an untrained head on base rows)")

    print("[4/4] hot swaps (merged mode): W <- W0 + delta in one pass, then back to the base", flush=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name in EXPERTS:
            t0 = time.perf_counter()
            pool.activate(name)
            dt = time.perf_counter() - t0
            p = model(**tok(["wonderful"], return_tensors="pt")).logits.softmax(-1)[0, 1]
            print(f"  activate({name!r}): {dt * 1e3:.1f} ms, 'wonderful' -> p(positive)={p:.2f}")
    pool.activate(None)
    exact = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    print(f"  activate(None): base restored bit for bit: {exact}")
    pool.close()


if __name__ == "__main__":
    main()
