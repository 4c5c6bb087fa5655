"""``binary``: the b-bit Gaussian codebook quantizer of the 1-bit adapters paper.

Jie, Wang, Deng. *Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision
Redundancy* (ICCV 2023), https://arxiv.org/abs/2307.16867; code JieShibo/PETL-ViT/binary_adapter, utils.py
``QLinear`` (research/codecs.md §3). Usable on full-fine-tune deltas and on adapter tensors alike.

Math. Per matrix (per tensor, not per row): μ = mean(W), σ = std(W) (unbiased; fp64), both stored fp32.
Entry w gets the code of the nearest level ℓ_c of a codebook for N(0,1), i.e. w − μ is compared with the
thresholds σ·t_c (midpoints of adjacent levels); an entry exactly on a threshold takes the LOWER code, so
w = μ maps to −ℓ at b = 1 (sign(0) = −1, as the authors' export). Decode: Ŵ = μ + σ·ℓ[code], in fp32
(the lookup table fp32(σ·ℓ_c) first, then + μ). ``levels=paper`` (default) is the authors' codebook: 500
fixed-point iterations of a Lloyd quantizer for the ABSOLUTE error (thresholds = midpoints, each level = Φ⁻¹
of its cell's probability midpoint, i.e. the cell median). ``levels=lloyd_max`` is the L2-optimal
(Lloyd-Max, cell centroid) codebook. Positive halves (the codebooks are symmetric), converged fixed points
computed in fp64 with scipy.stats.norm, reproduced in tests/test_codecs_seed.py:

    b  paper (L1, cell medians)                   lloyd_max (L2, Max 1960)
    1  0.67449 (= Φ⁻¹(0.75))                      0.79788 (= sqrt(2/π))
    2  0.37775 1.26572                            0.45278 1.51042
    3  0.20262 0.62542 1.11373 1.79203            0.24509 0.75601 1.34391 2.15195
    4  0.10555 0.31904 0.54007 0.77519            0.12840 0.38805 0.65676 0.94234
       1.03401 1.33311 1.70774 2.26549            1.25623 1.61805 2.06902 2.73259

Deviation, labelled: the authors normalise z = (w − μ)/(σ + 1e-5); we compare w − μ with σ·t (no eps), so
codes do not depend on the delta's absolute scale (their eps only guards σ = 0; then Ŵ = μ everywhere).

Storage: ``codes`` packed LSB-first, b bits per entry, entry i in bits [i·b, (i+1)·b) of the stream (for b =
1, 2, 4 this is the authors' layout: element i at bit (i mod 8/b)·b of its byte), zero padding; ``mu`` and
``sigma`` fp32: ceil(n·b/8) + 8 bytes, b + 64/n bits per parameter. Meta ``bits``, ``levels``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from deltahub.codecs import Codec, CodecConfig, Encoded
from deltahub.kernels.layouts import Codes
from deltahub.kernels.pack import codes_layout, sign_plane

LEVELS: dict[str, dict[int, tuple[float, ...]]] = {  # positive halves, ascending
    "paper": {
        1: (0.6744897502,),
        2: (0.3777541611, 1.265720325),
        3: (0.2026238031, 0.6254197261, 1.1137289379, 1.7920250351),
        4: (0.1055502854, 0.3190360084, 0.5400720769, 0.7751920715, 1.0340063047, 1.3331067076, 1.7077375932,
            2.2654906381),
    },
    "lloyd_max": {
        1: (0.7978845608,),
        2: (0.4527800346, 1.5104176085),
        3: (0.2450941789, 0.7560052812, 1.3439092785, 2.1519457045),
        4: (0.1283950299, 0.3880482995, 0.6567591185, 0.9423404565, 1.2562311973, 1.618046386, 2.0690172265,
            2.732589571),
    },
}


def codebook(bits: int, levels: str = "paper") -> torch.Tensor:
    """All 2^bits levels for N(0,1), ascending, fp64 (code c decodes to level c)."""
    half = torch.tensor(LEVELS[levels][bits], dtype=torch.float64)
    return torch.cat([-half.flip(0), half])


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs b-bit codes (uint8, < 2^bits) LSB-first into ceil(n·b/8) bytes, zero padding."""
    c = codes.reshape(-1).to(torch.uint8).numpy()
    planes = (c[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, count: int, bits: int, what: str = "codes") -> torch.Tensor:
    """Inverse of :func:`pack_codes` (int64 codes); ValueError on a wrong length or nonzero padding."""
    nbits = count * bits
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"{what} must be a 1-D uint8 tensor")
    if packed.numel() != -(-nbits // 8):
        raise ValueError(f"{what} hold {packed.numel()} bytes, expected {-(-nbits // 8)} for {count} entries")
    buf = packed.numpy()
    if nbits % 8 and buf[-1] >> (nbits % 8):
        raise ValueError(f"{what} have nonzero padding bits")
    flat = np.unpackbits(buf, count=nbits, bitorder="little").reshape(count, bits)
    codes = flat[:, 0].astype(np.int64)
    for j in range(1, bits):  # b column passes beat a (count, b) int64 shift-and-sum
        codes |= flat[:, j].astype(np.int64) << j
    return torch.from_numpy(codes)



class BinaryConfig(CodecConfig):
    """Options of ``binary``."""

    bits: Literal[1, 2, 3, 4] = 1
    """Bits per entry b: 2^b Gaussian levels per matrix (b = 1: μ ± 0.6745σ)."""
    levels: Literal["paper", "lloyd_max"] = "paper"
    """Codebook: ``paper`` (the authors' L1-optimal cell medians) or ``lloyd_max`` (L2-optimal)."""


class BinaryCodec(Codec):
    name = "binary"
    version = 1
    pretty_name = "1-bit adapters (b-bit Gaussian codebook)"
    reference_url = "https://arxiv.org/abs/2307.16867"
    Config = BinaryConfig
    auto_grid = ({"bits": 1}, {"bits": 2}, {"bits": 3}, {"bits": 4})

    def encode(self, delta: torch.Tensor, config: BinaryConfig, stats: Mapping[str, Any] | None = None, *,
               name: str = "") -> Encoded:
        return self.encode_grid(delta, [config], name=name)[0]

    def encode_grid(self, delta: torch.Tensor, configs: list[CodecConfig], *, name: str = "") -> list[Encoded]:
        """μ, σ and w − μ (fp64) once for every bit width: they do not depend on b."""
        flat = delta.double().reshape(-1)
        n = flat.numel()
        mu = torch.tensor([float(flat.mean()) if n else 0.0], dtype=torch.float32)
        sigma = torch.tensor([float(flat.std()) if n > 1 else 0.0], dtype=torch.float32)
        centred = (flat - float(mu)).contiguous()
        out = []
        for config in configs:
            levels = codebook(config.bits, config.levels)
            thresholds = (levels[1:] + levels[:-1]) / 2 * float(sigma)
            # searchsorted(right=False): an entry equal to a threshold takes the lower code
            codes = torch.searchsorted(thresholds, centred, right=False)
            out.append(Encoded({"codes": pack_codes(codes, config.bits), "mu": mu.clone(), "sigma": sigma.clone()},
                               {"bits": str(config.bits), "levels": config.levels}))
        return out

    def _parts(self, enc: Encoded, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(codes int64, fp32 lookup table σ·ℓ, fp32 μ of one element, bits), validated."""
        bits_s, levels = enc.meta.get("bits", ""), enc.meta.get("levels", "")
        if bits_s not in ("1", "2", "3", "4") or levels not in LEVELS:
            raise ValueError(f"binary payload metadata bits={bits_s!r} levels={levels!r} is not valid")
        bits = int(bits_s)
        t = enc.tensors
        for key in ("mu", "sigma"):
            v = t.get(key)
            if not isinstance(v, torch.Tensor) or v.numel() != 1 or v.dtype != torch.float32 \
                    or not torch.isfinite(v).all():
                raise ValueError(f"binary payload needs one finite fp32 '{key}'")
        codes = unpack_codes(t.get("codes"), math.prod(shape), bits)
        lut = codebook(bits, levels).to(torch.float32) * t["sigma"].reshape(1)
        return codes, lut, t["mu"].reshape(1), bits

    def decode(self, enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        codes, lut, mu, _ = self._parts(enc, shape)
        return (lut[codes] + mu).reshape(shape)

    def to_resident(self, enc: Encoded, shape: tuple[int, ...], *, device: Any = "cpu") -> Codes:
        """``Codes`` with b planes and the 2^b-entry codebook fp32(σ·ℓ_c) + μ: b + 2^b·32/n bits per parameter."""
        codes, lut, mu, bits = self._parts(enc, shape)
        book = (lut + mu).reshape(1, 1 << bits)  # the decode's own two fp32 steps, once per level
        if bits == 1:
            return Codes(sign_plane(enc.tensors["codes"], codes, tuple(shape)), book, tuple(shape)).to(device)
        return codes_layout(codes, bits, book, tuple(shape)).to(device)
