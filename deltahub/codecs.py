"""The codec contract and plugin discovery.

A codec turns one delta tensor into plain data (a dict of dense tensors plus ``str`` metadata, exactly
what safetensors stores) and back. Codecs are found through the ``deltahub.codecs`` entry-point group;
the built-ins register there too, so a third-party codec is a peer, not a second-class citizen::

    [project.entry-points."deltahub.codecs"]
    ternary = "deltahub_ternary:TernaryCodec"

Numerics (DESIGN §2.3): payloads store unscaled values plus their scale; ``decode`` returns fp32 (fp64
only where a lossless codec needs it) and the caller rounds once into the weight's dtype.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from deltahub.discovery import BUILTIN_DISTRIBUTION, PluginInfo, PluginKind, discover, load, refresh_plugins, validate
from deltahub.errors import CodecConfigError, CodecNotFoundError

if TYPE_CHECKING:  # torch is heavy; codec modules import it themselves
    import torch

    from deltahub.kernels.layouts import Resident

logger = logging.getLogger(__name__)

GROUP = "deltahub.codecs"
ADAPTER_GROUP = "deltahub.adapters"
__all__ = ["BUILTIN_DISTRIBUTION", "PluginInfo", "refresh_plugins"]  # re-exported: older imports


class CodecConfig(BaseModel):
    """Base class of every codec's options: frozen, validated, unknown keys refused.

    Each field's attribute docstring is its help text in ``deltahub codecs NAME``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


@dataclass(frozen=True)
class Encoded:
    """A codec's output for one tensor: dense tensors and small ``str`` metadata."""

    tensors: Mapping[str, torch.Tensor]
    meta: Mapping[str, str] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class DeltaSource(ABC):
    """A re-iterable view of a whole delta, one ``(name, fp32 tensor)`` at a time.

    ``Codec.fit`` may iterate it several times (ComPEFT's global σ, then its global threshold), so a
    14 GB model never has to sit in memory at once.
    """

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]: ...


class ListSource(DeltaSource):
    """A DeltaSource over tensors held in memory (tests, notebooks, single-tensor fits)."""

    def __init__(self, items: Mapping[str, torch.Tensor]):
        self.items = items

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.items.items()


