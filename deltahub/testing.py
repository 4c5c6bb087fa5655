"""Contract tests every codec and resident layout runs, built-in or third-party (like fsspec's abstract suites).

A plugin author subclasses :class:`CodecContract` in their own test suite::

    from deltahub.testing import CodecContract

    class TestTernary(CodecContract):
        codec_name = "ternary"
        configs = [{"density": 0.1}]

Its ``to_resident`` output goes through :func:`check_layout`: every kernel operation on every CPU backend
against the plain-torch reference (``deltahub.kernels.reference``).

Requires pytest (imported here, never by ``import deltahub``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from deltahub.codecs import Codec, CodecConfig, Encoded, get_codec
from deltahub.kernels import LAYOUTS, Dense, LowRank, Resident, apply_, delta_matmul, to_dense
from deltahub.kernels import reference as ref
from deltahub.kernels.pack import codes_layout, pack_rows, sparse_rows, ternary_mask

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


LAYOUT_KINDS = ("dense", "dense64", "codes1", "codes2", "codes3", "codes_rows", "mask", "csr", "csr_int8",
                "lowrank", "lowrank_t")
CPU_BACKENDS = ("torch", "compiled")


def random_layout(kind: str, shape: tuple[int, ...], *, seed: int = 0, density: float = 0.3) -> Resident:
    """A random resident layout of ``kind`` (one of ``LAYOUT_KINDS``) and ``shape``, for kernel tests."""
    from deltahub.kernels.layouts import matrix_shape

    g = torch.Generator().manual_seed(seed)
    rows, cols = matrix_shape(shape)
    n = rows * cols
    if kind in ("dense", "dense64"):
        return Dense(torch.randn(shape, generator=g, dtype=torch.float64 if kind == "dense64" else torch.float32))
    if kind.startswith("codes"):
        bits = 1 if kind == "codes_rows" else int(kind[-1])
        book = torch.randn(rows if kind == "codes_rows" else 1, 1 << bits, generator=g).sort(dim=1).values
        return codes_layout(torch.randint(0, 1 << bits, (n,), generator=g), bits, book, shape)
    positions = torch.nonzero(torch.rand(n, generator=g) < density).reshape(-1)
    scale = float(torch.rand(1, generator=g)) + 0.1
    if kind == "mask":
        neg = torch.rand(positions.numel(), generator=g) < 0.5
        return ternary_mask(positions, pack_rows(neg.reshape(1, -1)).reshape(-1), scale, shape)
    if kind.startswith("csr"):
        if kind == "csr_int8":
            values = (torch.randint(0, 2, (positions.numel(),), generator=g) * 2 - 1).to(torch.int8)
        else:
            values = torch.randn(positions.numel(), generator=g).to(torch.float16)
        return sparse_rows(positions, values, scale, shape)
    rank = 3
    if kind == "lowrank":
        return LowRank(torch.randn(rank, cols, generator=g), torch.randn(rows, rank, generator=g).to(torch.float16),
                       scale, shape)
    return LowRank(torch.randn(rank, rows, generator=g), torch.randn(cols, rank, generator=g), scale, shape,
                   transposed=True)


def _backends() -> list[str]:
    from deltahub.kernels import native

    return [b for b in CPU_BACKENDS if b != "compiled" or native.library() is not None]


def check_layout(layout: Resident, *, seed: int = 0) -> None:
    """Every CPU backend of ``apply_`` and ``delta_matmul`` on ``layout`` against the reference.

    ``apply_`` is bit-exact (value-equal) but for ``LowRank``, whose matmul sums in the BLAS's order;
    ``delta_matmul`` agrees within 1e-5 relative (fp32), 1e-2 (fp16/bf16 outputs).
    """
    assert isinstance(layout, LAYOUTS), f"{type(layout).__name__} is not a resident layout"
    layout.validate()
    assert layout == layout.to("cpu")
    dense = to_dense(layout)
    assert tuple(dense.shape) == tuple(layout.shape) and dense.dtype in (torch.float32, torch.float64)
    assert bool(torch.isfinite(dense).all())
    g = torch.Generator().manual_seed(seed)
    exact = not isinstance(layout, LowRank)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for alpha in (1.0, -0.37):
            w = torch.randn(layout.shape, generator=g).to(dtype)
            want = ref.apply_(w.clone(), layout, alpha)
            for backend in _backends():
                got = apply_(w.clone(), layout, alpha=alpha, backend=backend)
                _close(got, want, exact, f"apply_ {backend} {dtype} alpha={alpha}")
                # out of place from a clean copy (the pool's hot swap): dst's old bytes must not matter
                dst = torch.full_like(w, float("nan"))
                got = apply_(dst, layout, alpha=alpha, source=w, backend=backend)
                _close(got, want, exact, f"apply_ source= {backend} {dtype} alpha={alpha}")
                if w.dim() == 2 and min(w.shape) > 1:  # a non-contiguous weight (a transposed view)
                    wt = w.t().contiguous().t()
                    _close(apply_(wt, layout, alpha=alpha, backend=backend), want, exact, f"apply_ {backend} view")
    rows, cols = layout.matrix
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(3, cols, generator=g).to(dtype)
        out = torch.randn(3, rows, generator=g).to(dtype)
        want = ref.delta_matmul(x, layout, 0.5, out=out.clone())
        for backend in _backends():
            got = delta_matmul(x, layout, alpha=0.5, out=out.clone(), backend=backend)
            _close(got, want, False, f"delta_matmul {backend} {dtype}")


def _close(got: torch.Tensor, want: torch.Tensor, exact: bool, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if exact:
        assert torch.equal(got, want), f"{what}: max |diff| {(got.double() - want.double()).abs().max():.3g}"
        return
    if got.numel() == 0:
        return
    tol = 1e-5 if got.dtype in (torch.float32, torch.float64) else 1e-2
    scale = want.double().abs().max().clamp_min(1.0)
    err = (got.double() - want.double()).abs().max() / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


class LayoutContract:
    """Checks for a resident layout factory: subclass and set ``make`` (shape, seed) -> layout."""

    shapes: ClassVar[list[tuple[int, ...]]] = [(33, 17), (5, 3, 7), (1, 1), (0, 4), (4, 0), (1, 130), (300,), ()]

    def make(self, shape: tuple[int, ...], seed: int) -> Resident:
        raise NotImplementedError

    @pytest.mark.parametrize("shape", shapes, ids=str)
    def test_layout_matches_reference(self, shape: tuple[int, ...]) -> None:
        check_layout(self.make(shape, 0))


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
        return codec.encode(delta, config, codec.fit_one(name, delta, config), name=name)

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

    def test_encode_grid_equals_encode(self, setup: tuple[Codec, CodecConfig]) -> None:
        """``auto`` encodes through ``encode_grid``: over the codec's auto grid it must be ``encode``, bit for bit."""
        codec, config = setup
        configs = [config, *(codec.parse_config(p) for p in codec.auto_grid)]
        d = self.delta((48, 40), seed=5)
        for cfg, got in zip(configs, codec.encode_grid(d, configs, name="t")):
            want = self.encode(codec, cfg, d)
            assert got.meta == want.meta and got.tensors.keys() == want.tensors.keys()
            assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)

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

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_sparse_form_equals_decode(self, setup: tuple[Codec, CodecConfig], shape: tuple[int, ...]) -> None:
        codec, config = setup
        enc = self.encode(codec, config, self.delta(shape, seed=8))
        sp = codec.sparse(enc, shape)
        if sp is None:
            pytest.skip(f"{codec.name} has no sparse form")
        pos, values = sp
        assert pos.dtype == torch.int64 and values.dtype == torch.float32 and pos.shape == values.shape
        assert pos.numel() < 2 or bool((pos[1:] > pos[:-1]).all())
        dense = torch.zeros(math.prod(shape), dtype=torch.float32)
        dense[pos] = values
        assert torch.equal(dense.reshape(shape), codec.decode(enc, shape).float())

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

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_resident_layout_contract(self, setup: tuple[Codec, CodecConfig], shape: tuple[int, ...]) -> None:
        codec, config = setup
        if not codec.accepts("t", shape, config):
            pytest.skip(f"{codec.name} leaves {shape} to dense")
        check_layout(codec.to_resident(self.encode(codec, config, self.delta(shape, seed=7)), shape))

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


