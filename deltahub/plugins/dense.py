"""``dense``: the lossless baseline every other codec is compared with.

The delta is stored as it is, in the narrowest float type that reproduces it exactly (fp32 when
``fp32(Δ) == Δ``, else fp64), then zstd-compressed by the artifact writer where that pays. Applying a
``dense`` artifact therefore reproduces the fine-tuned weights byte for byte: for fp32 weights the
difference θ_ft − θ_base is exact in fp64 (Sterbenz; a gap of more than 29 binary orders of magnitude
is needed to lose a bit, and the extractor stores such tensors whole), and θ_base + Δ rounds back to
θ_ft. ``dtype=float16|bfloat16|float32`` trades exactness for size (a plain cast).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

from deltahub.codecs import Codec, CodecConfig, Encoded
from deltahub.kernels.layouts import Dense


class DenseConfig(CodecConfig):
    """Options of ``dense``."""

    dtype: Literal["exact", "float32", "float16", "bfloat16"] = "exact"
    """Storage type of Δ: ``exact`` (lossless, fp32 or fp64 per tensor) or a lossy cast."""


class DenseCodec(Codec):
    name = "dense"
    version = 1
    pretty_name = "Dense (lossless)"
    reference_url = None
    lossless = True
    Config = DenseConfig
    auto_grid = ({"dtype": "float16"}, {"dtype": "bfloat16"}, {})

    def accepts(self, name: str, shape: tuple[int, ...], config: CodecConfig) -> bool:
        return True

    def encode(self, delta: torch.Tensor, config: DenseConfig, stats: Mapping[str, Any] | None = None, *,
               name: str = "") -> Encoded:
        if config.dtype == "exact":
            if delta.dtype == torch.float64 and not torch.equal(delta.float().double(), delta):
                values = delta
            elif not delta.is_floating_point() or delta.dtype in (torch.float16, torch.bfloat16):
                values = delta  # whole tensors stored by `replace`: keep their own dtype, bit for bit
            else:
                values = delta.float()
        else:
            values = delta.to(getattr(torch, config.dtype))
        return Encoded({"values": values.contiguous().reshape(-1)}, {})

    def decode(self, enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        values = enc.tensors["values"]
        n = math.prod(shape)
        if values.dim() != 1 or values.numel() != n:
            raise ValueError(f"dense payload holds {values.numel()} values, expected {n} for shape {list(shape)}")
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        return values.reshape(shape)

    def to_resident(self, enc: Encoded, shape: tuple[int, ...], *, device: Any = "cpu") -> Dense:
        return Dense(self.decode(enc, shape).to(device))
