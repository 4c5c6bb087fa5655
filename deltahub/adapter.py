"""The adapter-kind plugin API (DESIGN §2.3): experts trained in their own factored form.

An adapter kind (LoRA, MoS, Compacter, FLoRA, …) is found through the ``deltahub.adapters`` entry-point
group, exactly like a codec; the built-ins register there too. It provides:

- ``inject(model, config)``: add its trainable modules to a torch model; returns their parameters;
- ``native_tensors(model)``: the injected modules' tensors, named as the kind stores them;
- ``materialize(tensors, config)``: per target weight, a resident ``LowRank`` (or another layout) where the
  math is a weight delta, or an ``nn.Module`` to attach where it is not (a nonlinearity);
- optionally ``read_folder`` / ``write_folder``: another library's folder format (PEFT for LoRA).

The artifact stores the native tensors as ``native`` entries, each encoded with any codec (FORMAT.md), and
the kind's config, as JSON, in the manifest's ``adapter`` block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from deltahub.codecs import ADAPTER_GROUP
from deltahub.discovery import PluginInfo, PluginKind, discover, load, validate
from deltahub.errors import AdapterNotFoundError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Target:
    """A base weight an adapter changes: its name and shape in the adapter's model, and its native tensors."""

    weight: str
    shape: tuple[int, ...]
    tensors: tuple[str, ...]


@dataclass
class Imported:
    """An adapter read from a folder: JSON config, native tensors, targets, whole tensors (a saved head)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    targets: list[Target]
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    base_hint: str | None = None  # e.g. PEFT's base_model_name_or_path


class AdapterKind(ABC):
    """An adapter kind. Subclasses set ``name`` (the entry-point name), ``version``, ``pretty_name``."""

    name: ClassVar[str]
    version: ClassVar[int]
    pretty_name: ClassVar[str] = ""
    reference_url: ClassVar[str | None] = None

    @abstractmethod
    def inject(self, model: torch.nn.Module, config: Mapping[str, Any]) -> list[torch.nn.Parameter]:
        """Add the trainable modules to ``model`` in place; returns the trainable parameters."""

    @abstractmethod
    def native_tensors(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON config) of the modules ``inject`` added, ready for an artifact."""

    @abstractmethod
    def targets(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[Target]:
        """Which base weights the native tensors change.

        Raises:
            ManifestError: tensors and config disagree.
        """

    @abstractmethod
    def materialize(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, Any]:
        """Per target weight name: a resident layout (the weight delta) or an ``nn.Module`` to attach."""

    def read_folder(self, path: Path) -> Imported | None:
        """This kind's view of a folder written by another library, or None if the folder is not of this kind.

        Raises:
            UnsupportedAdapterError: the folder is of this family but uses an option not supported yet.
        """
        return None

    def write_folder(self, out: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                     whole: Mapping[str, torch.Tensor]) -> None:
        """Write the other library's folder format into ``out`` (an empty staging folder)."""
        raise NotImplementedError(f"adapter kind {self.name} has no folder format to export to")


_REGISTERED: dict[str, type[AdapterKind]] = {}
ADAPTERS = PluginKind(group=ADAPTER_GROUP, base=AdapterKind, label="Adapter kind", base_name="deltahub.AdapterKind",
                      registered=_REGISTERED)


def discover_adapters() -> list[PluginInfo]:
    """Every adapter-kind entry point, with load errors reported instead of raised."""
    return discover(ADAPTERS)


def available_adapters() -> list[str]:
    return sorted({i.name for i in discover_adapters() if i.error is None})


def get_adapter(name: str) -> AdapterKind:
    """An instance of the adapter kind ``name``.

    Raises:
        AdapterNotFoundError: no such kind (with a did-you-mean).
        PluginError: it exists but failed to load or is a duplicate.
    """
    return load(ADAPTERS, name, lambda: AdapterNotFoundError(name, available_adapters()))


def register_adapter(cls: type[AdapterKind]) -> type[AdapterKind]:
    """Register an adapter kind at run time (tests, notebooks); usable as a decorator."""
    _REGISTERED[validate(ADAPTERS, cls, getattr(cls, "name", "?")).name] = cls
    return cls


def unregister_adapter(name: str) -> None:
    _REGISTERED.pop(name, None)


def read_adapter_folder(path: Path) -> tuple[AdapterKind, Imported] | None:
    """The adapter kind that recognises ``path`` and what it read, or None (not an adapter folder)."""
    for name in available_adapters():
        kind = get_adapter(name)
        imported = kind.read_folder(path)
        if imported is not None:
            return kind, imported
    return None
