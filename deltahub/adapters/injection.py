"""What every adapter kind's ``inject`` does around its own layer: find the target modules, freeze the model,
swap a module in place."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltahub.errors import CodecConfigError


def matches(name: str, targets: Any) -> bool:
    """PEFT's ``target_modules``: one regex (a str, full match) or names / dotted suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: Any, accept: Callable[[nn.Module], Any], what: str,
                 kind: str) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``targets`` names that ``accept`` takes; then every parameter is frozen.

    Raises:
        CodecConfigError: no targets given, or none of them is a ``what`` layer.
    """
    if not targets:
        raise CodecConfigError(f"{kind} needs target_modules (module names or suffixes, e.g. ['query', 'value']).")
    found = [(n, m) for n, m in model.named_modules() if n and matches(n, targets) and accept(m)]
    if not found:
        raise CodecConfigError(f"target_modules {targets!r} match no {what} layer of the model.")
    for p in model.parameters():
        p.requires_grad_(False)
    return found


def swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class Attached(nn.Module):
    """A module followed by an adapter on its output: ``adapter(base_layer(x))``."""

    def __init__(self, base: nn.Module, adapter: nn.Module):
        super().__init__()
        self.base_layer, self.compacter = base, adapter

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.compacter(self.base_layer(*args, **kwargs))
