"""Tests for deltahub.entropy: Golomb-Rice position coder and sign packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.entropy import (
    MAX_K,
    decode_positions,
    encode_positions,
    entropy_bound,
    pack_signs,
    positions_bits,
    rice_cost_bits,
    unpack_signs,
)


def _random_positions(numel: int, density: float, seed: int) -> torch.Tensor:
    mask = np.random.default_rng(seed).random(numel) < density
    return torch.from_numpy(np.flatnonzero(mask).astype(np.int64))


def _roundtrip(positions: torch.Tensor, numel: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    streams, meta = encode_positions(positions, numel)
    assert set(streams) == {"q", "r"}
    assert all(s.dtype == torch.uint8 and s.dim() == 1 for s in streams.values())
    assert meta == {"k": meta["k"], "count": str(positions.numel()), "numel": str(numel)}
    assert all(isinstance(v, str) for v in meta.values())
    out = decode_positions(streams, meta, numel=numel, count=positions.numel())
    assert out.dtype == torch.int64
    assert torch.equal(out, positions.to(torch.int64))
    assert positions_bits(positions, numel) == 8 * sum(s.numel() for s in streams.values())
    return streams, meta


# --- pinned wire format -------------------------------------------------------------


def test_pinned_format_k0():
    # gaps 0, 4, 3 -> unary 0 | 11110 | 1110, LSB-first, padded with ones.
    streams, meta = _roundtrip(torch.tensor([0, 5, 9]), 10)
    assert meta["k"] == "0"
    assert streams["q"].tolist() == [0xDE, 0xFD]
    assert streams["r"].tolist() == []


def test_pinned_format_k3():
    # gaps 20, 20 -> k = 3 (ties with k = 4, smallest wins): q = 2 -> "110", r = 4 -> 0,0,1.
    streams, meta = _roundtrip(torch.tensor([20, 41]), 50)
    assert meta["k"] == "3"
    assert streams["q"].tolist() == [0xDB]
    assert streams["r"].tolist() == [0x24]


def test_pinned_signs():
    packed = pack_signs(torch.tensor([-1, 1, 1, -1, -1, 1, 1, 1, -1], dtype=torch.int8))
    assert packed.tolist() == [25, 1]
    assert unpack_signs(packed, 9).tolist() == [-1, 1, 1, -1, -1, 1, 1, 1, -1]


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000, 65_537])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_roundtrip_random(numel, density):
    _roundtrip(_random_positions(numel, density, seed=numel), numel)


@pytest.mark.parametrize(
    ("positions", "numel"),
    [
        ([], 0),
        ([], 1),
        ([], 1000),
        ([0], 1),
        ([0], 1000),
        ([999], 1000),
        ([0, 999], 1000),
        (list(range(1000)), 1000),
        ([0, 2**39, 2**40 - 1], 2**40),
        ([2**62 - 2], 2**62 - 1),
    ],
)
def test_roundtrip_edge_cases(positions, numel):
    _roundtrip(torch.tensor(positions, dtype=torch.int64), numel)


def test_accepts_other_integer_dtypes():
    for dtype in (torch.int32, torch.int16, torch.uint8):
        _roundtrip(torch.tensor([1, 2, 200], dtype=dtype), 256)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_roundtrip_property(data):
    numel = data.draw(st.one_of(st.integers(0, 3000), st.integers(0, 2**45)))
    if numel:
        idx = data.draw(st.sets(st.integers(0, numel - 1), max_size=300))
    else:
        idx = set()
    _roundtrip(torch.tensor(sorted(idx), dtype=torch.int64), numel)


def test_k_minimises_exact_size():
    rng = np.random.default_rng(0)
    for _ in range(20):
        gaps = rng.geometric(rng.uniform(0.001, 0.9), size=rng.integers(1, 500)) - 1
        costs = rice_cost_bits(gaps)
        for k in range(MAX_K + 1):
            unary = int((gaps >> k).sum()) + gaps.size
            assert costs[k] == 8 * (-(-unary // 8)) + 8 * (-(-gaps.size * k // 8))
        positions = torch.from_numpy(np.cumsum(gaps + 1) - 1)
        _, meta = encode_positions(positions, int(positions[-1]) + 1)
        assert int(meta["k"]) == int(np.argmin(costs))


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1000])
def test_signs_roundtrip(count):
    signs = torch.from_numpy(np.random.default_rng(count).choice([-1, 1], size=count).astype(np.int8))
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count // 8)
    assert torch.equal(unpack_signs(packed, count), signs)
    assert torch.equal(pack_signs(signs < 0), packed)  # bool input: True = negative
    assert torch.equal(pack_signs(signs.float() * 0.5), packed)


# --- size vs entropy bound -------------------------------------------------------------


def test_entropy_bound_values():
    assert entropy_bound(0.1) == pytest.approx(0.569, abs=5e-4)
    assert entropy_bound(0.5) == pytest.approx(1.5)
    assert entropy_bound(0.0) == 0.0 and entropy_bound(1.0) == 1.0
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        entropy_bound(1.5)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2])
def test_size_within_3pct_of_entropy_bound(density):
    numel = 1 << 20
    positions = _random_positions(numel, density, seed=42)
    count = positions.numel()
    streams, _ = encode_positions(positions, numel)
    signs = pack_signs(torch.ones(count, dtype=torch.int8))
    bits = 8 * (streams["q"].numel() + streams["r"].numel() + signs.numel())
    assert bits / numel <= 1.03 * entropy_bound(count / numel)
    assert bits / numel >= entropy_bound(count / numel) * 0.99  # sanity: not below the bound


# --- hostile input -----------------------------------------------------------------------


@pytest.fixture(name="enc")
def _enc():
    numel = 10_000
    positions = _random_positions(numel, 0.1, seed=7)
    streams, meta = encode_positions(positions, numel)
    assert int(meta["k"]) == 3 and positions.numel() * 3 % 8 != 0  # r has padding bits
    return streams, meta, numel, positions.numel()


def _with(streams, key, values):
    return {**streams, key: torch.tensor(values, dtype=torch.uint8)}


def test_hostile_truncated(enc):
    streams, meta, numel, count = enc
    q, r = streams["q"].tolist(), streams["r"].tolist()
    with pytest.raises(ValueError, match=rf"^q stream is truncated: \d+ terminators, expected {count}$"):
        decode_positions(_with(streams, "q", q[:-1]), meta, numel=numel, count=count)
    with pytest.raises(ValueError, match=rf"^r stream is truncated: {len(r) - 1} bytes, expected {len(r)}$"):
        decode_positions(_with(streams, "r", r[:-1]), meta, numel=numel, count=count)
    with pytest.raises(ValueError, match=rf"^q stream is truncated: 0 terminators, expected {count}$"):
        decode_positions(_with(streams, "q", []), meta, numel=numel, count=count)


def test_hostile_extra_bytes(enc):
    streams, meta, numel, count = enc
    q, r = streams["q"].tolist(), streams["r"].tolist()
    with pytest.raises(ValueError, match=r"^q stream is too long: \d+ bits after the last terminator$"):
        decode_positions(_with(streams, "q", q + [0xFF]), meta, numel=numel, count=count)
    with pytest.raises(ValueError, match=rf"^q stream is corrupt: {count + 8} terminators, expected {count}$"):
        decode_positions(_with(streams, "q", q + [0x00]), meta, numel=numel, count=count)
    with pytest.raises(ValueError, match=r"^q stream is too long: \d+ bytes, at most \d+ possible$"):
        decode_positions(_with(streams, "q", q + [0xFF] * 10_000), meta, numel=numel, count=count)
    with pytest.raises(ValueError, match=rf"^r stream is too long: {len(r) + 1} bytes, expected {len(r)}$"):
        decode_positions(_with(streams, "r", r + [0]), meta, numel=numel, count=count)
    empty = encode_positions(torch.zeros(0, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match=r"^q stream is too long: 1 bytes, expected 0$"):
        decode_positions(_with(empty[0], "q", [0xFF]), empty[1], numel=5, count=0)


def test_hostile_wrong_count(enc):
    streams, meta, numel, count = enc
    with pytest.raises(ValueError, match=rf"^metadata count='{count}' does not match manifest count={count + 1}$"):
        decode_positions(streams, meta, numel=numel, count=count + 1)
    with pytest.raises(ValueError, match=rf"^metadata numel='{numel}' does not match manifest numel={numel + 1}$"):
        decode_positions(streams, meta, numel=numel + 1, count=count)
    k_only = {"k": meta["k"]}
    with pytest.raises(ValueError, match=r"^r stream is truncated: "):
        decode_positions(streams, k_only, numel=numel, count=count + 8)
    with pytest.raises(ValueError, match=r"^r stream is too long: "):
        decode_positions(streams, k_only, numel=numel, count=count - 8)
    with pytest.raises(ValueError, match=r"^need 0 <= count <= numel < 2\*\*62, got count=11 numel=10$"):
        decode_positions(streams, k_only, numel=10, count=11)


def test_hostile_terminator_count_same_r_length():
    # count and count + 8 at k = 0 share the (empty) r stream, so the q stream decides.
    positions = _random_positions(64, 0.5, seed=1)
    streams, meta = encode_positions(positions, 64)
    assert meta["k"] == "0"
    with pytest.raises(ValueError, match=rf"^q stream is truncated: {positions.numel()} terminators, expected"):
        decode_positions(streams, {"k": "0"}, numel=64, count=positions.numel() + 1)


def test_hostile_flipped_bits_out_of_range():
    # One gap of 999 at k = 7: q = 7, r = 103 = 0b1100111; setting r bit 4 gives 1015.
    streams, meta = encode_positions(torch.tensor([999]), 1000)
    assert meta["k"] == "7" and streams["r"].tolist() == [103] and streams["q"].tolist() == [0x7F]
    with pytest.raises(ValueError, match=r"^decoded position 1015 is outside \[0, 1000\)$"):
        decode_positions(_with(streams, "r", [103 | 16]), meta, numel=1000, count=1)


def test_hostile_flipped_terminator_out_of_range():
    # Last position numel - 1; swapping the last terminator with the first pad bit adds
    # one to the last quotient, i.e. 2^k = 8 to the last position.
    numel = 10_000
    positions = torch.cat([_random_positions(numel - 1, 0.1, seed=3), torch.tensor([numel - 1])])
    streams, meta = encode_positions(positions, numel)
    assert meta["k"] == "3"
    bits = np.unpackbits(streams["q"].numpy(), bitorder="little")
    last = int(np.flatnonzero(bits == 0)[-1])
    assert last + 1 < bits.size  # at least one pad bit
    bits[last], bits[last + 1] = 1, 0
    q = np.packbits(bits, bitorder="little").tolist()
    with pytest.raises(ValueError, match=rf"^decoded position {numel + 7} is outside \[0, {numel}\)$"):
        decode_positions(_with(streams, "q", q), meta, numel=numel, count=positions.numel())


def test_hostile_flipped_bits_terminators_and_padding(enc):
    streams, meta, numel, count = enc
    q, r = streams["q"].tolist(), streams["r"].tolist()
    first_one = next(i for i in range(8 * len(q)) if q[i // 8] >> (i % 8) & 1)
    q_flip = list(q)
    q_flip[first_one // 8] ^= 1 << (first_one % 8)
    with pytest.raises(ValueError, match=rf"^q stream is corrupt: {count + 1} terminators, expected {count}$"):
        decode_positions(_with(streams, "q", q_flip), meta, numel=numel, count=count)
    with pytest.raises(ValueError, match=r"^r stream has nonzero padding bits$"):
        decode_positions(_with(streams, "r", r[:-1] + [r[-1] | 0x80]), meta, numel=numel, count=count)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({}, r"^metadata k='' is not an integer in \[0, 40\]$"),
        ({"k": "41"}, r"^metadata k='41' is not an integer in \[0, 40\]$"),
        ({"k": "-1"}, r"^metadata k='-1' is not an integer in \[0, 40\]$"),
        ({"k": "3.0"}, r"^metadata k='3.0' is not an integer in \[0, 40\]$"),
        ({"k": "\u0663"}, r"^metadata k='\u0663' is not an integer in \[0, 40\]$"),
    ],
)
def test_hostile_meta(enc, meta, message):
    streams, _, numel, count = enc
    with pytest.raises(ValueError, match=message):
        decode_positions(streams, meta, numel=numel, count=count)


def test_hostile_stream_types(enc):
    streams, meta, numel, count = enc
    for bad in ({"q": streams["q"]}, {**streams, "r": streams["r"].to(torch.int16)}, {**streams, "q": None}):
        with pytest.raises(ValueError, match=r"^stream '[qr]' must be a 1-D uint8 tensor$"):
            decode_positions(bad, meta, numel=numel, count=count)


def test_encode_rejects_invalid_positions():
    message = r"^positions must be strictly increasing and in \[0, 10\)$"
    for bad in ([3, 3], [5, 2], [-1, 2], [10], [0, 11]):
        with pytest.raises(ValueError, match=message):
            encode_positions(torch.tensor(bad), 10)
    with pytest.raises(ValueError, match=r"^positions must be a 1-D integer tensor$"):
        encode_positions(torch.tensor([1.0]), 10)
    with pytest.raises(ValueError, match=r"^positions must be a 1-D integer tensor$"):
        encode_positions(torch.tensor([[1]]), 10)
    with pytest.raises(ValueError, match=r"^numel must be in \[0, 2\*\*62\)"):
        encode_positions(torch.tensor([1]), 2**62)


def test_unpack_signs_rejects_bad_input():
    packed = pack_signs(torch.tensor([1, -1, 1], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"^signs stream is truncated: 1 bytes, expected 2$"):
        unpack_signs(packed, 9)
    with pytest.raises(ValueError, match=r"^signs stream is too long: 1 bytes, expected 0$"):
        unpack_signs(packed, 0)
    with pytest.raises(ValueError, match=r"^signs stream has nonzero padding bits$"):
        unpack_signs(torch.tensor([0x0A], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"^stream 'signs' must be a 1-D uint8 tensor$"):
        unpack_signs(packed.to(torch.int8), 3)
    with pytest.raises(ValueError, match=r"^signs must be a 1-D tensor$"):
        pack_signs(torch.ones(2, 2))
