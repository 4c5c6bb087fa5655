"""Resident delta layouts and the operations on them: apply, delta matmul, mixed-expert batches.

``import deltahub`` never imports triton; only the ``*_triton.py`` modules do, when a CUDA tensor (or the
interpreter, ``TRITON_INTERPRET=1``) asks for them. Plain-torch references live in ``reference.py``.
"""

from deltahub.kernels.apply import apply_
from deltahub.kernels.layouts import LAYOUTS, Codes, Dense, LowRank, Resident, SparseRows, TernaryMask, matrix_shape
from deltahub.kernels.matmul import delta_matmul, mixed_linear, mixed_matmul_
from deltahub.kernels.reference import to_dense

__all__ = ["LAYOUTS", "Codes", "Dense", "LowRank", "Resident", "SparseRows", "TernaryMask", "apply_", "delta_matmul", "matrix_shape", "mixed_linear", "mixed_matmul_",
           "to_dense"]
