"""Invariants of the seed codecs dare, darex, bitdelta and binary (research/codecs.md §2f, §3f, §7)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from deltahub.calibration import Calibration
from deltahub.codecs import Codec, DeltaSource, Encoded
from deltahub.codecs import get_codec as _get_codec
from deltahub.errors import CodecConfigError
from deltahub.kernels import to_dense
from deltahub.plugins.binary import LEVELS, codebook, pack_codes, unpack_codes
from deltahub.plugins.dare import keep_mask
from deltahub.plugins.darex import retune


class Source(DeltaSource):
    def __init__(self, items: dict[str, torch.Tensor]):
        self.items = items

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.items.items()


@functools.cache
def get_codec(name: str) -> Codec:  # entry-point lookup costs ~5 ms; the Monte-Carlo loops call it often
    return _get_codec(name)


def randn(*shape: int, seed: int = 0, scale: float = 0.01) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def enc(codec: str, delta: torch.Tensor, name: str = "w", stats: dict | None = None, **params) -> Encoded:
    c = get_codec(codec)
    return c.encode(delta, c.parse_config(params), stats, name=name)


def dec(codec: str, e: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
    return get_codec(codec).decode(e, shape)


def h_b(x: float) -> float:
    return -x * math.log2(x) - (1 - x) * math.log2(1 - x)


# ----------------------------------------------------------------------------------------------- dare
@pytest.mark.parametrize("p", [0.5, 0.9])
def test_dare_unbiased_monte_carlo(p: float) -> None:
    """mean over S seeds → Δ with per-element std |Δ|·sqrt(p/((1−p)S)): check the z-scores, not a raw tolerance."""
    d, s = randn(40, 50, seed=1), 300
    mean = sum(dec("dare", enc("dare", d, p=p, seed=k, value_dtype="float32"), d.shape).double()
               for k in range(s)) / s
    std = d.double().abs() * math.sqrt(p / ((1 - p) * s))
    z = (mean - d.double()) / std
    n = d.numel()
    # Σz² ~ χ²(n) (CLT per element): mean 1, std sqrt(2/n); 5 sigma bound, and no single element past 6 sigma
    assert abs(float((z * z).mean()) - 1) < 5 * math.sqrt(2 / n)
    assert float(z.abs().max()) < 6


def test_dare_kept_values_exact_and_fraction_in_binomial_ci() -> None:
    d, p = randn(200, 100, seed=2), 0.8
    e = enc("dare", d, p=p, value_dtype="float32")
    out = dec("dare", e, d.shape)
    nz = out != 0
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(out[nz], d[nz] * scale)
    n, kept = d.numel(), int(nz.sum())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sd


def test_dare_p0_is_identity() -> None:
    d = randn(64, 33, seed=3)
    assert torch.equal(dec("dare", enc("dare", d, p=0.0, value_dtype="float32"), d.shape), d)
    assert torch.equal(dec("dare", enc("dare", d, p=0.0), d.shape), d.half().float())
    assert torch.equal(dec("dare", enc("dare", d, p=0.0, value_dtype="bfloat16"), d.shape), d.bfloat16().float())


@pytest.mark.parametrize("codec,params", [("dare", {"p": 0.999}), ("dare", {"p": 0.999, "value_dtype": "bfloat16"}),
                                          ("darex", {"p": 0.999, "q": 0.001})])
def test_high_drop_rate_is_finite(codec: str, params: dict) -> None:
    for shape, scale in (((512, 300), 10.0), ((3, 4), 1.0)):  # the small one keeps nothing
        d = randn(*shape, seed=4, scale=scale)
        e = enc(codec, d, **params)
        out = dec(codec, e, shape)
        assert torch.isfinite(out).all()
        assert torch.isfinite(to_dense(get_codec(codec).to_resident(e, shape))).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_dare_payload_size_formula(p: float) -> None:
    """positions within 3% of n·H_b(1−p) bits; 16 bits per kept value; one fp32 scale."""
    n = 1 << 20
    e = enc("dare", randn(n, seed=5), p=p)
    pos_bits = 8 * (e.tensors["q"].numel() + e.tensors["r"].numel())
    assert abs(pos_bits / (n * h_b(1 - p)) - 1) < 0.03
    kept = e.tensors["values"].numel()
    assert e.tensors["values"].dtype == torch.float16 and e.tensors["values"].nbytes == 2 * kept
    assert e.tensors["scale"].dtype == torch.float32 and e.tensors["scale"].numel() == 1


def test_dare_mask_keyed_by_seed_and_name_not_global_rng() -> None:
    d = randn(100, 100)
    torch.manual_seed(123)
    np.random.seed(5)
    a = enc("dare", d, name="a.weight", p=0.5)
    torch.manual_seed(999)
    np.random.seed(7)
    assert torch.equal(enc("dare", d, name="a.weight", p=0.5).tensors["q"], a.tensors["q"])
    assert not torch.equal(enc("dare", d, name="b.weight", p=0.5).tensors["values"], a.tensors["values"])
    assert not torch.equal(enc("dare", d, name="a.weight", p=0.5, seed=1).tensors["values"], a.tensors["values"])
    # the generator is pinned: Philox raw words, integer comparison (a change here breaks old seeds)
    assert keep_mask(0, "x", 16, 0.5).tolist() == keep_mask(0, "x", 16, 0.5).tolist()
    assert keep_mask(0, "x", 1000, 0.0).all()


@pytest.mark.parametrize("bad", [{"q": torch.zeros(3, dtype=torch.uint8)}, {"values": torch.zeros(3)},
                                 {"scale": torch.tensor([float("inf")])}, {"scale": torch.ones(2)}])
def test_dare_hostile_payload_raises_value_error(bad: dict) -> None:
    e = enc("dare", randn(30, 20), p=0.5)
    with pytest.raises(ValueError):
        dec("dare", Encoded({**e.tensors, **bad}, e.meta), (30, 20))
    with pytest.raises(ValueError):
        dec("dare", Encoded(e.tensors, {**e.meta, "coded": "both"}), (30, 20))
    with pytest.raises(ValueError):
        dec("dare", e, (30, 21))


# ---------------------------------------------------------------------------------------------- darex
@pytest.mark.parametrize("p", [0.1, 0.9, 0.99])
def test_darex_at_q_one_minus_p_is_dare_bit_for_bit(p: float) -> None:
    d = randn(70, 90, seed=6)
    a, b = enc("dare", d, p=p, seed=11), enc("darex", d, p=p, q=1 - p, seed=11)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert torch.equal(dec("dare", a, d.shape), dec("darex", b, d.shape))


def test_darex_q1_is_drop_only_and_retune_rewrites_only_the_scale() -> None:
    d, p = randn(50, 40, seed=7), 0.7
    e = enc("darex", d, p=p, q=1.0, value_dtype="float32")
    keep = keep_mask(0, "w", d.numel(), p).reshape(d.shape)
    assert torch.equal(dec("darex", e, d.shape), torch.where(keep, d, 0.0))
    r = retune(e, 0.5)
    assert torch.equal(r.tensors["values"], e.tensors["values"]) and r.meta["q"] == "0.5"
    assert torch.equal(dec("darex", r, d.shape), dec("darex", enc("darex", d, p=p, q=0.5, value_dtype="float32"),
                                                       d.shape))
    with pytest.raises(ValueError):
        retune(e, 0.1)


def test_darex_config_validates_q_range() -> None:
    c = get_codec("darex")
    with pytest.raises(CodecConfigError, match="q"):
        c.parse_config({"p": 0.9, "q": 0.05})
    with pytest.raises(CodecConfigError):
        c.parse_config(["q=1.5"])
    assert c.parse_config(["p=0.9", "q=0.3"]).q == 0.3


def test_darex_auto_needs_calibration() -> None:
    c = get_codec("darex")
    cfg = c.parse_config({"p": 0.9})
    with pytest.raises(CodecConfigError, match="--calibration"):
        c.fit(Source({"l.weight": randn(8, 8)}), cfg, calibration=None)
    with pytest.raises(CodecConfigError, match="give q"):
        c.encode(randn(8, 8), cfg, None, name="l.weight")
    with pytest.raises(CodecConfigError, match="match none"):
        c.fit(Source({"other.weight": randn(8, 8)}), cfg, calibration=Calibration({"l": randn(20, 8)}))


def _output_change(codec: str, deltas: dict[str, torch.Tensor], xs: dict[str, torch.Tensor], stats, **params) -> float:
    total = 0.0
    for name, d in deltas.items():
        err = dec(codec, enc(codec, d, name=name, stats=stats, **params), d.shape).double() - d.double()
        total += float((xs[name[:-7]].double() @ err.T).pow(2).sum())
    return total


def test_darex_auto_q_minimises_the_output_change_over_a_grid() -> None:
    p = 0.95
    deltas = {"a.weight": randn(48, 32, seed=8), "b.weight": randn(16, 48, seed=9)}
    xs = {"a": randn(64, 32, seed=10, scale=1.0), "b": randn(20, 48, seed=11, scale=1.0)}  # Gram and rows paths
    c = get_codec("darex")
    cfg = c.parse_config({"p": p})
    stats = c.fit(Source(deltas), cfg, calibration=Calibration(xs))
    q = stats["q"]
    assert 1 - p <= q <= 1 and stats["layers"] == 2
    assert stats["objective"] <= min(stats["objective_dare"], stats["objective_droponly"])
    best = _output_change("darex", deltas, xs, stats, p=p)
    for g in np.linspace(1 - p, 1, 41):
        assert best <= _output_change("darex", deltas, xs, None, p=p, q=float(g)) * (1 + 1e-6)
    assert enc("darex", deltas["a.weight"], name="a.weight", stats=stats, p=p).meta["q"] == repr(q)


# ------------------------------------------------------------------------------------------- bitdelta
@pytest.mark.parametrize("shape", [(64, 48), (33, 17), (5, 3, 7), (1, 1), (300,)])
def test_bitdelta_payload_size(shape: tuple[int, ...]) -> None:
    e = enc("bitdelta", randn(*shape))
    n = math.prod(shape)
    assert e.tensors["signs"].nbytes == -(-n // 8) and e.tensors["scale"].nbytes == 4
    assert e.nbytes() == -(-n // 8) + 4


def test_bitdelta_residual_identity_and_optimal_scale() -> None:
    d = randn(96, 80, seed=12).double()
    d[0, :5] = 0.0  # zeros map to +
    n = d.numel()
    s = float(d.abs().mean())
    sign = torch.where(d >= 0, 1.0, -1.0).double()
    resid = lambda t: float((d - t * sign).pow(2).sum())  # noqa: E731
    assert resid(s) == pytest.approx(float(d.pow(2).sum()) - n * s * s, rel=1e-12)
    assert resid(s) < min(resid(s * 1.001), resid(s * 0.999))
    e = enc("bitdelta", d.float())
    out = dec("bitdelta", e, tuple(d.shape))
    stored = torch.tensor(s, dtype=torch.float32)
    assert float(e.tensors["scale"]) == float(stored)
    assert set(out.unique().tolist()) == {float(stored), -float(stored)}
    assert (out[0, :5] > 0).all()


def test_bitdelta_scope_and_distill_needs_calibration() -> None:
    c = get_codec("bitdelta")
    cfg = c.parse_config({})
    assert c.accepts("layer.weight", (4, 4), cfg) and not c.accepts("norm.weight", (4,), cfg)
    assert not c.accepts("model.embed_tokens.weight", (100, 4), cfg)
    assert c.accepts("model.embed_tokens.weight", (100, 4), c.parse_config({"include_embeddings": True}))
    with pytest.raises(CodecConfigError, match="--calibration"):
        c.fit(Source({"l.weight": randn(4, 4)}), c.parse_config({"distill": True}), calibration=None)


def test_bitdelta_distilled_scale_is_the_least_squares_one() -> None:
    deltas = {"a.weight": randn(40, 24, seed=13), "b.weight": randn(8, 40, seed=14)}
    xs = {"a": randn(100, 24, seed=15, scale=1.0) + 0.5, "b": randn(12, 40, seed=16, scale=1.0)}
    c = get_codec("bitdelta")
    stats = c.fit(Source(deltas), c.parse_config({"distill": True}), calibration=Calibration(xs))
    assert stats["layers"] == 2 and stats["output_error_distilled"] <= stats["output_error_mean_abs"]
    for name, d in deltas.items():
        x = xs[name[:-7]].double()
        b = torch.where(d >= 0, 1.0, -1.0).double()
        xb, xd = x @ b.T, x @ d.double().T
        assert stats["scales"][name] == pytest.approx(float((xd * xb).sum() / (xb * xb).sum()), rel=1e-9)
        e = enc("bitdelta", d, name=name, stats=stats, distill=True)
        assert e.meta["scale_source"] == "distilled"
        assert float(e.tensors["scale"]) == pytest.approx(stats["scales"][name], rel=1e-7)
    assert _output_change("bitdelta", deltas, xs, stats) <= _output_change("bitdelta", deltas, xs, None)


# --------------------------------------------------------------------------------------------- binary
def _fixed_point(bits: int, kind: str) -> torch.Tensor:
    nd = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    lv = nd.icdf((torch.arange(2**bits, dtype=torch.float64) + 0.5) / 2**bits)
    for _ in range(500 if kind == "paper" else 3000):  # the paper runs 500 iterations; Lloyd-Max converges slower
        t = torch.cat([torch.tensor([-math.inf]), (lv[1:] + lv[:-1]) / 2, torch.tensor([math.inf])]).double()
        cdf = torch.special.ndtr(t)
        if kind == "paper":  # level = Φ⁻¹ of the cell's probability midpoint (the cell median)
            lv = torch.special.ndtri((cdf[1:] + cdf[:-1]) / 2)
        else:  # level = the cell centroid E[z | cell]
            pdf = torch.exp(-0.5 * t.clamp(-40, 40) ** 2) / math.sqrt(2 * math.pi)
            lv = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])
    return lv


@pytest.mark.parametrize("kind", ["paper", "lloyd_max"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_binary_codebook_tables_are_the_fixed_points(bits: int, kind: str) -> None:
    assert torch.allclose(codebook(bits, kind), _fixed_point(bits, kind), rtol=0, atol=1e-8)
    assert len(LEVELS[kind][bits]) == 2 ** (bits - 1)


def test_binary_one_bit_levels_are_mu_plus_minus_0_6745_sigma() -> None:
    d = randn(64, 50, seed=17) + 0.003
    e = enc("binary", d)
    mu, sigma = e.tensors["mu"], e.tensors["sigma"]
    assert float(mu) == float(torch.tensor(float(d.double().mean()), dtype=torch.float32))
    assert float(sigma) == float(torch.tensor(float(d.double().std()), dtype=torch.float32))
    level = float(torch.special.ndtri(torch.tensor(0.75, dtype=torch.float64)))
    assert abs(LEVELS["paper"][1][0] - level) < 1e-9 and round(level, 4) == 0.6745
    step = torch.tensor(LEVELS["paper"][1][0], dtype=torch.float32) * sigma
    out = dec("binary", e, tuple(d.shape))
    assert set(out.unique().tolist()) == {float(mu - step), float(mu + step)}
    centred = d.double() - float(mu)
    assert torch.equal(out > mu, centred > 0)  # sign(Ŵ−μ) = sign(W−μ), with sign(0) = −1


def test_binary_tie_takes_the_lower_code() -> None:
    d = torch.tensor([[-1.0, 0.0, 1.0, 0.0]])  # μ = 0 exactly
    assert dec("binary", enc("binary", d), (1, 4))[0, 1] < 0


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(64, 48), (33, 17), (7,)])
def test_binary_payload_size_and_distinct_levels(bits: int, shape: tuple[int, ...]) -> None:
    d = randn(*shape, seed=18)
    e = enc("binary", d, bits=bits)
    n = math.prod(shape)
    assert e.nbytes() == -(-n * bits // 8) + 8
    assert dec("binary", e, shape).unique().numel() <= 2**bits


def test_binary_gaussian_error_constants() -> None:
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(19))
    zhat = dec("binary", enc("binary", z), (z.numel(),))
    assert float((z - zhat).abs().mean()) == pytest.approx(0.473, abs=0.004)  # L1-optimal levels
    assert float((z - zhat).pow(2).mean()) == pytest.approx(0.3786, abs=0.004)
    zl = dec("binary", enc("binary", z, levels="lloyd_max"), (z.numel(),))
    assert float((z - zl).pow(2).mean()) == pytest.approx(0.3634, abs=0.004)


def test_code_packing_is_the_papers_layout() -> None:
    codes = torch.tensor([1, 2, 3, 0, 2], dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    assert packed.tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 2]  # element i at bit (i mod 4)·2, low bits first
    assert unpack_codes(packed, 5, 2).tolist() == codes.tolist()
    c3 = torch.randint(0, 8, (101,), generator=torch.Generator().manual_seed(20))
    assert torch.equal(unpack_codes(pack_codes(c3, 3), 101, 3), c3)
    with pytest.raises(ValueError, match="padding"):
        unpack_codes(torch.tensor([1, 2 | 1 << 5], dtype=torch.uint8), 5, 2)


# ------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("codec", ["dare", "darex", "bitdelta", "binary"])
def test_every_option_has_a_docstring(codec: str) -> None:
    fields = get_codec(codec).Config.model_fields
    assert fields and all(f.description for f in fields.values())
