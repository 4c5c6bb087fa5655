"""Every user error ends with exit 1, one pinned line on stderr, no traceback, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from deltahub.cli import cli
from deltahub.testing import pico_pair


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    return pico_pair(tmp_path / "models")


@pytest.fixture
def artifact(tmp_path: Path, models: tuple[Path, Path]) -> Path:
    base, ft = models
    out = tmp_path / "art"
    result = CliRunner().invoke(cli, ["compress", str(ft), "--base", str(base), "--codec", "compeft", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output.strip()


def test_unknown_codec_suggests_the_closest(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = models
    code, out = run("compress", ft, "--base", base, "--codec", "compef", "-o", tmp_path / "x")
    from deltahub.codecs import available_codecs

    installed = ", ".join(available_codecs())
    assert {"compeft", "dense"} <= set(available_codecs())
    assert (code, out) == (1, f"Error: Unknown codec 'compef'. Installed: {installed}. Did you mean 'compeft'?")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("param,message", [
    ("density=0", "Error: Bad value for 'density' of codec 'compeft': Input should be greater than 0. See `deltahub codecs compeft`."),
    ("density=1.5", "Error: Bad value for 'density' of codec 'compeft': Input should be less than or equal to 1. See `deltahub codecs compeft`."),
    ("densty=0.1", "Error: Codec 'compeft' has no option 'densty'. Options: density, scale, mode. See `deltahub codecs compeft`."),
    ("density", "Error: Bad option 'density': write it as KEY=VALUE, for example -p density=0.1."),
    ("mode=both", "Error: Bad value for 'mode' of codec 'compeft': Input should be 'global' or 'per_tensor'. See `deltahub codecs compeft`."),
])
def test_bad_codec_options(models: tuple[Path, Path], tmp_path: Path, param: str, message: str) -> None:
    base, ft = models
    code, out = run("compress", ft, "--base", base, "-p", param, "-o", tmp_path / "x")
    assert (code, out) == (1, message)
    assert not (tmp_path / "x").exists()


def test_missing_base(models: tuple[Path, Path], tmp_path: Path) -> None:
    _, ft = models
    code, out = run("compress", ft, "-o", tmp_path / "x")
    assert (code, out) == (1, "Error: Compressing a fine-tuned checkpoint needs its base: pass --base BASE.")
    code, out = run("compress", ft, "--base", tmp_path / "nope", "-o", tmp_path / "x")
    assert (code, out) == (1, f"Error: No checkpoint at {tmp_path / 'nope'}: give a .safetensors file or a model folder.")


def test_unrelated_checkpoint_matches_nothing(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = models
    save_file({"other.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    code, out = run("compress", tmp_path / "other.safetensors", "--base", base, "-o", tmp_path / "x")
    assert (code, out) == (1, "Error: No tensor of the fine-tuned checkpoint (1 tensors) matches the base (4 tensors), "
                              "even across wrapper prefixes. Check that --base is the model it was tuned from.")


def test_pickle_checkpoints_are_refused(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = models
    (tmp_path / "model.bin").write_bytes(b"\x80\x04not really")
    code, out = run("compress", tmp_path / "model.bin", "--base", base, "-o", tmp_path / "x")
    assert code == 1 and out.startswith("Error: model.bin is not a .safetensors file; deltahub never loads pickle.")


def test_delta_applied_to_another_base(artifact: Path, tmp_path: Path) -> None:
    other, _ = pico_pair(tmp_path / "other", seed=7)  # same architecture, other weights (the norm is all ones in both)
    code, out = run("apply", artifact, "--base", other, "-o", tmp_path / "merged")
    assert (code, out) == (1, "Error: This base does not match artifact 'art': only 1 of its 4 touched tensors match "
                              "(first mismatch: 'layer.0.bias'). Use the base it was made from (see `deltahub inspect`).")
    assert not (tmp_path / "merged").exists()


def test_partially_matching_base(artifact: Path, models: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base, _ = models
    sd = load_file(str(base))
    sd["layer.1.weight"] = sd["layer.1.weight"] + 1
    save_file(sd, str(tmp_path / "tampered.safetensors"))
    code, out = run("apply", artifact, "--base", tmp_path / "tampered.safetensors", "-o", tmp_path / "merged")
    assert (code, out) == (1, "Error: This base does not match artifact 'art': only 3 of its 4 touched tensors match "
                              "(first mismatch: 'layer.1.weight'). Use the base it was made from (see `deltahub inspect`).")


def test_base_with_no_matching_tensor(artifact: Path, tmp_path: Path) -> None:
    save_file({"layer.0.weight": torch.zeros(48, 40)}, str(tmp_path / "wrong.safetensors"))
    code, out = run("apply", artifact, "--base", tmp_path / "wrong.safetensors", "-o", tmp_path / "merged")
    assert (code, out) == (1, "Error: This base does not match artifact 'art': none of its 4 touched tensors match "
                              "(first mismatch: 'layer.0.bias'). Use the base it was made from (see `deltahub inspect`).")


def test_truncated_payload(artifact: Path, tmp_path: Path) -> None:
    payload = artifact / "payload-00001.safetensors"
    payload.write_bytes(payload.read_bytes()[:-10])
    code, out = run("apply", artifact, "--base", tmp_path / "models" / "base.safetensors", "-o", tmp_path / "m")
    size = payload.stat().st_size
    assert (code, out) == (1, f"Error: payload-00001.safetensors has {size} bytes, the manifest says {size + 10}: "
                              "it is truncated or corrupted. Pull it again.")
    assert not (tmp_path / "m").exists()


def test_one_flipped_byte(artifact: Path) -> None:
    payload = artifact / "payload-00001.safetensors"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(bytes(data))
    code, out = run("inspect", artifact)
    assert (code, out) == (1, "Error: payload-00001.safetensors does not match its sha256 in the manifest: it is corrupted. Pull it again.")


def test_truncated_manifest(artifact: Path) -> None:
    m = artifact / "deltahub.json"
    m.write_text(m.read_text()[:200])
    code, out = run("inspect", artifact)
    assert (code, out) == (1, "Error: deltahub.json is not valid JSON; the artifact is truncated or corrupt. Pull it again.")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "C:\\\\x", "a/../../b", "\\\\\\\\host\\\\share"])
def test_manifest_naming_a_file_outside_the_folder(artifact: Path, name: str) -> None:
    m = artifact / "deltahub.json"
    data = json.loads(m.read_text())
    data["files"][0]["path"] = json.loads(f'"{name}"')
    m.write_text(json.dumps(data))
    code, out = run("inspect", artifact)
    assert code == 1
    assert out == f"Error: Refusing file name {json.loads(chr(34) + name + chr(34))!r}: it would escape the artifact folder. Use plain relative names."


def test_newer_format_version(artifact: Path) -> None:
    m = artifact / "deltahub.json"
    data = json.loads(m.read_text())
    data["format_version"] = 99
    m.write_text(json.dumps(data))
    code, out = run("inspect", artifact)
    assert (code, out) == (1, "Error: This artifact uses format_version 99; this deltahub reads up to 1. Upgrade with `pip install -U deltahub`.")


def test_not_an_artifact(tmp_path: Path) -> None:
    code, out = run("inspect", tmp_path)
    assert (code, out) == (1, f"Error: No deltahub artifact at {tmp_path} (no deltahub.json); check the path or `deltahub ls`.")


def test_output_folder_that_is_not_ours_is_kept(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = models
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, out = run("compress", ft, "--base", base, "-o", tmp_path / "mine")
    assert (code, out) == (1, f"Error: {tmp_path / 'mine'} exists and is not a deltahub artifact; choose another output folder or remove it.")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["compress"])
    assert result.exit_code == 2
    result = CliRunner().invoke(cli, ["apply", str(tmp_path), "--alpha", "lots", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2


def test_missing_tag_names_the_tags_there_are(artifact: Path) -> None:
    code, out = run("push", artifact, "--tag", "v1")
    assert code == 0, out
    code, out = run("inspect", "art")
    assert (code, out) == (1, "Error: No artifact 'art' in the local registry (tags of art: v1); see `deltahub ls`.")
    code, out = run("apply", "nothing-here", "-o", artifact.parent / "m")
    assert (code, out) == (1, "Error: No artifact 'nothing-here' in the local registry; see `deltahub ls`.")


def test_newer_codec_version_is_refused(artifact: Path) -> None:
    m = artifact / "deltahub.json"
    data = json.loads(m.read_text())
    data["tensors"][0]["codec_version"] = 7
    m.write_text(json.dumps(data))
    name, codec = data["tensors"][0]["name"], data["tensors"][0]["codec"]
    code, out = run("apply", artifact, "--base", artifact.parent / "models" / "base.safetensors", "-o", artifact.parent / "m")
    assert (code, out) == (1, f"Error: {name!r} was encoded with codec {codec} v7; the installed one is v1. "
                              "Upgrade the plugin that provides it (`deltahub codecs`).")
