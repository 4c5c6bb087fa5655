"""Benchmark the ExpertPool on all-MiniLM-L6-v2 (issue 12 item 8): hot swaps, mixed batches, resident bytes.

    python benchmarks/bench_pool.py            # 8 LoRA r=16 experts, 8 full-delta experts, 15 rounds
    python benchmarks/bench_pool.py --quick    # 2 + 2 experts, 3 rounds: a smoke run

Every ratio is against a baseline timed in the same interleaved rounds (benchmarks/_common.py):

- P1 hot swap of one LoRA r=16 expert for another in merged mode (``pool.activate``) vs loading the merged
  fine-tune with ``from_pretrained``, PEFT ``load_adapter`` + ``set_adapter``,
  ``peft.utils.hotswap.hotswap_adapter_from_state_dict`` (state dict in memory), and a plain ``copy_`` of
  the same touched tensors from memory (the memory-bound limit);
- P2 a batch whose rows name 8 LoRA experts (``pool.route``) vs the same batch on one merged model, and vs
  PEFT's mixed-batch path (``adapter_names=``);
- P3 a batch whose rows name 8 full-delta experts (compeft d=0.1, bitdelta) vs 8 merged models run one
  after another on their own rows;
- P4 resident bytes per expert and how many fit in a 1 GiB budget.

The LoRA factors and full deltas are random (speed and bytes do not depend on training).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
warnings.filterwarnings("ignore")
os.environ.setdefault("DELTAHUB_NO_PROGRESS", "1")

import polarity_task as task
import torch
from _common import header, interleaved, mark, median, table

TARGETS = ["query", "key", "value", "dense"]
WORDS = ["wonderful", "dreadful", "cheerful", "gloomy", "superb", "awful", "delight", "misery"]


def _classifier():
    return task._init_classifier(seed=0).eval()


def make_loras(work: Path, n: int, r: int) -> list[Path]:
    import peft

    out = []
    for k in range(n):
        pm = peft.get_peft_model(_classifier(), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        pm.save_pretrained(str(work / f"lora{k}"))
        out.append(work / f"lora{k}")
    return out


def make_full(work: Path, codec: str, k: int, **params):
    import deltahub

    g = torch.Generator().manual_seed(200 + k)
    ft = {n: v + 1e-3 * torch.randn(v.shape, generator=g) for n, v in _classifier().state_dict().items()}
    return deltahub.compress(ft, base=task.base_model_dir(), codec=codec, out=work / f"{codec}{k}",
                             name=f"{codec}{k}", **params)


def hot_swap(work: Path, loras: list[Path], repeats: int) -> list[list[object]]:
    import peft
    from peft.utils import load_peft_weights
    from peft.utils.hotswap import _insert_adapter_name_into_state_dict, hotswap_adapter_from_state_dict

    import deltahub

    arts = [deltahub.compress(p, base=task.base_model_dir(), out=work / f"art-{p.name}", name=p.name) for p in loras[:2]]
    model = _classifier()
    pool = deltahub.ExpertPool(model)
    for a in arts:
        pool.add(a.name, a)
    merged_dirs = []
    for p in loras[:2]:
        m = peft.PeftModel.from_pretrained(_classifier(), str(p)).merge_and_unload()
        m.save_pretrained(str(work / f"merged-{p.name}"))
        merged_dirs.append(work / f"merged-{p.name}")
    pm = peft.PeftModel.from_pretrained(_classifier(), str(loras[0])).eval()
    # what peft.utils.hotswap.hotswap_adapter does after reading the file: the swap itself, from memory
    sds = [_insert_adapter_name_into_state_dict(load_peft_weights(str(p), device="cpu"), adapter_name="default",
                                                parameter_prefix="lora_") for p in loras[:2]]
    peft_cfg = pm.peft_config["default"]
    loader = peft.PeftModel.from_pretrained(_classifier(), str(loras[0]), adapter_name="a0").eval()
    pool.activate(arts[0].name)
    slots = [ch.slot for ch in pool._names[arts[0].name].changes]
    sources = [s.tensor.clone() for s in slots]
    pool.activate(None)
    state = {"pool": 0, "hot": 0, "load": 0, "loaded": "a0"}

    def swap_pool() -> None:
        state["pool"] ^= 1
        pool.activate(arts[state["pool"]].name)

    def swap_hot() -> None:
        state["hot"] ^= 1
        hotswap_adapter_from_state_dict(pm, sds[state["hot"]], adapter_name="default", config=peft_cfg)

    def swap_load() -> None:
        state["load"] += 1
        name = f"a{state['load']}"
        loader.load_adapter(str(loras[state["load"] % 2]), adapter_name=name)
        loader.set_adapter(name)
        state["loaded"] = name

    def forget_old(name: str) -> None:  # outside the timed region: keep one adapter loaded
        if name == "peft load_adapter + set_adapter":
            for a in [a for a in loader.peft_config if a != state["loaded"]]:
                loader.delete_adapter(a)

    fns = {"pool.activate (merged mode)": swap_pool,
           "from_pretrained (merged checkpoint)": lambda: task.load_classifier(merged_dirs[state["hot"]]),
           "peft load_adapter + set_adapter": swap_load,
           "peft hotswap_adapter_from_state_dict": swap_hot,
           "copy_ of the touched tensors": lambda: [s.tensor.copy_(src) for s, src in zip(slots, sources)]}
    with torch.no_grad():
        times = interleaved(fns, repeats=repeats, setup=forget_old, warmup=2)
    pool.activate(None)
    t_pool = median(times["pool.activate (merged mode)"])
    nbytes = sum(s.tensor.numel() * s.tensor.element_size() for s in slots)
    rows = []
    for name, ts in times.items():
        t = median(ts)
        target = None if name.startswith("pool") else (t_pool <= 2 * t if name.startswith("copy_") else t_pool < t)
        rows.append([name, f"{t * 1e3:.2f}", f"{t / t_pool:.2f}x", mark(target)])
    rows.append([f"(touched: {len(slots)} tensors, {nbytes / 1e6:.1f} MB)", "", "", ""])
    return rows


def _batch(n_rows: int):
    tok = task._tokenizer()
    return tok([WORDS[i % len(WORDS)] for i in range(n_rows)], padding=True, return_tensors="pt")


def mixed_lora(work: Path, loras: list[Path], rows_per: int, repeats: int) -> list[list[object]]:
    import peft

    import deltahub

    n = len(loras)
    arts = [deltahub.compress(p, base=task.base_model_dir(), out=work / f"mix-{p.name}", name=p.name) for p in loras]
    model = _classifier()
    pool = deltahub.ExpertPool(model)
    for a in arts:
        pool.add(a.name, a)
    names = [arts[i % n].name for i in range(n * rows_per)]
    merged = peft.PeftModel.from_pretrained(_classifier(), str(loras[0])).merge_and_unload().eval()
    pm = peft.PeftModel.from_pretrained(_classifier(), str(loras[0]), adapter_name=loras[0].name).eval()
    for p in loras[1:]:
        pm.load_adapter(str(p), adapter_name=p.name)
    batch = _batch(len(names))

    def routed() -> None:
        with pool.route(names):
            model(**batch)

    fns = {"one merged model": lambda: merged(**batch), "pool.route": routed,
           "peft adapter_names": lambda: pm(**batch, adapter_names=names)}
    with torch.no_grad():
        times = interleaved(fns, repeats=repeats, warmup=2)
    t0 = median(times["one merged model"])
    return [[f"{n} x LoRA r=16, {len(names)} rows", name, f"{median(ts) * 1e3:.2f}", f"{median(ts) / t0:.2f}x",
             mark(median(ts) / t0 <= 1.5) if name == "pool.route" else "—"] for name, ts in times.items()]


def mixed_full(arts: list, rows_per: int, repeats: int) -> tuple[list[list[object]], list[list[object]]]:
    import deltahub

    n = len(arts)
    model = _classifier()
    pool = deltahub.ExpertPool(model)
    for a in arts:
        pool.add(a.name, a)
    names = [arts[i % n].name for i in range(n * rows_per)]
    batch = _batch(len(names))
    merged = [deltahub.apply(a, _classifier()) for a in arts]
    own = [{k: v[i::n] for k, v in batch.items()} for i in range(n)]

    def routed() -> None:
        with pool.route(names):
            model(**batch)

    fns = {f"{n} merged models, one after another": lambda: [m(**b) for m, b in zip(merged, own)],
           "pool.route": routed, "the base alone (whole batch)": lambda: model(**batch)}
    with torch.no_grad():
        times = interleaved(fns, repeats=repeats, warmup=2)
    t0 = median(times[f"{n} merged models, one after another"])
    label = f"{n} x full ({n - n // 2} compeft d=0.1, {n // 2} bitdelta), {len(names)} rows"
    speed = [[label, name, f"{median(ts) * 1e3:.2f}", f"{median(ts) / t0:.2f}x"] for name, ts in times.items()]
    stats = pool.stats()["experts"]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = []
    for a in [arts[0], arts[-1]]:  # one compeft, one bitdelta
        b = stats[a.name]["bytes"]
        sizes.append([a.name, a.name.rstrip("0123456789"), f"{b:,}", f"{b / model_bytes:.3f}", f"{(1 << 30) // b}"])
    sizes.append(["(the fp32 model)", "—", f"{model_bytes:,}", "1.000", f"{(1 << 30) // model_bytes}"])
    return speed, sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 + 2 experts, 3 rounds")
    args = ap.parse_args()
    n, repeats = (2, 3) if args.quick else (8, 15)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="deltahub-bench-pool-") as tmp:
        work = Path(tmp)
        loras = make_loras(work, n, r=16)
        full = [make_full(work, "compeft", k, density=0.1) for k in range(n // 2)] + \
               [make_full(work, "bitdelta", k) for k in range(n // 2)]
        mode = f"mode: {'quick' if args.quick else 'full'}; {repeats} interleaved rounds; medians"
        print(header("Machine", ["benchmark: ExpertPool on all-MiniLM-L6-v2", mode]))
        print("\n### P1. Hot swap of a LoRA r=16 expert (query/key/value/dense of 6 layers)\n")
        print(table(["path", "ms", "vs pool.activate", "pool faster (copy_: pool ≤ 2x)"],
                    hot_swap(work, loras, repeats)))
        print("\n### P2. Mixed batch of LoRA experts\n")
        print(table(["batch", "path", "ms", "vs one merged model", "≤ 1.5x"], mixed_lora(work, loras, 4, repeats)))
        speed, sizes = mixed_full(full, 4, repeats)
        print("\n### P3. Mixed batch of full-delta experts\n")
        print(table(["batch", "path", "ms", "vs merged models in turn"], speed))
        print("\n### P4. Resident bytes per expert (after a routed batch: residents + on-the-fly forms)\n")
        print(table(["expert", "codec", "bytes", "of the fp32 model", "experts per GiB"], sizes))


if __name__ == "__main__":
    main()
