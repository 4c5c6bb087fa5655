"""The ``flora`` adapter kind: Tucker math on the true weight shape, the contract, and the PEFT export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import deltahub
from deltahub.adapter import get_adapter
from deltahub.adapters.flora import tucker_delta
from deltahub.adapting import save_adapter
from deltahub.cli import cli
from deltahub.testing import AdapterContract


class TestFloraContract(AdapterContract):
    kind_name = "flora"
    config: ClassVar[dict] = {"target_modules": ["proj", "out"], "r": 3, "scale": 2.0}


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise: weight (8, 1, 3, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(torch.relu(self.conv(x))).mean((2, 3)))


def test_tucker_elementwise_formula_and_lora_form() -> None:
    g = torch.Generator().manual_seed(0)
    core = torch.randn(2, 3, 2, 2, generator=g)
    us = [torch.randn(d, r, generator=g) for d, r in zip((4, 5, 3, 3), (2, 3, 2, 2))]
    dw = tucker_delta(core, us, 0.5)
    want = 0.5 * torch.einsum("abcd,ia,ob,hc,wd->oihw", core, *us)
    assert dw.shape == (5, 4, 3, 3) and torch.allclose(dw, want, atol=1e-5)
    core2, u0, u1 = torch.randn(3, 4, generator=g), torch.randn(6, 3, generator=g), torch.randn(7, 4, generator=g)
    assert torch.allclose(tucker_delta(core2, [u0, u1], 2.0), 2.0 * u1 @ core2.T @ u0.T, atol=1e-5)


def test_grouped_conv_uses_the_true_weight_shape_and_round_trips(tmp_path: Path) -> None:
    base, model = Convs().eval(), Convs().eval()
    params = get_adapter("flora").inject(model, {"target_modules": ["conv", "dw"], "r": [2, 3, 2, 2]})
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(x), base(x))  # G = 0: ΔW = 0
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    assert model.dw.flora_U0.shape == (1, 1)  # d_0 = in/groups = 1, its rank capped at 1
    save_adapter(model, kind="flora", out=tmp_path / "a")
    merged = deltahub.apply(deltahub.load(tmp_path / "a"), base.state_dict())
    base.load_state_dict(merged)
    with torch.no_grad():
        assert torch.allclose(base(x), model(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["flora", "mos"])
def test_lowrank_kinds_export_as_peft_lora(kind: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    if kind == "flora":
        base, model = TestFloraContract().trained()
    else:
        from test_mos import TestMosContract

        base, model = TestMosContract().trained()
    save_adapter(model, kind=kind, out=tmp_path / "a")
    deltahub.export(tmp_path / "a", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    x = torch.randint(0, 23, (4, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(lora(x), model(x), atol=1e-5)


def test_flora_kind_is_mergeable_like_lora() -> None:
    made = get_adapter("flora").materialize(*get_adapter("flora").native_tensors(TestFloraContract().trained()[1]))
    assert made and all(type(r).__name__ == "LowRank" for r in made.values())


@pytest.mark.parametrize("kind", ["flora", "mos"])
def test_expert_pool_serves_the_new_kinds_routed_and_merged(kind: str, tmp_path: Path) -> None:
    from deltahub import ExpertPool

    if kind == "flora":
        base, model = TestFloraContract().trained()
        x = torch.randint(0, 23, (3, 7), generator=torch.Generator().manual_seed(5))
    else:
        from test_mos import TestMosContract

        base, model = TestMosContract().trained()
        x = torch.randint(0, 23, (3, 7), generator=torch.Generator().manual_seed(5))
    save_adapter(model, kind=kind, out=tmp_path / "a")
    pool = ExpertPool(base)
    pool.add("x", tmp_path / "a")
    with torch.no_grad():
        want, plain = model(x), base(x)
        with pool.route(["x", None, "x"]):
            got = base(x)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[2], want[2], atol=1e-5)
        assert torch.allclose(got[1], plain[1], atol=1e-6)
        pool.activate("x")
        assert torch.allclose(base(x), want, atol=1e-5)
    out = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a")])
    assert out.exit_code == 0 and f"adapter       {kind} v1" in out.output
