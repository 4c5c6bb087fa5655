"""Issue 13 item 7: the deltas a lossy codec leaves to ``dense`` (biases, norms) are stored at fp16, and the
manifest keeps one line per entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import deltahub
from deltahub.cli import cli
from deltahub.manifest import MANIFEST_NAME, parse_manifest


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"lin.weight": torch.randn(64, 48, generator=g), "lin.bias": torch.randn(64, generator=g),
            "norm.weight": torch.ones(48), "big.bias": torch.zeros(8)}
    ft = {"lin.weight": base["lin.weight"] + 0.01 * torch.randn(64, 48, generator=g),
          "lin.bias": base["lin.bias"] + 0.01 * torch.randn(64, generator=g),
          "norm.weight": base["norm.weight"] + 0.001 * torch.randn(48, generator=g),
          "big.bias": torch.full((8,), 1e5)}  # a delta fp16 cannot hold (max 65504)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def _entries(art: deltahub.Artifact) -> dict[str, object]:
    return {e.name: e for e in art.manifest.tensors}


def test_lossy_codec_stores_biases_and_norms_at_fp16(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    art = deltahub.compress(ft, base=base, codec="dare", out=tmp_path / "a", p=0.9)
    e = _entries(art)
    assert e["lin.weight"].codec == "dare"
    for name in ("lin.bias", "norm.weight"):
        assert e[name].codec == "dense" and e[name].params == {"dtype": "float16"}
        assert [k.dtype for k in e[name].payload.values()] == ["float16"]
        assert 0 < e[name].rel_error < 1e-3  # fp16 keeps ~3 significant digits of a delta
    assert e["big.bias"].params == {"dtype": "bfloat16"}  # would overflow fp16
    assert art.manifest.stats["rel_error"] < 10  # and nothing became inf


def test_exact_fallback_on_request_and_for_dense(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    art = deltahub.compress(ft, base=base, codec="dare", out=tmp_path / "a", fallback_dtype="exact", p=0.9)
    assert all(e.rel_error == 0 for n, e in _entries(art).items() if n != "lin.weight")
    dense = deltahub.compress(ft, base=base, codec="dense", out=tmp_path / "d")
    assert all(e.rel_error == 0 and e.params == {"dtype": "exact"} for e in dense.manifest.tensors)


def test_lossy_fallback_for_a_lossless_codec_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    result = CliRunner().invoke(cli, ["compress", str(ft), "--base", str(base), "--codec", "dense",
                                      "--fallback-dtype", "float16", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: Codec 'dense' is lossless, so it keeps every tensor exact; drop "
                                     "--fallback-dtype or pick a lossy codec.")
    assert not (tmp_path / "x").exists()


def test_manifest_file_has_one_line_per_tensor_and_parses_back(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    art = deltahub.compress(ft, base=base, codec="dare", out=tmp_path / "a", p=0.9)
    text = (tmp_path / "a" / MANIFEST_NAME).read_text()
    lines = text.splitlines()
    assert sum(1 for ln in lines if ln.lstrip().startswith('{"base_name"')) == len(art.manifest.tensors)
    assert parse_manifest(text) == art.manifest and parse_manifest(text).id == art.id
    indented = json.dumps(json.loads(text), indent=1, sort_keys=True)
    assert len(text) < 0.85 * len(indented)