class Codec(ABC):
    """A per-tensor delta codec.

    Subclasses set ``name`` (lowercase, equal to the entry-point name), ``version`` (bump it when the
    payload layout changes), ``pretty_name``, ``reference_url`` and a nested ``Config``.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    pretty_name: ClassVar[str] = ""
    reference_url: ClassVar[str | None] = None
    lossless: ClassVar[bool] = False
    Config: ClassVar[type[CodecConfig]] = CodecConfig
    auto_grid: ClassVar[tuple[Mapping[str, Any], ...]] = ()
    """The settings ``auto`` tries for this codec; empty (the default) leaves it out of ``auto``. A third-party
    codec becomes an ``auto`` candidate by listing some."""

    def encode_grid(self, delta: torch.Tensor, configs: list[CodecConfig], *, name: str = "") -> list[Encoded]:
        """One tensor encoded with several settings (``auto``'s candidates), each equal to :meth:`encode` after
        :meth:`fit_one`; codecs override it to share work across settings (ComPEFT: one sort for all densities)."""
        return [self.encode(delta, c, self.fit_one(name, delta, c), name=name) for c in configs]

    def expected_gain(self, enc: Encoded) -> float | None:
        """g with E[Δ̂] = g·Δ over the codec's randomness, for codecs whose error is independent zero-mean noise
        around that (DARE: g = 1; DAREx: g = (1−p)/q); None (the default) for a deterministic error. ``auto``'s
        uncalibrated objective counts such noise as spread over a row's inputs."""
        return None

    def accepts(self, name: str, shape: tuple[int, ...], config: CodecConfig) -> bool:
        """Whether this codec should encode the tensor; the rest are stored with ``dense``.

        The default takes matrices and higher (linear, conv, embeddings): biases and norms are under 1%
        of the bytes and compress badly (research/codecs.md §8).
        """
        return len(shape) >= 2

    def fit(
        self, deltas: DeltaSource, config: CodecConfig, *, calibration: Any = None
    ) -> dict[str, Any] | None:
        """Statistics over the whole delta, computed once before encoding (JSON-able, kept in the manifest)."""
        return None

    def fit_one(self, name: str, delta: torch.Tensor, config: CodecConfig, *,
                calibration: Any = None) -> dict[str, Any] | None:
        """:meth:`fit` over one tensor (codecs whose statistics are per tensor, contract tests, ``auto``);
        None when the codec does not take the tensor."""
        if not self.accepts(name, tuple(delta.shape), config):
            return None
        return self.fit(ListSource({name: delta}), config, calibration=calibration)

    @abstractmethod
    def encode(
        self, delta: torch.Tensor, config: CodecConfig, stats: Mapping[str, Any] | None = None, *, name: str = ""
    ) -> Encoded:
        """Encode one fp32 delta tensor (any shape, contiguous)."""

    @abstractmethod
    def decode(self, enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
        """Rebuild the delta as an fp32 tensor of ``shape``.

        Raises:
            ValueError: the payload is inconsistent with ``shape`` or its own metadata.
        """

    def sparse(self, enc: Encoded, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The delta as (strictly increasing flat positions int64, their fp32 values), equal to ``decode`` there
        and zero elsewhere, for codecs that store a sparse support; None (the default) for the others.
        ``deltahub.merge`` combines such deltas without building dense tensors.

        Raises:
            ValueError: the payload is inconsistent with ``shape`` or its own metadata.
        """
        return None

    def to_resident(self, enc: Encoded, shape: tuple[int, ...], *, device: Any = "cpu") -> Resident:
        """The in-memory layout the kernels apply (default: the decoded dense tensor)."""
        from deltahub.kernels.layouts import Dense

        return Dense(self.decode(enc, shape).to(device))

    def parse_config(self, params: Mapping[str, Any] | Iterable[str] = ()) -> CodecConfig:
        """Build the frozen config from a mapping or ``KEY=VALUE`` strings (the CLI's ``-p``).

        Raises:
            CodecConfigError: an unknown key or a value the config refuses.
        """
        if not isinstance(params, Mapping):
            params = _parse_kv(params)
        try:
            return self.Config(**params)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "?"
            fields = ", ".join(self.Config.model_fields) or "none"
            if err["type"] == "extra_forbidden":
                raise CodecConfigError(
                    f"Codec '{self.name}' has no option '{key}'. Options: {fields}. See `deltahub codecs {self.name}`."
                ) from None
            msg = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a check across fields
                raise CodecConfigError(f"Bad options for codec '{self.name}': {msg}. See `deltahub codecs {self.name}`.") from None
            raise CodecConfigError(
                f"Bad value for '{key}' of codec '{self.name}': {msg}. See `deltahub codecs {self.name}`."
            ) from None


def _parse_kv(items: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CodecConfigError(f"Bad option '{item}': write it as KEY=VALUE, for example -p density=0.1.")
        try:  # numbers, booleans, null; anything else stays a string (e.g. mode=global, scale=auto)
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


# ---------------------------------------------------------------------------------------------- discovery
_REGISTERED: dict[str, type[Codec]] = {}  # runtime registrations (tests, notebooks) win over entry points
CODECS = PluginKind(group=GROUP, base=Codec, label="Codec", base_name="deltahub.Codec", registered=_REGISTERED)


def discover_codecs() -> list[PluginInfo]:
    """Every codec entry point (built-in and third-party), with load errors reported instead of raised."""
    return discover(CODECS)


def available_codecs() -> list[str]:
    """Names of the codecs that load cleanly."""
    return sorted({i.name for i in discover_codecs() if i.error is None})


def get_codec(name: str) -> Codec:
    """An instance of the codec called ``name``.

    Raises:
        CodecNotFoundError: no such codec (with a did-you-mean).
        PluginError: the codec exists but failed to load or is a duplicate.
    """
    return load(CODECS, name, lambda: CodecNotFoundError(name, available_codecs()))


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Register a codec class at run time (tests, notebooks); usable as a decorator."""
    _REGISTERED[validate(CODECS, cls, getattr(cls, "name", "?")).name] = cls
    return cls


def unregister_codec(name: str) -> None:
    _REGISTERED.pop(name, None)
