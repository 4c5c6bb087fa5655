"""Contract tests every codec runs, built-in or third-party (like fsspec's abstract test suites).

A plugin author subclasses :class:`CodecContract` in their own test suite::

    from deltahub.testing import CodecContract

    class TestTernary(CodecContract):
        codec_name = "ternary"
        configs = [{"density": 0.1}]

Requires pytest (imported here, never by ``import deltahub``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from deltahub.codecs import Codec, CodecConfig, Encoded, get_codec
from deltahub.compressing import fit_one
from deltahub.kernels import apply_, to_dense

SHAPES = [(33, 17), (64, 48), (5, 3, 7), (8, 3, 3, 3), (1, 1), (0, 4), (4, 0), (300,)]


def pico_pair(tmp: Path, *, seed: int = 0, scale: float = 0.02) -> tuple[Path, Path]:
    """A tiny base/fine-tune pair of safetensors files (a few KB) for artifact-level tests."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base = {"layer.0.weight": torch.randn(48, 40, generator=g), "layer.0.bias": torch.randn(48, generator=g),
            "layer.1.weight": torch.randn(16, 48, generator=g), "norm.weight": torch.ones(16)}
    ft = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(base, str(tmp / "base.safetensors"))
    save_file(ft, str(tmp / "ft.safetensors"))
    return tmp / "base.safetensors", tmp / "ft.safetensors"


class CodecContract:
    """Behaviour every codec guarantees. Set ``codec_name`` and ``configs`` in a subclass."""

    codec_name: ClassVar[str]
    configs: ClassVar[list[dict[str, Any]]] = [{}]
    max_rel_error: ClassVar[float | None] = None  # None: any finite result; 0.0: lossless

    # ------------------------------------------------------------------------------ helpers
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "codec_params" in metafunc.fixturenames:
            ids = [",".join(f"{k}={v}" for k, v in c.items()) or "defaults" for c in self.configs]
            metafunc.parametrize("codec_params", self.configs, ids=ids)

    @pytest.fixture
    def setup(self, codec_params: dict[str, Any]) -> tuple[Codec, CodecConfig]:
        codec = get_codec(self.codec_name)
        return codec, codec.parse_config(codec_params)

    def encode(self, codec: Codec, config: CodecConfig, delta: torch.Tensor, name: str = "t") -> Encoded:
        return codec.encode(delta, config, fit_one(codec, config, name, delta), name=name)

    @staticmethod
    def delta(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.01

    # ------------------------------------------------------------------------------ contract
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_round_trip_keeps_shape(self, setup: tuple[Codec, CodecConfig], shape: tuple[int, ...]) -> None:
        codec, config = setup
        d = self.delta(shape)
        out = codec.decode(self.encode(codec, config, d), shape)
        assert tuple(out.shape) == shape
        assert out.dtype in (torch.float32, torch.float64)
        assert torch.isfinite(out).all()
        if self.max_rel_error is not None and d.numel():
            err = (out.double() - d.double()).norm() / d.double().norm().clamp_min(1e-30)
            assert err <= self.max_rel_error

    def test_meta_is_str_and_tensors_dense(self, setup: tuple[Codec, CodecConfig]) -> None:
        codec, config = setup
        enc = self.encode(codec, config, self.delta((32, 24)))
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in enc.meta.items())
        assert all(isinstance(t, torch.Tensor) and t.layout == torch.strided for t in enc.tensors.values())

    def test_deterministic(self, setup: tuple[Codec, CodecConfig]) -> None:
        codec, config = setup
        d = self.delta((40, 30), seed=3)
        a, b = self.encode(codec, config, d), self.encode(codec, config, d.clone())
        assert a.meta == b.meta and a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

    def test_non_contiguous_input(self, setup: tuple[Codec, CodecConfig]) -> None:
        codec, config = setup
        d = self.delta((24, 40), seed=4)
        a = codec.decode(self.encode(codec, config, d.t()), (40, 24))
        b = codec.decode(self.encode(codec, config, d.t().contiguous()), (40, 24))
        assert torch.equal(a, b)

    def test_truncated_payload_is_rejected(self, setup: tuple[Codec, CodecConfig]) -> None:
        codec, config = setup
        enc = self.encode(codec, config, self.delta((64, 48)))
        key = max(enc.tensors, key=lambda k: enc.tensors[k].numel())
        broken = Encoded({**enc.tensors, key: enc.tensors[key].reshape(-1)[:-1]}, enc.meta)
        with pytest.raises((ValueError, RuntimeError)):
            codec.decode(broken, (64, 48))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    def test_resident_apply_matches_decode(self, setup: tuple[Codec, CodecConfig], dtype: torch.dtype) -> None:
        codec, config = setup
        shape = (40, 56)
        enc = self.encode(codec, config, self.delta(shape, seed=5))
        res = codec.to_resident(enc, shape)
        dec = codec.decode(enc, shape)
        assert torch.allclose(to_dense(res).double(), dec.double(), rtol=1e-6, atol=1e-7)
        w = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(dtype)
        expected = (w.to(dec.dtype) + dec).to(dtype)
        got = apply_(w.clone(), res)
        assert torch.allclose(got.double(), expected.double(), rtol=0, atol=float(torch.finfo(dtype).eps) * 8)

    def test_artifact_round_trip(self, setup: tuple[Codec, CodecConfig], tmp_path: Path) -> None:
        import deltahub

        codec, config = setup
        base, ft = pico_pair(tmp_path / "models")
        art = deltahub.compress(ft, base=base, codec=codec.name, out=tmp_path / "art", **config.model_dump())
        again = deltahub.load(tmp_path / "art")
        assert again.id == art.id
        merged = deltahub.apply(again, base, out=tmp_path / "merged")
        assert merged.exists()
        decoded = again.decode()
        assert set(decoded) <= {"layer.0.weight", "layer.0.bias", "layer.1.weight", "norm.weight"}
