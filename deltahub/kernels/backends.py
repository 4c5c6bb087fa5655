"""Which implementation runs an operation: ``triton`` (CUDA tensors), ``compiled`` (CPU), or ``torch``.

``backend=None`` reads ``DELTAHUB_KERNEL_BACKEND`` (default ``auto``): Triton for CUDA tensors when it is
installed, the compiled C kernels on CPU when a compiler is present, else the torch paths, which run on
any device. An explicit backend that cannot run here is a :class:`KernelError`, never a silent fallback;
``auto`` falls back and logs why once. ``triton`` on CPU tensors runs the Triton interpreter (tests:
``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from deltahub.constants import ENV_KERNEL_BACKEND
from deltahub.errors import KernelError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "compiled", "triton")
_warned: set[str] = set()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested(backend: str | None) -> str:
    want = backend or os.environ.get(ENV_KERNEL_BACKEND) or "auto"
    if want not in BACKENDS:
        raise KernelError(f"Unknown kernel backend {want!r}; use one of {', '.join(BACKENDS)} "
                          f"(argument backend= or {ENV_KERNEL_BACKEND}).")
    return want


def select(device: torch.device, backend: str | None = None) -> str:
    """The backend that runs on ``device`` for this request.

    Raises:
        KernelError: an explicit backend that cannot run on ``device`` here.
    """
    want = requested(backend)
    if want == "torch":
        return "torch"
    if want == "triton":
        if not triton_installed():
            raise KernelError("The triton backend needs triton: pip install 'deltahub[triton]' (Linux).")
        if device.type != "cuda" and not interpreting():
            raise KernelError("Triton kernels run on CUDA tensors, or on CPU with TRITON_INTERPRET=1 set before "
                              "triton is imported.")
        return "triton"
    if want == "compiled":
        if device.type != "cpu":
            raise KernelError(f"The compiled backend runs on CPU tensors, not {device.type}; use auto or triton.")
        from deltahub.kernels import native

        if native.library() is None:
            raise KernelError(f"The compiled CPU kernels are unavailable: {native.unavailable_reason()}.")
        return "compiled"
    if device.type == "cuda":
        if triton_installed():
            return "triton"
        _once("cuda", "triton is not installed; CUDA tensors use the torch paths (pip install 'deltahub[triton]').")
        return "torch"
    if device.type == "cpu":
        from deltahub.kernels import native

        return "compiled" if native.library() is not None else "torch"
    return "torch"


def _once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("deltahub: %s", message)
