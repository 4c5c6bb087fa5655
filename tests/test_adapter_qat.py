"""1-bit adapters: quantization-aware training (STE) gives the forward the 1-bit artifact reproduces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltahub
from deltahub.adapter import get_adapter
from deltahub.adapting import save_adapter
from deltahub.errors import CodecConfigError
from deltahub.testing import TinyNet

CONFIGS = {"lora": {"target_modules": ["proj", "out"], "r": 4}, "mos": {"target_modules": ["proj"], "r": 2, "v": 2,
                                                                         "p": 2, "c": 2}}


def _train(kind: str, bits: int | None, steps: int = 30) -> tuple[torch.nn.Module, torch.nn.Module, list[float]]:
    base, model = TinyNet(), TinyNet()
    params = get_adapter(kind).inject(model, {**CONFIGS[kind], "bits": bits})
    opt = torch.optim.Adam(params, lr=3e-2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 23, (32, 7), generator=g), torch.randint(0, 3, (32,), generator=g)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return base, model, losses


@pytest.mark.parametrize("kind", ["lora", "mos"])
def test_qat_adapter_stored_at_1_bit_reproduces_its_training_forward(kind: str, tmp_path: Path) -> None:
    base, model, losses = _train(kind, bits=1)
    assert losses[-1] < losses[0]  # the STE passes gradients through the 1-bit forward
    art = save_adapter(model, kind=kind, codec="binary", out=tmp_path / "a", bits=1)
    floats = [e for e in art.manifest.tensors if e.op == "native" and e.dtype == "float32"]
    assert floats and all(e.codec == "binary" and e.stored_bytes() <= -(-e.numel // 8) + 8 for e in floats)
    merged = deltahub.apply(deltahub.load(tmp_path / "a"), base.state_dict())
    base.load_state_dict(merged)
    x = torch.randint(0, 23, (8, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.allclose(base(x), model(x), atol=1e-5)


def test_full_precision_adapter_changes_when_stored_at_1_bit(tmp_path: Path) -> None:
    base, model, _ = _train("lora", bits=None)
    save_adapter(model, kind="lora", codec="binary", out=tmp_path / "a", bits=1)
    merged = deltahub.apply(deltahub.load(tmp_path / "a"), base.state_dict())
    base.load_state_dict(merged)
    x = torch.randint(0, 23, (8, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert not torch.allclose(base(x), model(x), atol=1e-3)  # post-training quantization moves it


def test_bits_option_is_checked() -> None:
    with pytest.raises(CodecConfigError, match="bits must be 1, 2, 3 or 4"):
        get_adapter("lora").inject(TinyNet(), {"target_modules": ["proj"], "bits": 8})
