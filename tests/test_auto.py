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
    assert all("rel. error" in e.meta["auto.reason"] for e in art.manifest.tensors)
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
    assert art.manifest.stats["bits_per_param"] <= 1.0
    assert art.manifest.fit_stats["bits"] <= art.manifest.fit_stats["budget_bits"]
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
    assert {"auto.codec", "auto.params", "auto.reason", "auto.version"} <= set(meta)


@pytest.mark.parametrize("params", [[], ["-p", "max_error=0.1", "-p", "max_bits_per_param=2"]])
def test_exactly_one_target(pair: tuple[Path, Path], tmp_path: Path, params: list[str]) -> None:
    base, ft = pair
    result = CliRunner().invoke(cli, ["compress", str(ft), "--base", str(base), "--codec", "auto", *params, "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: Bad options for codec 'auto': give exactly one of max_error "
                                     "or max_bits_per_param. See `deltahub codecs auto`.")
