"""Merge two real experts of all-MiniLM-L6-v2 with every method and score the result on both tasks (issue 9).

    pip install --no-deps textblob      # only its subjectivity lexicon (en-sentiment.xml) is read
    python benchmarks/bench_merge.py [--steps 150]

Task A is the demo's word polarity (VADER); task B is word subjectivity from TextBlob's lexicon (mean
subjectivity of a word's senses > 0.5 vs < 0.5; words at exactly 0.5 left out). Each task gets a full
fine-tune, stored with ComPEFT d = 0.1. The encoders are merged (``new="drop"``: the two task heads stay
each task's own) and each task is scored with the merged encoder + its own head, as % of that expert's own
accuracy. One run each (merges take about a second; reported, not compared).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
warnings.filterwarnings("ignore")
os.environ.setdefault("DELTAHUB_NO_PROGRESS", "1")

import polarity_task as task
import torch
from _common import header, table

METHODS = [("task_arithmetic", {}), ("ties", {"density": 0.2}), ("dare_linear", {"density": 0.3, "seed": 0}),
           ("dare_ties", {"density": 0.3, "seed": 0}), ("magnitude_prune", {"density": 0.2})]


def subjectivity_dataset(seed: int = 0) -> tuple[list, list]:
    spec = importlib.util.find_spec("textblob")
    if spec is None:
        raise SystemExit("bench_merge.py needs TextBlob's lexicon: pip install --no-deps textblob")
    xml = (Path(next(iter(spec.submodule_search_locations))) / "en" / "en-sentiment.xml").read_text()
    senses: dict[str, list[float]] = {}
    for m in re.finditer(r'<word form="([^"]+)"[^>]*subjectivity="([0-9.]+)"', xml):
        senses.setdefault(m.group(1).lower(), []).append(float(m.group(2)))
    data = [(w, int(sum(v) / len(v) > 0.5)) for w, v in senses.items() if sum(v) / len(v) != 0.5]
    random.Random(seed).shuffle(data)
    cut = len(data) // 5
    return data[cut:], data[:cut]


def finetune(out: Path, train: list, steps: int) -> torch.nn.Module:
    torch.set_num_threads(2)
    model = task._init_classifier(0)
    task._train_loop(model, task._tokenizer(), train, steps=steps, lr=1e-4, batch_size=32, seed=0, weight_decay=0.01)
    model.save_pretrained(str(out))
    return model.eval()


def score(encoder_state: dict, head_art, test: list) -> float:
    model = task._init_classifier(0)
    model.load_state_dict(encoder_state)
    head = {e.name: head_art.decode_tensor(e) for e in head_art.manifest.tensors if e.op == "replace"}
    model.load_state_dict(head, strict=False)
    return task.evaluate(model.eval(), test)


def main() -> None:
    import deltahub

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    tasks = {"polarity": task.load_dataset(seed=0), "subjectivity": subjectivity_dataset()}
    with tempfile.TemporaryDirectory(prefix="deltahub-bench-merge-") as tmp:
        work = Path(tmp)
        arts, own = {}, {}
        for t, (train, test) in tasks.items():
            finetune(work / f"ft-{t}", train, args.steps)
            arts[t] = deltahub.compress(work / f"ft-{t}", base=task.base_model_dir(), codec="compeft", density=0.1,
                                        out=work / t, name=t)
            own[t] = score(deltahub.apply(arts[t], task._init_classifier(0)).state_dict(), arts[t], tasks[t][1])
        sizes = f"test words: {len(tasks['polarity'][1])} / {len(tasks['subjectivity'][1])}"
        print(header("Machine", ["benchmark: merging two MiniLM experts (polarity, subjectivity)",
                                 f"fine-tunes: {args.steps} steps each, stored with compeft d=0.1; {sizes}"]))
        both = " + ".join(f"{sum(f.size for f in arts[t].manifest.files):,}" for t in tasks)
        rows = [["each expert alone", "—", f"{own['polarity']:.4f} (100%)", f"{own['subjectivity']:.4f} (100%)",
                 both, "—"]]
        for method, params in METHODS:
            t0 = time.perf_counter()
            m = deltahub.merge([arts["polarity"], arts["subjectivity"]], method=method, codec="compeft",
                               codec_density=0.1, new="drop", out=work / f"m-{method}", name=f"m-{method}", **params)
            dt = time.perf_counter() - t0
            enc = deltahub.apply(m, task._init_classifier(0)).state_dict()
            acc = {t: score(enc, arts[t], tasks[t][1]) for t in tasks}
            rows.append([method, ", ".join(f"{k}={v}" for k, v in params.items()) or "—",
                         f"{acc['polarity']:.4f} ({100 * acc['polarity'] / own['polarity']:.1f}%)",
                         f"{acc['subjectivity']:.4f} ({100 * acc['subjectivity'] / own['subjectivity']:.1f}%)",
                         f"{sum(f.size for f in m.manifest.files):,}", f"{dt:.2f}"])
        print()
        print(table(["merged model", "options", "polarity acc (% of expert)", "subjectivity acc (% of expert)",
                     "bytes on disk", "merge s"], rows))


if __name__ == "__main__":
    main()
