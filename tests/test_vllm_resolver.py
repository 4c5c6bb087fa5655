"""The vLLM resolver's plain-Python core (no vLLM needed): lookup, base check, export cache, refusals."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import deltahub
from deltahub.integrations.vllm import lora_id, resolve_folder

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 16)
        self.v_proj = torch.nn.Linear(16, 16)


def _base(folder: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in Tiny().state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def _lora(tmp_path: Path, base: Path, name: str, r: int = 4) -> deltahub.Artifact:
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(Tiny(), peft.LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_()
    pm.save_pretrained(str(tmp_path / f"peft-{name}"))
    art = deltahub.compress(tmp_path / f"peft-{name}", base=base, out=tmp_path / name, name=name)
    deltahub.Registry().push(art)
    return art


def test_resolves_exports_once_and_reuses(tmp_path: Path) -> None:
    base = _base(tmp_path / "base", 0)
    art = _lora(tmp_path, base, "expert")
    folder = resolve_folder(str(base), "expert")
    assert folder is not None and folder.name == art.id.removeprefix("sha256:")
    stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    assert resolve_folder(str(base), "expert:latest") == folder  # the same artifact: the same folder, not rewritten
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert lora_id(art.id) == int(art.id.removeprefix("sha256:")[:7], 16) + 1 > 0


def test_refusals_return_none_with_the_reason_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base, other = _base(tmp_path / "base", 0), _base(tmp_path / "other", 1)
    _lora(tmp_path, other, "alien")
    _lora(tmp_path, base, "wide", r=32)
    caplog.set_level(logging.INFO, logger="vllm.deltahub")
    assert resolve_folder(str(base), "alien") is None
    assert "refusing 'alien' for base" in caplog.text and "does not match expert 'alien'" in caplog.text
    assert resolve_folder(str(base), "no-such") is None and "no expert 'no-such' in the local registry" in caplog.text
    assert resolve_folder(str(base), "wide") is None
    assert "has LoRA rank 32 > 16" in caplog.text and "--max-lora-rank 32" in caplog.text
    assert resolve_folder(str(base), "../../etc") is None and "cannot serve '../../etc'" in caplog.text
    monkeypatch.setenv("DELTAHUB_VLLM_MAX_LORA_RANK", "sixteen")
    assert resolve_folder(str(base), "wide") is None and "is not a rank" in caplog.text
    monkeypatch.setenv("DELTAHUB_VLLM_MAX_LORA_RANK", "32")
    assert resolve_folder(str(base), "wide") is not None
    assert resolve_folder(str(tmp_path / "missing-model"), "wide") is None
    assert "which is no local folder or cached Hub repo" in caplog.text


def test_registry_failure_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAHUB_VLLM_REGISTRY", "nosuchscheme://x")
    caplog.set_level(logging.INFO, logger="vllm.deltahub")
    assert resolve_folder(str(_base(tmp_path / "base", 0)), "expert") is None
    assert "cannot serve 'expert'" in caplog.text


def test_vllm_args_prints_the_command() -> None:
    from click.testing import CliRunner

    from deltahub.cli import cli

    out = CliRunner().invoke(cli, ["vllm-args", "--model", "/m", "--registry", "file:///r", "--max-lora-rank", "32"])
    assert out.exit_code == 0
    assert out.output.splitlines() == [
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 DELTAHUB_VLLM_MAX_LORA_RANK=32 DELTAHUB_VLLM_REGISTRY=file:///r \\",
        ("  python -m vllm.entrypoints.openai.api_server --model /m --enable-lora --max-lora-rank 32 --max-loras 4 "
         "--port 8000")]


def test_register_without_vllm_says_what_to_install() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from deltahub.integrations.vllm import register

    with pytest.raises(ImportError):
        register()
