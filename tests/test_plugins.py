"""Third-party codecs through real entry points: discovery, broken and duplicate plugins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltahub.testing import pico_pair

GOOD = '''
import torch
from deltahub.codecs import Codec, CodecConfig, Encoded

class HalfConfig(CodecConfig):
    pass

class HalfCodec(Codec):
    """Stores the delta in fp16: the smallest useful third-party codec."""
    name = "half"
    version = 3
    pretty_name = "fp16 delta"
    Config = HalfConfig

    def encode(self, delta, config, stats=None, *, name=""):
        return Encoded({"v": delta.reshape(-1).to(torch.float16)}, {})

    def decode(self, enc, shape):
        return enc.tensors["v"].float().reshape(shape)


class HalfCodec2(HalfCodec):
    """Another distribution's codec under the same name."""
'''


def _dist(site: Path, dist: str, entry_points: str) -> None:
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[deltahub.codecs]\n{entry_points}\n")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "deltahub_half.py").write_text(GOOD)
    _dist(site, "deltahub_half", "half = deltahub_half:HalfCodec")
    _dist(site, "deltahub_broken", "broken = deltahub_missing_module:Codec")
    _dist(site, "deltahub_dup", "dense = deltahub_half:HalfCodec\nhalf = deltahub_half:HalfCodec2")
    return site


def _deltahub(site: Path, *args: str, load: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DELTAHUB_LOAD_PLUGINS"}
    env["PYTHONPATH"] = str(site)
    if load is not None:
        env["DELTAHUB_LOAD_PLUGINS"] = load
    code = "from deltahub.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


def test_third_party_codec_is_listed_and_used(site: Path, tmp_path: Path) -> None:
    (site / "deltahub_dup-1.0.dist-info" / "entry_points.txt").write_text("[deltahub.codecs]\ndense = deltahub_half:HalfCodec\n")
    listing = _deltahub(site, "codecs")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert rows["half"].split()[1:4] == ["codec", "3", "deltahub_half"] and rows["half"].endswith("ok")
    assert "broken: ModuleNotFoundError" in rows["broken"]
    base, ft = pico_pair(tmp_path / "m")
    done = _deltahub(site, "compress", str(ft), "--base", str(base), "--codec", "half", "-o", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    shown = _deltahub(site, "inspect", str(tmp_path / "a"), "--json")
    assert '"codec": "half"' in shown.stdout


def test_broken_plugin_fails_only_when_asked_for(site: Path, tmp_path: Path) -> None:
    base, ft = pico_pair(tmp_path / "m")
    ok = _deltahub(site, "compress", str(ft), "--base", str(base), "--codec", "compeft", "-o", str(tmp_path / "a"))
    assert ok.returncode == 0, ok.stderr
    bad = _deltahub(site, "compress", str(ft), "--base", str(base), "--codec", "broken", "-o", str(tmp_path / "b"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == ("Error: Codec plugin 'broken' from deltahub_broken failed to load (ModuleNotFoundError: "
                                  "No module named 'deltahub_missing_module'); reinstall or update it.")


def test_duplicate_names_are_reported(site: Path, tmp_path: Path) -> None:
    listing = _deltahub(site, "codecs")
    assert "shadowed by the built-in codec" in listing.stdout  # a plugin cannot take over `dense`
    assert "duplicate name, also provided by" in listing.stdout
    base, ft = pico_pair(tmp_path / "m")
    ok = _deltahub(site, "compress", str(ft), "--base", str(base), "--codec", "dense", "-o", str(tmp_path / "a"))
    assert ok.returncode == 0, ok.stderr
    bad = _deltahub(site, "compress", str(ft), "--base", str(base), "--codec", "half", "-o", str(tmp_path / "b"))
    assert bad.returncode == 1
    assert bad.stderr.strip() == "Error: Codec 'half' is provided by both deltahub_dup and deltahub_half; uninstall one of them."


def test_load_plugins_env_keeps_to_builtins(site: Path) -> None:
    listing = _deltahub(site, "codecs", load="")
    names = {line.split()[0] for line in listing.stdout.splitlines()[1:]}
    assert "half" not in names and "broken" not in names and "compeft" in names
    only_half = _deltahub(site, "codecs", load="deltahub_half")
    assert "half" in {line.split()[0] for line in only_half.stdout.splitlines()[1:]}
