"""deltahub.merge: parity with peft.utils.merge_utils, recipes recorded and reproducible, typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltahub
from deltahub.errors import BaseMismatchError, MergeError
from deltahub.merging import combine
from deltahub.plugins.dare import keep_mask

merge_utils = pytest.importorskip("peft.utils.merge_utils")
PEFT_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def _peft(method: str, deltas: list[torch.Tensor], weights: list[float], density: float, sign: str,
          masks: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """PEFT's own function; its DARE masks (torch.bernoulli) are the ones deltahub drew, in call order."""
    given = iter(masks)
    monkeypatch.setattr(torch, "bernoulli", lambda probs: next(given).to(probs.dtype))
    try:
        w = torch.tensor(weights)
        fn = getattr(merge_utils, method)
        if method == "task_arithmetic":
            return fn(deltas, w)
        if method in ("ties", "dare_ties"):
            return fn(deltas, w, density, majority_sign_method=sign)
        return fn(deltas, w, density)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("method", PEFT_METHODS)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_combine_equals_peft_merge_utils(method: str, sign: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(17, 23, generator=g) * (i + 1) for i in range(3)]
    deltas[1][0, :5] = 0.0  # zeros vote + in TIES, as in PEFT
    weights, density, seed = [0.5, 1.0, -0.3], 0.4, 7
    recipe = {"method": method, "weights": weights, "density": density, "majority_sign_method": sign, "seed": seed}
    masks = [keep_mask(seed + i, "w", d.numel(), 1 - density).reshape(d.shape).float() for i, d in enumerate(deltas)]
    want = _peft(method, [d.clone() for d in deltas], weights, density, sign, masks, monkeypatch)
    got = combine([d.clone() for d in deltas], recipe, "w")
    assert torch.equal(got, want)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(30, 12)
        self.fc = torch.nn.Linear(12, 12)
        self.norm = torch.nn.LayerNorm(12)