class TinyNet(torch.nn.Module):
    """A small model with the layer types adapters target: an embedding, two linears (for contract tests)."""

    def __init__(self, vocab: int = 23, dim: int = 12, hidden: int = 20, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.proj = torch.nn.Linear(dim, hidden)
        self.out = torch.nn.Linear(hidden, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(self.embed(ids)))).mean(1)


class AdapterContract:
    """Behaviour every adapter kind guarantees. Set ``kind_name`` and ``config`` (for ``TinyNet`` by default)."""

    kind_name: ClassVar[str]
    config: ClassVar[dict[str, Any]] = {}

    def make_model(self) -> torch.nn.Module:
        return TinyNet()

    def inputs(self) -> torch.Tensor:
        return torch.randint(0, 23, (4, 7), generator=torch.Generator().manual_seed(1))

    def trained(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(base, adapted) with the adapter's parameters set to random values (as after training)."""
        from deltahub.adapter import get_adapter

        base, model = self.make_model().eval(), self.make_model().eval()
        params = get_adapter(self.kind_name).inject(model, self.config)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return base, model

    def test_inject_returns_only_trainable_adapter_parameters(self) -> None:
        from deltahub.adapter import get_adapter

        model = self.make_model()
        params = get_adapter(self.kind_name).inject(model, self.config)
        assert params and all(p.requires_grad for p in params)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in params}

    def test_native_tensors_materialize_to_the_adapted_model(self) -> None:
        import json

        from deltahub.adapter import get_adapter
        from deltahub.kernels import LAYOUTS

        kind = get_adapter(self.kind_name)
        base, model = self.trained()
        tensors, config = kind.native_tensors(model)
        json.dumps(config)  # the config is stored as JSON in the manifest
        targets = kind.targets(tensors, config)
        assert {k for t in targets for k in t.tensors} <= set(tensors)
        made = kind.materialize(tensors, config)
        if all(isinstance(r, torch.nn.Module) for r in made.values()):  # a nonlinear kind: attached, not merged
            from deltahub.adapters.injection import Attached, swap

            for t in targets:
                name = t.weight.removesuffix(".weight")
                mod = base.get_submodule(name)
                assert tuple(mod.weight.shape) == tuple(t.shape)
                swap(base, name, Attached(mod, made[t.weight]))
            x = self.inputs()
            assert torch.allclose(base(x), model(x), rtol=1e-4, atol=1e-5)
            return
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        for t in targets:
            res = made[t.weight]
            assert isinstance(res, LAYOUTS) and tuple(res.shape) == tuple(t.shape) == tuple(sd[t.weight].shape)
            apply_(sd[t.weight], res)
        base.load_state_dict(sd)
        x = self.inputs()
        assert torch.allclose(base(x), model(x), rtol=1e-4, atol=1e-5)

    def test_artifact_round_trip(self, tmp_path: Path) -> None:
        import deltahub
        from deltahub.adapting import save_adapter

        base, model = self.trained()
        art = save_adapter(model, kind=self.kind_name, out=tmp_path / "adapter")
        again = deltahub.load(tmp_path / "adapter")
        assert again.id == art.id and again.manifest.kind == self.kind_name
        try:
            merged = deltahub.apply(again, base.state_dict())
            base.load_state_dict(merged)
        except deltahub.NotMergeableError:  # a nonlinear kind: the attach path
            deltahub.attach(again, base)
        x = self.inputs()
        assert torch.allclose(base(x), model(x), rtol=1e-4, atol=1e-5)
