"""Apply resident delta layouts to weights: plain-torch fast paths here, Triton kernels loaded lazily.

``import deltahub`` never imports triton; only the ``*_triton.py`` modules do, on a CUDA device or
under ``TRITON_INTERPRET=1``.
"""

from deltahub.kernels.apply import apply_
from deltahub.kernels.layouts import Dense, LowRank, Resident, SignBits, SparseCOO, TernaryPlanes

__all__ = ["Dense", "LowRank", "Resident", "SignBits", "SparseCOO", "TernaryPlanes", "apply_"]
