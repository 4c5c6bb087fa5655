"""Train an adapter of any installed kind on the demo task, store it natively, push, pull and check it.

    python examples/train_adapter.py --kind mos                  # MoS, r=6 from rank-2 pools
    python examples/train_adapter.py --kind lora --bits 1        # a 1-bit LoRA (quantization-aware)
    python examples/train_adapter.py --kind mos --bits 1 --steps 300

all-MiniLM-L6-v2 gets the adapter on its attention and feed-forward linears (``query``, ``key``, ``value``,
``dense``) and a new 2-way head trained whole; it learns VADER word polarity (examples/polarity_task.py).
The script prints the loss before and after, the trainable parameters, the bytes on disk and the test
accuracy, then pushes the artifact to the local registry, pulls it back, applies it to a fresh base
classifier and checks that the outputs equal the trained model's. With ``--bits B`` the adapter trains
with a straight-through estimator and is stored with the ``binary`` codec at B bits.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import polarity_task as task
import torch

TARGETS = ["query", "key", "value", "dense"]
DEFAULTS = {"compacter": {"target_modules": ["output.dense"], "n": 4, "reduction": 32},  # attention + FFN outputs
            "lora": {"r": 8, "lora_alpha": 16}, "mos": {"r": 6, "v": 2, "p": 1, "c": 2, "lora_alpha": 12}}  # r − p ≤ (v − p)·L: 6 layers
HEAD = ("classifier.weight", "classifier.bias")


def train(kind: str, *, bits: int | None = None, steps: int = 200, lr: float = 1e-3, seed: int = 0,
          config: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """(trained model with the adapter injected, metrics). The head is trained whole, the encoder frozen."""
    import deltahub.adapter as adapters

    torch.set_num_threads(2)
    train_set, test = task.load_dataset(seed=seed)
    tokenizer = task._tokenizer()
    model = task._init_classifier(seed)
    cfg = {"target_modules": TARGETS, **DEFAULTS.get(kind, {}), **(config or {}), "bits": bits}
    params = adapters.get_adapter(kind).inject(model, cfg)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    probe = train_set[:256]

    def loss_on(words: list) -> float:
        with torch.no_grad():
            model.eval()
            enc = task._encode(tokenizer, [w for w, _ in words])
            return float(model(**enc, labels=torch.tensor([y for _, y in words])).loss)

    before = loss_on(probe)
    t0 = time.perf_counter()
    task._train_loop(model, tokenizer, train_set, steps=steps, lr=lr, batch_size=32, seed=seed, weight_decay=0.0)
    metrics = {"kind": kind, "bits": bits, "steps": steps, "loss_before": before, "loss_after": loss_on(probe),
               "train_s": round(time.perf_counter() - t0, 1), "adapter_params": sum(p.numel() for p in params),
               "head_params": sum(p.numel() for p in model.classifier.parameters()),
               "test_accuracy": task.evaluate(model, test, tokenizer=tokenizer)}
    return model, metrics


def store(model: torch.nn.Module, kind: str, out: Path, *, bits: int | None = None) -> object:
    """The artifact of the trained adapter (native tensors; ``binary`` at ``bits`` when given) + the head."""
    from deltahub.adapting import save_adapter

    codec = {"codec": "binary", "bits": bits} if bits else {}
    return save_adapter(model, kind=kind, base=task.base_model_dir(), out=out, whole=HEAD, **codec)


def reload_outputs(art_dir: Path, test: list) -> torch.Tensor:
    """Logits of a fresh base classifier with the artifact applied (what a user of the pulled expert gets)."""
    fresh = task._init_classifier(seed=123)  # another head init: the artifact must bring its own
    load_into(art_dir, fresh)
    return logits(fresh, test)


def load_into(art_dir: Path, model: torch.nn.Module) -> None:
    """Merge the artifact into ``model``, or attach it where the kind is not a weight delta (Compacter)."""
    import deltahub

    art = deltahub.load(art_dir)
    try:
        deltahub.apply(art, model)
    except deltahub.NotMergeableError:
        deltahub.attach(art, model)


def logits(model: torch.nn.Module, test: list) -> torch.Tensor:
    tokenizer = task._tokenizer()
    with torch.no_grad():
        model.eval()
        return model(**task._encode(tokenizer, [w for w, _ in test])).logits


def main(argv: list[str] | None = None) -> int:
    import deltahub
    from deltahub.adapter import available_adapters

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="mos", choices=available_adapters())
    parser.add_argument("--bits", type=int, choices=[1, 2, 3, 4], default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="artifact folder (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="deltahub-adapter-")) / f"{args.kind}-polarity"
    model, m = train(args.kind, bits=args.bits, steps=args.steps, lr=args.lr)
    art = store(model, args.kind, out, bits=args.bits)
    disk = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"{args.kind}{f' {args.bits}-bit' if args.bits else ''}: loss {m['loss_before']:.4f} -> {m['loss_after']:.4f} "
          f"in {m['steps']} steps ({m['train_s']} s); {m['adapter_params']} adapter + {m['head_params']} head params; "
          f"test accuracy {m['test_accuracy']:.4f}; {disk / 1e3:.1f} KB on disk -> {out}")
    registry = deltahub.Registry()
    registry.push(art)
    pulled = registry.pull(art.name)
    _, test = task.load_dataset(seed=0)
    got, want = reload_outputs(pulled.folder, test[:256]), logits(model, test[:256])
    same = torch.allclose(got, want, atol=1e-4)
    print(f"pushed and pulled {pulled.name} (id {pulled.id[:12]}); applied to a fresh base: outputs "
          f"{'equal' if same else 'DIFFER'} (max |Δlogit| {float((got - want).abs().max()):.2e})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
