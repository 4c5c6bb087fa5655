"""``dare``: drop and rescale.

Yu, Yu, Yu, Huang, Li. *Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch* (ICML 2024), https://arxiv.org/abs/2311.03099 (research/codecs.md §2a).

Math. Per tensor and elementwise, drop each entry with probability p and rescale the survivors:
Δ̂ = Δ ⊙ m / (1−p) with m_i ~ Bernoulli(1−p) the keep indicator, so E[Δ̂] = Δ and
Var[Δ̂_i] = Δ_i²·p/(1−p). p = 0 is the identity (up to ``value_dtype`` rounding); the kept count is
Binomial(n, 1−p), not exact.

Mask (portable, recorded). m is drawn at encode time from numpy's Philox4x64-10 bit generator keyed by the
first 128 bits of sha256("deltahub.dare\\0{seed}\\0{tensor name}") (little-endian), counter 0; entry i is
kept iff raw_i ≥ ⌊p·2⁶⁴⌋, with raw_i the i-th 64-bit word of ``Philox.random_raw``. Only the bit
generator's raw stream is used (NEP 19 keeps bit-generator streams stable across numpy versions and
platforms; ``Generator`` methods carry no such promise), the comparison is an exact integer one, and nothing
depends on torch's RNG, the thread count or the order tensors are encoded in. The mask is nevertheless
stored (positions), so decoding never regenerates it.

Storage. Positions of the kept entries, or of the dropped ones when those are fewer (meta ``coded``), as
Golomb-Rice gaps (:mod:`deltahub.entropy`): ≈ H_b(1−p) bits per parameter. Kept values UNSCALED in
``value_dtype`` (16 bits each by default), and the scale 1/(1−p) as its own fp32 tensor ``scale``;
decode computes values·scale in fp32. ``darex`` writes the same payload with scale 1/q, so darex at
q = 1−p is this codec bit for bit. bpp ≈ H_b(1−p) + 16(1−p): 2.07 at p = 0.9, 0.24 at p = 0.99.
Payload keys: ``q``, ``r`` (position streams), ``values``, ``scale``; meta ``k``, ``count``, ``numel``,
``coded`` (kept|dropped), ``p``, ``seed``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from deltahub.codecs import Codec, CodecConfig, Encoded
from deltahub.entropy import decode_positions, encode_positions
from deltahub.kernels.layouts import SparseRows
from deltahub.kernels.pack import sparse_rows

_CHUNK = 1 << 22  # raw words drawn per step (32 MB): bounds memory; the stream is the same in one piece
_CACHED_WORDS = 1 << 24  # tensors up to 16 M entries keep their stream (128 MB) for the next setting
_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class DareConfig(CodecConfig):
    """Options of ``dare``."""

    p: float = Field(0.9, ge=0, lt=1)
    """Drop rate in [0, 1): each entry is dropped with probability p, survivors are scaled by 1/(1−p)."""
    seed: int = Field(0, ge=0)
    """Mask seed; with the tensor name it keys the portable Philox generator."""
    value_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage type of the kept (unscaled) values."""


def _generator(seed: int, name: str) -> np.random.Philox:
    digest = hashlib.sha256(f"deltahub.dare\0{seed}\0{name}".encode()).digest()
    return np.random.Philox(key=int.from_bytes(digest[:16], "little"))


@functools.lru_cache(maxsize=1)
def _raw_words(seed: int, name: str, numel: int) -> np.ndarray:
    """The whole raw stream of one tensor, kept for the next call: ``auto`` draws the mask of the same tensor
    for 8 settings of p (dare and darex), and the draw is most of DARE's encode time."""
    words = _generator(seed, name).random_raw(numel)
    words.flags.writeable = False
    return words


def keep_mask(seed: int, name: str, numel: int, p: float) -> torch.Tensor:
    """The DARE keep mask of tensor ``name``: bool (numel,), portable (see the module docstring)."""
    threshold = np.uint64(int(float(p) * 2.0**64))  # exact: scaling by a power of two; p < 1
    out = np.empty(numel, dtype=np.bool_)
    if numel <= _CACHED_WORDS:
        np.greater_equal(_raw_words(seed, name, numel), threshold, out=out)
        return torch.from_numpy(out)
    bg = _generator(seed, name)
    for start in range(0, numel, _CHUNK):
        stop = min(numel, start + _CHUNK)
        np.greater_equal(bg.random_raw(stop - start), threshold, out=out[start:stop])
    return torch.from_numpy(out)



