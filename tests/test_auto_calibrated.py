"""`auto` with calibration: the Fisher sensitivity is the exact per-text quadratic form, and fidelity targets hold
end to end on a real (small, randomly initialised) transformers BERT classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import deltahub
from deltahub.calibration import Calibration
from deltahub.cli import cli

transformers = pytest.importorskip("transformers")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _batches(n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, 120, (1, int(torch.randint(3, 9, (1,), generator=g))), generator=g)}
            for _ in range(n)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    """A base and a 'fine-tune' of it: every tensor moved, some a lot (a sparse spike set), some a little."""
    tmp = tmp_path_factory.mktemp("cal")
    base = _model(0)
    ft = _model(0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * p.detach().abs().mean().clamp_min(1e-3) * torch.randn(p.shape, generator=g))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp / "base.safetensors"))
    save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, str(tmp / "ft.safetensors"))
    return tmp / "base.safetensors", tmp / "ft.safetensors", ft


def test_fisher_scores_equal_the_per_text_gradient_quadratic_form() -> None:
    model = _model(1)
    batches = _batches(6)
    sens = Calibration.from_model(model, batches).sensitivity()
    g = torch.Generator().manual_seed(0)  # the labels Sensitivity sampled, in the same order
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.1.output.dense.bias", "bert.encoder.layer.0.output.LayerNorm.weight",
             "classifier.weight"]
    params = dict(model.named_parameters())
    errors = {n: torch.randn(params[n].shape, generator=torch.Generator().manual_seed(5)) for n in names}
    want = dict.fromkeys(names, 0.0)
    for batch in batches:
        model.zero_grad()
        z = model(**batch).logits.reshape(-1, 3)
        y = torch.multinomial(z.detach().softmax(-1), 1, generator=g).reshape(-1)
        z.log_softmax(-1).gather(1, y[:, None]).sum().backward()
        for n in names:
            want[n] += float((params[n].grad * errors[n]).sum()) ** 2
    for n in names:
        assert sens.scores(n, [errors[n]])[0] == pytest.approx(want[n], rel=1e-4), n


def test_fisher_predicts_the_measured_kl_of_a_small_error() -> None:
    model = _model(2)
    sens = Calibration.from_model(model, _batches(64)).sensitivity()
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    e = 0.3 * torch.randn(dict(model.named_parameters())[name].shape, generator=torch.Generator().manual_seed(2))
    predicted = sens.scores(name, [e])[0] / (2 * sens.outputs)
    measured = sens.evaluate({name: e})["kl"]
    assert measured > 0 and predicted == pytest.approx(measured, rel=0.5)  # one sampled label per text
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sens.evaluate({name: e})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored


@pytest.mark.parametrize("target", [{"max_kl": 2e-3}, {"min_agreement": 0.95}])
def test_fidelity_target_holds_end_to_end(pair, tmp_path: Path, target: dict) -> None:
    base, ft, ft_model = pair
    cal = Calibration.from_model(ft_model, _batches())
    art = deltahub.compress(ft, base=base, codec="auto", out=tmp_path / "a", calibration=cal, **target)
    fit = art.manifest.fit_stats
    assert fit["objective"] == "fisher" and fit["met"] is True and fit["search"]
    # the figure recorded is the figure of the stored artifact: apply it and measure again, independently
    merged = deltahub.apply(art, load_file(str(base)))
    model = _model(0)
    model.load_state_dict(merged)
    kl = agree = 0.0
    with torch.no_grad():
        for b in cal.batches:
            ref, z = ft_model(**b).logits.log_softmax(-1), model(**b).logits.log_softmax(-1)
            kl += float(torch.nn.functional.kl_div(z, ref, log_target=True, reduction="sum"))
            agree += float((z.argmax(-1) == ref.argmax(-1)).sum())
    kl, agree = kl / len(cal.batches), agree / len(cal.batches)
    assert kl == pytest.approx(fit["measured"]["kl"], rel=0.05, abs=1e-6)
    assert agree == pytest.approx(fit["measured"]["agreement"])
    if "max_kl" in target:
        assert kl <= target["max_kl"]
    else:
        assert agree >= target["min_agreement"]
    assert art.manifest.stats["bits_per_param"] < 16  # smaller than an fp16 delta, not just exact
    fid = art.manifest.stats["fidelity"]
    assert fid["calibration_kl"] == fit["measured"]["kl"] and fid["objective"] == "fisher"
    out = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a")]).output
    assert "measured      KL " in out and f"on {len(cal.batches)} calibration outputs" in out
    card = (tmp_path / "a" / "README.md").read_text()
    assert "calibration_kl" in card


def test_budget_with_calibration_records_the_measured_figure(pair, tmp_path: Path) -> None:
    base, ft, ft_model = pair
    cal = Calibration.from_model(ft_model, _batches())
    art = deltahub.compress(ft, base=base, codec="auto", out=tmp_path / "a", calibration=cal, max_bits_per_param=2)
    fit = art.manifest.fit_stats
    assert fit["objective"] == "fisher" and art.manifest.stats["bits_per_param"] <= 2
    assert 0 <= fit["measured"]["kl"] and 0 <= fit["measured"]["agreement"] <= 1
    tight = deltahub.compress(ft, base=base, codec="auto", out=tmp_path / "b", calibration=cal, max_bits_per_param=0.5)
    assert tight.manifest.fit_stats["predicted_kl"] >= fit["predicted_kl"]