def _experts(tmp_path: Path, codec: str = "dense", n: int = 3, **params) -> tuple[dict, list]:
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in Tiny().state_dict().items()}
    arts = []
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        arts.append(deltahub.compress(ft, base=base, codec=codec, out=tmp_path / f"e{i}", name=f"e{i}", **params))
    return base, arts


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_merged_artifact_applies_to_the_peft_merge(tmp_path: Path, method: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base, arts = _experts(tmp_path, "compeft", density=0.5)
    params = {} if method == "task_arithmetic" else {"density": 0.6}
    params |= {"seed": 3} if method.startswith("dare") else {}
    out = deltahub.merge(arts, method=method, weights=[1.0, 0.5, 0.25], out=tmp_path / "m", **params)
    merged = deltahub.apply(out, base)
    for name, w0 in base.items():
        deltas = [a.decode()[name].float() for a in arts]
        masks = [keep_mask(3 + i, name, w0.numel(), 0.4).reshape(w0.shape).float() for i in range(3)]
        want = _peft(method, deltas, [1.0, 0.5, 0.25], params.get("density", 1.0), "total", masks, monkeypatch)
        torch.testing.assert_close(merged[name], w0 + want, rtol=0, atol=1e-6)
    recipe = out.manifest.provenance["merge"]
    assert recipe["method"] == method and recipe["inputs"] == [a.id for a in arts]
    assert "## Recipe" in (out.folder / "README.md").read_text()


def test_merge_is_reproducible_byte_for_byte(tmp_path: Path) -> None:
    _, arts = _experts(tmp_path)
    a = deltahub.merge(arts, method="dare_ties", density=0.5, seed=1, out=tmp_path / "a", name="m")
    b = deltahub.merge(arts, method="dare_ties", density=0.5, seed=1, out=tmp_path / "b", name="m")
    c = deltahub.merge(arts, method="dare_ties", density=0.5, seed=2, out=tmp_path / "c", name="m")
    assert a.id == b.id and a.id != c.id
    for f in a.manifest.files:
        assert (a.folder / f.path).read_bytes() == (b.folder / f.path).read_bytes()


def test_merge_errors_are_typed_and_pinned(tmp_path: Path) -> None:
    _, arts = _experts(tmp_path, n=2)
    with pytest.raises(MergeError, match=r"^Unknown merge method 'avg'; use one of task_arithmetic, ties, "):
        deltahub.merge(arts, method="avg")
    with pytest.raises(MergeError, match=r"^3 weights for 2 experts; give one weight per expert.$"):
        deltahub.merge(arts, method="task_arithmetic", weights=[1, 2, 3])
    with pytest.raises(MergeError, match=r"^Method 'task_arithmetic' has no option 'density'; its options: none.$"):
        deltahub.merge(arts, method="task_arithmetic", density=0.5)
    with pytest.raises(MergeError, match=r"^density is the fraction of entries kept, in \(0, 1\]; got 0.0.$"):
        deltahub.merge(arts, method="ties", density=0.0)
    with pytest.raises(MergeError, match=r"^A merge needs two or more experts, got 1.$"):
        deltahub.merge(arts[:1], method="ties")
    torch.manual_seed(5)
    other = {k: v.clone() for k, v in Tiny().state_dict().items()}
    stranger = deltahub.compress({k: v + 0.1 for k, v in other.items()}, base=other, codec="dense",
                                 out=tmp_path / "x", name="stranger")
    with pytest.raises(BaseMismatchError, match=r"^Expert 'stranger' was made from another base than 'e0'"):
        deltahub.merge([*arts, stranger], method="ties", out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_merge_and_recipe_reproduce_the_artifact(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deltahub.cli import cli

    _, arts = _experts(tmp_path, codec="compeft", density=0.3)
    run = CliRunner().invoke
    args = [str(a.folder) for a in arts]
    res = run(cli, ["merge", *args, "-o", str(tmp_path / "m"), "--method", "ties", "--weights", "1,0.5,0.5",
                    "-p", "density=0.4", "--codec", "compeft", "-c", "density=0.2"])
    assert res.exit_code == 0, res.output
    first = deltahub.load(tmp_path / "m")
    assert first.manifest.provenance["merge"]["weights"] == [1.0, 0.5, 0.5]
    reg = deltahub.Registry()
    for a in arts:
        reg.push(a)
    again = run(cli, ["merge", "--recipe", str(tmp_path / "m" / "deltahub.json"), "-o", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert deltahub.load(tmp_path / "again").id == first.id  # inputs found in the registry by id
    for f in first.manifest.files:
        assert (tmp_path / "m" / f.path).read_bytes() == (tmp_path / "again" / f.path).read_bytes()
    bad = run(cli, ["merge", *args[:2], "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1 and bad.output.strip().splitlines() == [
        ("Error: Pass --method (one of task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune) or "
         "--recipe FILE.")]
    wrong = run(cli, ["merge", *args[:2], "--recipe", str(tmp_path / "m" / "deltahub.json"), "-o", str(tmp_path / "y")])
    assert wrong.exit_code == 1 and "not the recipe's inputs" in wrong.output and not (tmp_path / "y").exists()


def test_lora_experts_merge_as_their_deltas(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Tiny()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    arts = []
    for i in range(2):
        pm = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"]))
        pm.base_model.model.load_state_dict(base_sd, strict=False)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
        pm.save_pretrained(str(tmp_path / f"peft{i}"))
        arts.append(deltahub.compress(tmp_path / f"peft{i}", base=base_sd, out=tmp_path / f"l{i}", name=f"l{i}"))
    out = deltahub.merge(arts, method="task_arithmetic", weights=[1.0, -0.5], out=tmp_path / "m")
    merged = deltahub.apply(out, base_sd)
    want = base_sd["fc.weight"] + sum(w * deltahub.apply(a, base_sd)["fc.weight"] - w * base_sd["fc.weight"]
                                      for w, a in zip([1.0, -0.5], arts))
    torch.testing.assert_close(merged["fc.weight"], want, rtol=0, atol=1e-5)
    assert torch.equal(merged["emb.weight"], base_sd["emb.weight"])


def test_heads_of_several_experts_are_refused_or_dropped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in Tiny().state_dict().items()}
    arts = []
    for i in range(2):
        ft = {k: v + 0.1 for k, v in base.items()} | {"head.weight": torch.full((2, 12), float(i))}
        arts.append(deltahub.compress(ft, base=base, codec="dense", out=tmp_path / f"h{i}", name=f"h{i}"))
    with pytest.raises(MergeError, match=r"^Tensor 'head.weight' is replaced whole by 2 experts \(a task head\); "):
        deltahub.merge(arts, method="task_arithmetic", out=tmp_path / "no")
    assert not (tmp_path / "no").exists()
    out = deltahub.merge(arts, method="task_arithmetic", new="drop", out=tmp_path / "yes")
    assert "head.weight" not in {e.name for e in out.manifest.tensors}
    assert out.manifest.provenance["merge"]["new"] == "drop"
    torch.testing.assert_close(deltahub.apply(out, base)["fc.weight"], base["fc.weight"] + 0.2, rtol=0, atol=1e-6)


def _peft_pair(tmp_path: Path, base_sd: dict):
    """A PEFT model of Tiny with adapters first (fc, r=2), second (fc + emb, r=3, rsLoRA), random factors."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"]), adapter_name="first")
    pm.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["fc", "emb"], use_rslora=True))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "peft"))  # in peft/first/ and peft/second/
    return pm


def test_lora_task_arithmetic_stays_lora_as_peft_cat(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base_sd = {k: v.clone() for k, v in Tiny().state_dict().items()}
    pm = _peft_pair(tmp_path, base_sd)
    arts = [deltahub.compress(tmp_path / "peft" / "first", base=base_sd, out=tmp_path / "la", name="la"),
            deltahub.compress(tmp_path / "peft" / "second", base=base_sd, out=tmp_path / "lb", name="lb")]
    out = deltahub.merge(arts, method="task_arithmetic", weights=[1.0, -0.5], out=tmp_path / "m")
    assert out.manifest.kind == "lora" and out.manifest.provenance["merge"]["form"] == "lora"
    assert out.manifest.stats["ranks"] == [3, 5]  # emb: second's 3; fc: 2 + 3
    pm.add_weighted_adapter(["first", "second"], [1.0, -0.5], "m", combination_type="cat")
    ours = out.native_tensors()
    fc = pm.base_model.model.fc
    assert torch.equal(ours["fc.lora_A.weight"], fc.lora_A["m"].weight) and torch.equal(
        ours["fc.lora_B.weight"], fc.lora_B["m"].weight)  # the same factors, bit for bit
    merged = deltahub.apply(out, base_sd)
    emb = pm.base_model.model.emb
    torch.testing.assert_close(merged["emb.weight"], base_sd["emb.weight"] + emb.get_delta_weight("m"),
                               rtol=0, atol=1e-6)
    deltahub.export(out, tmp_path / "exported")  # per-module ranks survive in a folder PEFT loads
    fresh = Tiny()
    fresh.load_state_dict(base_sd)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "exported")).merge_and_unload()
    for k in ("fc.weight", "emb.weight"):
        torch.testing.assert_close(loaded.state_dict()[k], merged[k], rtol=0, atol=1e-6)


def test_lora_merge_form_delta_and_refusals(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base_sd = {k: v.clone() for k, v in Tiny().state_dict().items()}
    _peft_pair(tmp_path, base_sd)
    arts = [deltahub.compress(tmp_path / "peft" / "first", base=base_sd, out=tmp_path / "la", name="la"),
            deltahub.compress(tmp_path / "peft" / "second", base=base_sd, out=tmp_path / "lb", name="lb")]
    lora = deltahub.merge(arts, method="task_arithmetic", out=tmp_path / "l")
    delta = deltahub.merge(arts, method="task_arithmetic", form="delta", out=tmp_path / "d")
    assert delta.manifest.kind == "delta" and "form" not in delta.manifest.provenance["merge"]
    a, b = deltahub.apply(lora, base_sd), deltahub.apply(delta, base_sd)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in base_sd)
    with pytest.raises(MergeError, match=r"^Only task_arithmetic of LoRA experts stays LoRA .* pass form='delta'"):
        deltahub.merge(arts, method="ties", form="lora", density=0.5, out=tmp_path / "no")
    assert deltahub.merge(arts, method="ties", density=0.5, out=tmp_path / "t").manifest.kind == "delta"
    with pytest.raises(MergeError, match=r"^form is 'auto', 'delta' or 'lora', got 'cat'\.$"):
        deltahub.merge(arts, method="task_arithmetic", form="cat", out=tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_lora_merge_recipe_reproduces_bytes(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deltahub.cli import cli

    torch.manual_seed(0)
    base_sd = {k: v.clone() for k, v in Tiny().state_dict().items()}
    _peft_pair(tmp_path, base_sd)
    arts = [deltahub.compress(tmp_path / "peft" / "first", base=base_sd, out=tmp_path / "la", name="la"),
            deltahub.compress(tmp_path / "peft" / "second", base=base_sd, out=tmp_path / "lb", name="lb")]
    run = CliRunner().invoke
    first = run(cli, ["merge", str(tmp_path / "la"), str(tmp_path / "lb"), "-o", str(tmp_path / "m"),
                      "--method", "task_arithmetic", "--weights", "1,0.5"])
    assert first.exit_code == 0 and "lora rank 3/5" in first.output, first.output
    again = run(cli, ["merge", str(tmp_path / "la"), str(tmp_path / "lb"), "--recipe",
                      str(tmp_path / "m" / "deltahub.json"), "-o", str(tmp_path / "m2")])
    assert again.exit_code == 0, again.output
    assert deltahub.Artifact.load(tmp_path / "m2").id == arts[0].__class__.load(tmp_path / "m").id


@pytest.mark.parametrize("method", PEFT_METHODS)
@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("codec", [("compeft", {"density": 0.3}), ("dare", {"p": 0.6})])
def test_sparse_combine_equals_dense_bit_for_bit(method: str, sign: str, codec: tuple) -> None:
    from deltahub.codecs import get_codec
    from deltahub.merging import combine_sparse

    c = get_codec(codec[0])
    g = torch.Generator().manual_seed(5)
    deltas = [torch.randn(40, 33, generator=g) * (i + 1) for i in range(3)]
    encs = [c.encode(d, c.parse_config(codec[1]), None, name="w") for d in deltas]
    parts = {i: c.sparse(e, (40, 33)) for i, e in enumerate(encs)}
    recipe = {"method": method, "weights": [0.7, 1.0, -0.4], "density": 0.45, "majority_sign_method": sign,
              "seed": 2}
    want = combine([c.decode(e, (40, 33)) for e in encs], recipe, "w")
    assert torch.equal(combine_sparse(parts, recipe, 40 * 33, "w").reshape(40, 33), want)


def test_merge_of_compeft_experts_takes_the_sparse_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltahub import merging

    _, arts = _experts(tmp_path, "compeft", density=0.2)
    calls, real = [], merging.combine_sparse
    monkeypatch.setattr(merging, "combine_sparse", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = deltahub.merge(arts, method="ties", density=0.25, out=tmp_path / "fast")
    n_matrices = sum(1 for e in arts[0].manifest.tensors if e.codec == "compeft")
    assert len(calls) == n_matrices  # every ComPEFT matrix; biases and norms (dense) take the dense path
    calls.clear()
    trimmed = deltahub.merge(arts, method="ties", density=0.1, out=tmp_path / "trim")  # trims: dense path
    assert calls == [] and trimmed.id != fast.id
    monkeypatch.undo()
    for name, d in fast.decode().items():
        want = combine([a.decode()[name].float() for a in arts], fast.manifest.provenance["merge"], name)
        assert torch.equal(d, want), name