class DareCodec(Codec):
    name = "dare"
    version = 1
    pretty_name = "DARE (drop and rescale)"
    reference_url = "https://arxiv.org/abs/2311.03099"
    Config = DareConfig
    auto_grid = tuple({"p": p} for p in (0.8, 0.9, 0.95, 0.98, 0.99, 0.995))  # p < 0.8 costs > 3.5 bits/param

    def expected_gain(self, enc: Encoded) -> float | None:
        """E[Δ̂] = (1−p)·scale·Δ: 1 for DARE (unbiased), (1−p)/q for DAREx."""
        try:
            return (1.0 - float(enc.meta["p"])) * float(enc.tensors["scale"].reshape(-1)[0])
        except (KeyError, ValueError, IndexError):
            return None

    def _keep_rate(self, config: Any, stats: Mapping[str, Any] | None) -> float:
        """The q of the rescale 1/q: 1 − p for DARE."""
        return 1.0 - config.p

    def _meta(self, config: Any, q: float) -> dict[str, str]:
        return {"p": repr(config.p), "seed": str(config.seed)}

    def encode(self, delta: torch.Tensor, config: DareConfig, stats: Mapping[str, Any] | None = None, *,
               name: str = "") -> Encoded:
        q = self._keep_rate(config, stats)
        flat = delta.float().reshape(-1)
        keep = keep_mask(config.seed, name, flat.numel(), config.p)
        n_keep = int(keep.sum())
        coded = "kept" if 2 * n_keep <= flat.numel() else "dropped"  # code the smaller set: ≈ H_b bits
        positions = torch.nonzero(keep if coded == "kept" else ~keep).reshape(-1)
        streams, meta = encode_positions(positions, flat.numel())
        values = flat[keep].to(_VALUE_DTYPES[config.value_dtype])
        scale = torch.tensor([1.0 / q], dtype=torch.float32)  # 1/q in fp64, rounded once to fp32
        return Encoded({**streams, "values": values, "scale": scale},
                       {**meta, "coded": coded, **self._meta(config, q)})

    def _parts(self, enc: Encoded, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept flat indices int64, stored values, fp32 scale of one element), validated."""
        numel = math.prod(shape)
        try:
            count, coded = int(enc.meta["count"]), enc.meta["coded"]
        except (KeyError, ValueError):
            raise ValueError(f"{self.name} payload has no valid 'count'/'coded' metadata") from None
        if coded not in ("kept", "dropped"):
            raise ValueError(f"{self.name} payload metadata coded={coded!r} is not 'kept' or 'dropped'")
        t = enc.tensors
        missing = {"q", "r", "values", "scale"} - set(t)
        if missing:
            raise ValueError(f"{self.name} payload lacks tensors {sorted(missing)}")
        pos = decode_positions({"q": t["q"], "r": t["r"]}, dict(enc.meta), numel=numel, count=count)
        if coded == "dropped":
            keep = np.ones(numel, dtype=np.bool_)
            keep[pos.numpy()] = False
            pos = torch.from_numpy(np.flatnonzero(keep).astype(np.int64))
        values, scale = t["values"], t["scale"]
        if values.dim() != 1 or values.dtype not in _VALUE_DTYPES.values() or values.numel() != pos.numel():
            raise ValueError(f"{self.name} payload holds {values.numel()} {values.dtype} values, expected "
                             f"{pos.numel()} of float16/bfloat16/float32")
        if scale.numel() != 1 or scale.dtype != torch.float32 or not torch.isfinite(scale).all():
            raise ValueError(f"{self.name} payload needs one finite fp32 scale")
        return pos, values, scale.reshape(1)

    def sparse(self, enc: Encoded, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept positions, rescaled values v/(1 − p)) without the dense tensor."""
        pos, values, scale = self._parts(enc, shape)
        return pos, values.float() * scale

    def decode(self, enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        pos, values = self.sparse(enc, shape)
        out = torch.zeros(math.prod(shape), dtype=torch.float32)
        out[pos] = values
        return out.reshape(shape)

    def to_resident(self, enc: Encoded, shape: tuple[int, ...], *, device: Any = "cpu") -> SparseRows:
        """CSR: int32 row pointers, uint16 columns, the stored values at their own dtype (16 + 16 bits each)."""
        pos, values, scale = self._parts(enc, shape)
        return sparse_rows(pos, values, float(scale), tuple(shape)).to(device)
