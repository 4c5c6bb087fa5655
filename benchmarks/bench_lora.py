"""Benchmark LoRA experts end to end on the real task (issue 8 item 6).

    python benchmarks/bench_lora.py            # r = 8 and 16, 200 training steps each (~2-3 min on 2 cores)
    python benchmarks/bench_lora.py --quick    # r = 4, 20 steps: a smoke run

Trains a PEFT LoRA on all-MiniLM-L6-v2 for word polarity (``examples/polarity_task.py``), then for each codec:
``deltahub compress`` the PEFT folder (factors encoded by the codec), push it to a local registry, pull it
back, ``deltahub export`` it to a PEFT folder and load that with ``PeftModel.from_pretrained``. Prints, per
(rank, codec): bytes on disk against PEFT's own ``adapter_model.safetensors``, test accuracy and the
agreement of predictions with the original adapter, and the wall time of each step (one run each: these
are seconds-long steps, reported, not compared).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
os.environ.setdefault("DELTAHUB_NO_PROGRESS", "1")

import torch
from _common import header, table

CODECS = [("dense", {}), ("compeft", {"density": 0.3}), ("compeft", {"density": 0.1}), ("binary", {"bits": 1})]


def _task():
    path = Path(__file__).resolve().parents[1] / "examples" / "polarity_task.py"
    spec = importlib.util.spec_from_file_location("polarity_task", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["polarity_task"] = module
    spec.loader.exec_module(module)
    return module


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "README.md")


@torch.no_grad()
def _predictions(pt, model, test) -> torch.Tensor:
    tok = pt._tokenizer()
    return torch.cat([model(**pt._encode(tok, [w for w, _ in test[i:i + 256]])).logits.argmax(-1)
                      for i in range(0, len(test), 256)])


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run(rank: int, steps: int, work: Path) -> list[list[object]]:
    import deltahub
    from deltahub.exporting import export

    pt = _task()
    _, test = pt.load_dataset(seed=0)
    metrics: dict = {}
    adapter = pt.finetune_lora(work / f"peft-r{rank}", r=rank, steps=steps, metrics=metrics)
    original = pt.load_peft_classifier(adapter)
    ref = _predictions(pt, original, test)
    gold = torch.tensor([y for _, y in test])
    peft_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    rows = [[rank, "PEFT folder (trained)", f"{peft_bytes:,}", f"{peft_bytes:,}", "1.00x",
             f"{float((ref == gold).float().mean()):.4f}",
             "1.0000", f"train {metrics['train_seconds']:.1f}", "—", "—", "—"]]
    reg = deltahub.Registry(str(work / f"registry-r{rank}"))
    for codec, params in CODECS:
        label = codec + "".join(f" {k}={v}" for k, v in params.items())
        slug = f"r{rank}-{codec}-{'-'.join(str(v) for v in params.values())}"
        art, t_compress = _timed(deltahub.compress, adapter, base=pt.base_model_dir(), codec=codec, out=work / slug,
                                 name=slug, **params)
        _, t_push = _timed(reg.push, art)
        pulled, t_pull = _timed(reg.pull, slug, out=work / f"{slug}-pulled")
        _, t_export = _timed(export, pulled, work / f"{slug}-peft")
        model = pt.load_peft_classifier(work / f"{slug}-peft")
        pred = _predictions(pt, model, test)
        payload = sum(f.size for f in art.manifest.files if f.path.endswith(".safetensors"))
        rows.append([rank, label, f"{payload:,}", f"{_size(work / slug):,}", f"{peft_bytes / _size(work / slug):.2f}x",
                     f"{float((pred == gold).float().mean()):.4f}", f"{float((pred == ref).float().mean()):.4f}",
                     f"{t_compress:.2f}", f"{t_push:.2f}", f"{t_pull:.2f}", f"{t_export:.2f}"])
        assert codec != "dense" or torch.equal(pred, ref), "dense must reproduce the adapter exactly"
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="r = 4, 20 steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    ranks, steps = ((4,), 20) if args.quick else ((8, 16), 200)
    print(header("Machine", [f"mode: {'--quick' if args.quick else 'full'}; LoRA ranks {ranks}, {steps} steps"]))
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DELTAHUB_HOME"] = str(Path(tmp) / "home")
        for r in ranks:
            rows += run(r, steps, Path(tmp))
    print("\n### LoRA experts: import, compress, push, pull, export, reload in PEFT\n")
    print("Payload: the artifact's safetensors files. On disk: the artifact folder (payloads + the `deltahub.json`\n"
          "manifest, card excluded), against PEFT's `adapter_model.safetensors` (its config and card not counted). Agreement: share of test words whose predicted label equals the trained\n"
          "adapter's. Times in seconds, one run each.\n")
    print(table(["r", "expert", "payload bytes", "bytes on disk", "smaller than PEFT", "test accuracy", "agreement",
                 "compress s", "push s", "pull s", "export s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
