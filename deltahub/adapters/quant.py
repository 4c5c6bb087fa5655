"""Quantization-aware training of adapters that are meant to be stored at b bits (1-bit adapters).

Jie, Wang, Deng. *Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision Redundancy*
(ICCV 2023), https://arxiv.org/abs/2307.16867 (research/codecs.md §3). With ``bits=b`` in an adapter's
``inject`` config, every adapter matrix W is used in the forward pass as Q(W) = the ``binary`` codec's own
decode of its encode (per matrix μ, σ; the paper's L1 codebook, μ ± 0.6745σ at b = 1), and the gradient
passes straight through to W (straight-through estimator: ∂Q(W)/∂W := I). Storing the trained adapter with
``codec="binary", bits=b`` then reproduces exactly the forward that was trained, where quantizing a
full-precision adapter after training (post-training quantization) changes it.

Deviation, labelled: the paper lets gradients reach μ and σ too; here they reach W only (identity STE).
"""

from __future__ import annotations

import torch

from deltahub.codecs import get_codec


def quantized(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(w) in the forward pass, the identity in the backward pass."""
    codec = get_codec("binary")
    config = codec.parse_config({"bits": bits})
    with torch.no_grad():
        q = codec.decode(codec.encode(w.detach().float(), config, name=""), tuple(w.shape)).to(w.dtype)
    return w + (q - w).detach()


def check_bits(bits: object) -> int | None:
    """The ``bits`` option of an inject config: None (full precision) or 1–4.

    Raises:
        CodecConfigError: any other value.
    """
    from deltahub.errors import CodecConfigError

    if bits is None:
        return None
    if bits not in (1, 2, 3, 4):
        raise CodecConfigError(f"bits must be 1, 2, 3 or 4 (quantization-aware training), got {bits!r}.")
    return int(bits)
