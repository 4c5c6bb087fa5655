"""The ``compacter`` adapter kind: PHM math, one shared rule, the attach path, and merging refused."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import deltahub
from deltahub.adapter import get_adapter
from deltahub.adapters.compacter import phm_weight
from deltahub.adapting import save_adapter
from deltahub.testing import AdapterContract


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(23, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({"ffn": nn.Linear(16, 16)}) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = h + torch.tanh(b["ffn"](h))
        return self.head(h).mean(1)


class TestCompacterContract(AdapterContract):
    kind_name = "compacter"
    config: ClassVar[dict] = {"target_modules": ["ffn"], "n": 4, "reduction": 2}

    def make_model(self) -> nn.Module:
        return Net()


def test_phm_weight_is_a_sum_of_kronecker_products() -> None:
    g = torch.Generator().manual_seed(0)
    rule, s, t = torch.randn(4, 4, 4, generator=g), torch.randn(4, 3, 1, generator=g), torch.randn(4, 1, 2, generator=g)
    want = sum(torch.kron(rule[i], s[i] @ t[i]) for i in range(4))
    assert torch.allclose(phm_weight(rule, s, t), want, atol=1e-5)
    assert torch.linalg.matrix_rank(want) <= 16  # rank(H) ≤ n² for rank-1 B_i


def test_one_rule_is_shared_and_stored_once(tmp_path: Path) -> None:
    _, model = TestCompacterContract().trained()
    rules = {id(m.compacter._rule) for m in model.modules() if hasattr(m, "compacter") and hasattr(m, "base_layer")}
    assert len(rules) == 1
    art = save_adapter(model, kind="compacter", out=tmp_path / "a")
    assert sum(1 for e in art.manifest.tensors if e.name.endswith("rule")) == 1
    params = get_adapter("compacter").inject(Net(), {"target_modules": ["ffn"], "n": 4, "reduction": 2})
    # per adapter: n·(in/n + out/n) factor floats per PHM layer + biases; one n³ rule
    assert sum(p.numel() for p in params) == 4 ** 3 + 2 * (2 * 4 * (4 + 2) + 8 + 16)


def test_apply_refuses_and_points_to_attach(tmp_path: Path) -> None:
    base, model = TestCompacterContract().trained()
    save_adapter(model, kind="compacter", out=tmp_path / "a")
    with pytest.raises(deltahub.NotMergeableError, match=r"attach it with deltahub.attach\(artifact, model\)"):
        deltahub.apply(tmp_path / "a", base.state_dict())
    x = torch.randint(0, 23, (3, 5))
    pool = deltahub.ExpertPool(base)
    pool.add("c", tmp_path / "a")
    with torch.no_grad():
        want, plain = model(x), base(x)
        with pool.route(["c", None, "c"]):
            got = base(x)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[2], want[2], atol=1e-5)
    assert torch.equal(got[1], plain[1])
    with pytest.raises(deltahub.NotMergeableError, match=r"serve it on the fly \(pool.route\)"):
        pool.activate("c")
    assert pool.active is None
    with torch.no_grad():
        assert torch.equal(base(x), plain)  # nothing merged
    pool.close()
    deltahub.attach(tmp_path / "a", base)
    with torch.no_grad():
        assert torch.allclose(base(x), model(x), atol=1e-5)


def test_attach_refuses_another_model(tmp_path: Path) -> None:
    _, model = TestCompacterContract().trained()
    save_adapter(model, kind="compacter", out=tmp_path / "a")
    with pytest.raises(deltahub.BaseMismatchError, match="attach it to the model it was trained on"):
        deltahub.attach(tmp_path / "a", nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("kind", ["lora", "mos", "flora", "compacter"])
def test_one_call_inject_for_every_kind(kind: str) -> None:
    import deltahub.adapters

    cfg = {"target_modules": ["ffn"], "r": 2, "v": 2, "p": 2, "c": 2, "n": 4, "reduction": 2}
    cfg = {k: v for k, v in cfg.items() if k in {"lora": ("target_modules", "r"), "mos": ("target_modules", "r", "v",
           "p", "c"), "flora": ("target_modules", "r"), "compacter": ("target_modules", "n", "reduction")}[kind]}
    model = Net()
    params = deltahub.adapters.inject(model, kind, cfg)
    assert params and {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    with pytest.raises(deltahub.AdapterNotFoundError):
        deltahub.adapters.inject(Net(), kind + "x", cfg)
