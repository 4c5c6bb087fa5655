"""deltahub: store base models once and fine-tuned experts as small compressed deltas.

Heavy modules (torch, safetensors, huggingface_hub, triton, storage backends) load on first use of
the name that needs them, so ``import deltahub`` and ``deltahub --help`` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from deltahub import errors as _errors
from deltahub.errors import *  # noqa: F403  (the error hierarchy is light and part of the API)

from deltahub._version import __version__

_LAZY = {
    "Artifact": "deltahub.artifact",
    "compress": "deltahub.compressing",
    "apply": "deltahub.applying",
    "Codec": "deltahub.codecs",
    "CodecConfig": "deltahub.codecs",
    "Encoded": "deltahub.codecs",
    "get_codec": "deltahub.codecs",
    "available_codecs": "deltahub.codecs",
    "register_codec": "deltahub.codecs",
    "Registry": "deltahub.registry",
    "save_adapter": "deltahub.adapting",
    "attach": "deltahub.adapting",
    "compress_adapter": "deltahub.adapting",
    "export": "deltahub.exporting",
    "AdapterKind": "deltahub.adapter",
    "get_adapter": "deltahub.adapter",
    "register_adapter": "deltahub.adapter",
    "ExpertPool": "deltahub.serving.pool",
    "merge": "deltahub.merging",
}

__all__ = ["__version__", "load", *_LAZY, *[n for n in vars(_errors) if n.endswith("Error")]]

if TYPE_CHECKING:
    from deltahub.adapter import AdapterKind, get_adapter, register_adapter
    from deltahub.adapting import attach, compress_adapter, save_adapter
    from deltahub.applying import apply
    from deltahub.artifact import Artifact
    from deltahub.codecs import Codec, CodecConfig, Encoded, available_codecs, get_codec, register_codec
    from deltahub.compressing import compress
    from deltahub.exporting import export
    from deltahub.merging import merge
    from deltahub.registry import Registry
    from deltahub.serving.pool import ExpertPool


def load(path: Any, *, verify: bool = True) -> Artifact:
    """Open and verify the artifact folder at ``path`` (see :meth:`Artifact.load`)."""
    from deltahub.artifact import Artifact

    return Artifact.load(path, verify=verify)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deltahub' has no attribute {name!r}")
