"""`--codec auto`: per-tensor choice under an error bound or a size budget, recorded in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import deltahub
from deltahub.cli import cli


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Tensors whose deltas differ in character: sparse spikes, dense noise, a low-magnitude bulk."""
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(96, 80, generator=g) for i in range(3)}
    spikes = torch.zeros(96, 80)
    spikes.view(-1)[torch.randperm(96 * 80, generator=g)[:80]] = 1.0
    ft = {"w0": base["w0"] + spikes, "w1": base["w1"] + 0.01 * torch.randn(96, 80, generator=g),
          "w2": base["w2"] + 0.001 * torch.randn(96, 80, generator=g).sign()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def test_error_bound_holds_for_every_tensor_with_fewest_bits(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    art = deltahub.compress(ft, base=base, codec="auto", out=tmp_path / "a", max_error=0.2)
    chosen = {e.name: e.meta["auto.codec"] for e in art.manifest.tensors}
    assert all(e.rel_error <= 0.2 + 1e-9 for e in art.manifest.tensors)
    assert chosen["w0"] == "compeft"  # 1% spikes of equal size: a sparse ternary code is exact
    assert art.manifest.tensors[0].rel_error < 1e-6
    assert art.manifest.fit_stats["target"] == {"max_error": 0.2}
    assert art.manifest.fit_stats["objective"] == "weight"
    # every fixed compeft setting that meets the bound on w1 is at least as large as auto's choice
    w1 = next(e for e in art.manifest.tensors if e.name == "w1")
    for d in (0.05, 0.1, 0.2, 0.3, 0.5):
        single = deltahub.compress(ft, base=base, codec="compeft", out=tmp_path / f"c{d}", density=d)
        e = next(x for x in single.manifest.tensors if x.name == "w1")
        if e.rel_error <= 0.2:
            assert w1.stored_bytes() <= e.stored_bytes()


def test_budget_is_met_and_spent_where_it_helps(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    art = deltahub.compress(ft, base=base, codec="auto", out=tmp_path / "a", max_bits_per_param=1.0)
    assert art.manifest.stats["bits_per_param"] <= art.manifest.fit_stats["bits_per_param"] + 1e-6 <= 1.0 + 1e-6
    assert art.manifest.fit_stats["objective"] == "heuristic"
    assert set(art.manifest.fit_stats["choice"]) == {"w0", "w1", "w2"}
    loose = deltahub.compress(ft, base=base, codec="auto", out=tmp_path / "b", max_bits_per_param=4.0)
    assert loose.manifest.stats["rel_error"] < art.manifest.stats["rel_error"]
    merged = deltahub.apply(art, base, out=tmp_path / "m")
    assert merged.exists()


def test_inspect_shows_the_choice(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    deltahub.compress(ft, base=base, codec="auto", out=tmp_path / "a", max_error=0.3)
    out = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a")]).output
    assert "auto:compeft" in out
    meta = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path / "a"), "--json"]).output)["tensors"][0]["meta"]
    assert {"auto.codec", "auto.params", "auto.version"} <= set(meta)
    assert "auto          max_error=0.3, objective weight" in out
    assert "on disk       " in out


def test_default_target_is_one_bit_per_param(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    result = CliRunner().invoke(cli, ["compress", str(ft), "--base", str(base), "--codec", "auto", "-o", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    art = deltahub.Artifact.load(tmp_path / "x")
    assert art.manifest.fit_stats["target"] == {"max_bits_per_param": 1.0}
    assert art.manifest.stats["bits_per_param"] <= 1.0


def test_at_most_one_target(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    result = CliRunner().invoke(cli, ["compress", str(ft), "--base", str(base), "--codec", "auto", "-p", "max_error=0.1",
                                      "-p", "max_bits_per_param=2", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: Bad options for codec 'auto': give at most one of max_bits_per_param, "
                                     "max_kl, min_agreement, max_error. See `deltahub codecs auto`.")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("param", ["max_kl=0.01", "min_agreement=0.99", "objective=fisher"])
def test_fidelity_targets_need_calibration(pair: tuple[Path, Path], tmp_path: Path, param: str) -> None:
    base, ft = pair
    result = CliRunner().invoke(cli, ["compress", str(ft), "--base", str(base), "--codec", "auto", "-p", param,
                                      "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    what = param.split("=")[0] if "objective" not in param else "objective=fisher"
    assert result.output.strip() == (f"Error: auto with {what} needs calibration texts and the fine-tuned model: "
                                     "pass --calibration FILE.")


def test_candidates_include_dare_and_third_party_grids() -> None:
    from deltahub import selection

    labels = [lab for _, _, lab in selection.grid()]
    assert {"dare p=0.99", "darex p=0.99 q=0.02", "compeft density=0.1", "binary bits=1", "dense"} <= set(labels)
    assert not any(lab.startswith("auto") for lab in labels)


def test_heuristic_discounts_unbiased_noise_by_the_row_width() -> None:
    from deltahub import selection
    from deltahub.codecs import get_codec

    delta = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    dare, compeft = get_codec("dare"), get_codec("compeft")
    for codec, cfg, scale in ((dare, {"p": 0.9}, 1 / 256), (compeft, {"density": 0.1}, 1.0)):
        config = codec.parse_config(cfg)
        enc = selection.encode_with(codec, config, delta, "w")
        err = codec.decode(enc, tuple(delta.shape)) - delta
        assert selection.heuristic(codec, enc, delta, err) == pytest.approx(float(err.double().pow(2).sum()) * scale,
                                                                             rel=1e-3 if scale == 1 else 0.05)
    darex = get_codec("darex")
    enc = selection.encode_with(darex, darex.parse_config({"p": 0.9, "q": 0.2}), delta, "w")
    assert darex.expected_gain(enc) == pytest.approx(0.5)  # E[Δ̂] = (1 − p)/q · Δ


def test_hull_keeps_only_points_a_lagrangian_can_pick() -> None:
    from deltahub.selection import Trial, allocate, hull

    pts = [Trial("a", 10, 0, 100.0), Trial("b", 20, 0, 60.0), Trial("c", 30, 0, 50.0), Trial("d", 40, 0, 10.0),
           Trial("e", 50, 0, 20.0), Trial("f", 60, 0, 0.0)]
    kept = [t.label for t in hull(pts)]
    assert kept == ["a", "b", "d", "f"]  # c lies above the b–d chord, e is worse than d and larger
    table = {"x": hull(pts)}
    assert {allocate(table, lam)["x"] for lam in (1e-9, 1.0, 2.5, 1e9)} <= set(range(len(kept)))


def test_a_choice_no_installed_codec_offers_is_a_typed_error() -> None:
    from deltahub.codecs import get_codec
    from deltahub.errors import CodecConfigError

    auto = get_codec("auto")
    cfg = auto.parse_config({})
    d = torch.randn(8, 8)
    with pytest.raises(CodecConfigError, match="which no installed codec offers now; compress again"):
        auto.encode(d, cfg, {"choice": {"w": "ghost p=1"}, "run": "x"}, name="w")
