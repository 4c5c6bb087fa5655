"""Built-in adapter kinds, one module each, registered through the ``deltahub.adapters`` entry-point group.

``inject`` is the one-call training entry point for any installed kind (built-in or third-party)::

    params = deltahub.adapters.inject(model, "mos", {"target_modules": ["query", "value"], "r": 6})
    ...                                          # train params
    deltahub.save_adapter(model, kind="mos", out="my-expert/")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def inject(model: torch.nn.Module, kind: str, config: Mapping[str, Any] | None = None) -> list[torch.nn.Parameter]:
    """Add adapter ``kind``'s trainable modules to ``model`` in place (the rest frozen); returns their parameters.

    Raises:
        AdapterNotFoundError: no such kind (with a did-you-mean).
        CodecConfigError: options the kind refuses (no targets, shapes that do not fit).
    """
    from deltahub.adapter import get_adapter

    return get_adapter(kind).inject(model, dict(config or {}))
