"""The ``mos`` adapter kind: the invariants of research/codecs.md §4e, the adapter contract, native storage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deltahub
from deltahub.adapter import get_adapter
from deltahub.adapters.mos import MosLayer
from deltahub.errors import CodecConfigError
from deltahub.testing import AdapterContract


class Stack(nn.Module):
    """Three blocks with a same-shaped ``fc`` each (one MoS projection type, L = 3) and a head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(23, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(16, 16)}) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = torch.tanh(b["fc"](h)) + h
        return self.head(h).mean(1)


CONFIG = {"target_modules": ["fc"], "r": 4, "v": 2, "p": 1, "c": 2, "lora_alpha": 8}


class TestMosContract(AdapterContract):
    kind_name = "mos"
    config = CONFIG

    def make_model(self) -> nn.Module:
        return Stack()


def test_c1_p_equal_v_equal_r_is_plain_lora() -> None:
    r = 3
    mos_model, lora_model = Stack(), Stack()
    get_adapter("mos").inject(mos_model, {"target_modules": ["fc"], "r": r, "v": r, "p": r, "c": 1, "lora_alpha": 6})
    get_adapter("lora").inject(lora_model, {"target_modules": ["fc"], "r": r, "lora_alpha": 6})
    g = torch.Generator().manual_seed(4)
    pool = mos_model.mos_pools["fc_16x16"]
    with torch.no_grad():
        pool.pool_A.copy_(torch.randn(pool.pool_A.shape, generator=g))
        pool.pool_B.copy_(torch.randn(pool.pool_B.shape, generator=g))
        for layer, block in enumerate(lora_model.blocks):  # A_ℓ = P_A[ℓr:(ℓ+1)r], B_ℓ = P_B[ℓr:(ℓ+1)r]ᵀ
            block["fc"].lora_A.weight.copy_(pool.pool_A[layer * r:(layer + 1) * r])
            block["fc"].lora_B.weight.copy_(pool.pool_B[layer * r:(layer + 1) * r].T)
    x = torch.randint(0, 23, (2, 5), generator=g)
    assert torch.allclose(mos_model(x), lora_model(x), atol=1e-6)


def test_indices_params_and_zero_init() -> None:
    model, base = Stack(), Stack()
    params = get_adapter("mos").inject(model, {"target_modules": ["fc"], "r": 4, "v": 2, "p": 1, "c": 2})
    L, v, p, c, r = 3, 2, 1, 2, 4
    assert sum(q.numel() for q in params) == v * L * (16 + 16)  # LoRA's budget at rank v
    public = (v - p) * L * c
    layers = [b["fc"] for b in model.blocks]
    privates = []
    for layer, m in enumerate(layers):
        assert isinstance(m, MosLayer)
        for idx in (m.mos_index_A, m.mos_index_B):
            assert idx.dtype == torch.int32 and idx.numel() == r * c
            pub, priv = idx[:(r - p) * c].tolist(), idx[(r - p) * c:].tolist()
            assert len(set(pub)) == len(pub) and all(0 <= i < public for i in pub)
            assert priv == list(range(public + layer * p * c, public + (layer + 1) * p * c))
        privates.append(set(priv))
        assert m.mos_index_A.tolist() != m.mos_index_B.tolist() or layer  # A and B drawn independently
    assert all(not (a & b) for i, a in enumerate(privates) for b in privates[i + 1:])
    x = torch.randint(0, 23, (2, 5))
    assert torch.equal(model(x), base(x))  # P_B = 0: ΔW = 0 at init


def test_bad_configs_are_typed_errors() -> None:
    with pytest.raises(CodecConfigError, match="not divisible; pick c dividing both"):
        get_adapter("mos").inject(Stack(), {"target_modules": ["head"], "c": 3})
    with pytest.raises(CodecConfigError, match="raise v or lower r"):
        get_adapter("mos").inject(Stack(), {"target_modules": ["fc"], "r": 8, "v": 2, "p": 1, "c": 2})


def test_stored_natively_and_indices_exact_under_a_lossy_codec(tmp_path: Path) -> None:
    from deltahub.adapting import save_adapter

    base, model = TestMosContract().trained()
    art = save_adapter(model, kind="mos", codec="binary", out=tmp_path / "a", bits=1)
    entries = {e.name: e for e in art.manifest.tensors}
    assert {e.codec for n, e in entries.items() if "pool_" in n} == {"binary"}
    idx = [e for n, e in entries.items() if "mos_index" in n]
    assert idx and all(e.codec == "dense" and e.params == {"dtype": "exact"} and e.rel_error == 0 for e in idx)
    # native: the pools and indices, never the dense per-layer factors (r/v times larger)
    dense_factors = 3 * 4 * (16 + 16)  # per-layer A and B at rank r = 4
    assert art.manifest.stats["params"] < dense_factors * 2
    again = deltahub.load(tmp_path / "a")
    merged = deltahub.apply(again, base.state_dict())
    assert set(merged) == set(base.state_dict())
