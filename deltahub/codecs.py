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

import functools
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from deltahub.errors import CodecConfigError, CodecNotFoundError, PluginError

if TYPE_CHECKING:  # torch is heavy; codec modules import it themselves
    import torch

    from deltahub.kernels.layouts import Resident

logger = logging.getLogger(__name__)

GROUP = "deltahub.codecs"
ADAPTER_GROUP = "deltahub.adapters"
BUILTIN_DISTRIBUTION = "deltahub"


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


@dataclass(frozen=True)
class PluginInfo:
    """One discovered plugin, loaded or not."""

    name: str
    group: str
    distribution: str
    target: str
    version: int | None = None
    pretty_name: str = ""
    error: str | None = None


_REGISTERED: dict[str, type[Codec]] = {}  # runtime registrations (tests, notebooks) win over entry points


@functools.lru_cache(maxsize=8)
def _installed_entry_points(group: str) -> tuple[metadata.EntryPoint, ...]:
    # scanning every distribution's metadata costs ~3 ms; `auto` and `apply` look codecs up thousands of
    # times, so scan once per process (call `refresh_plugins()` after installing a plugin at run time)
    return tuple(metadata.entry_points(group=group))


def refresh_plugins() -> None:
    """Forget the cached plugin list (after ``pip install`` of a plugin in a running process)."""
    _installed_entry_points.cache_clear()


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    eps = list(_installed_entry_points(group))
    # DELTAHUB_LOAD_PLUGINS="" keeps the test suite to built-ins, as llm's LLM_LOAD_PLUGINS does.
    only = os.environ.get("DELTAHUB_LOAD_PLUGINS")
    if only is not None:
        allowed = {n.strip() for n in only.split(",") if n.strip()}
        eps = [ep for ep in eps if _dist(ep) == BUILTIN_DISTRIBUTION or _dist(ep) in allowed]
    return eps


def _dist(ep: metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


def _validate(cls: Any, name: str) -> type[Codec]:
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise PluginError(f"Codec plugin '{name}' does not subclass deltahub.Codec; report it to its author.")
    if getattr(cls, "name", None) != name or not isinstance(getattr(cls, "version", None), int):
        raise PluginError(
            f"Codec plugin '{name}' must set name = '{name}' and an integer version; report it to its author."
        )
    return cls


def discover_codecs() -> list[PluginInfo]:
    """Every codec entry point (built-in and third-party), with load errors reported instead of raised."""
    seen: dict[str, PluginInfo] = {}
    infos: list[PluginInfo] = []
    for ep in _entry_points(GROUP):
        try:
            cls = _validate(ep.load(), ep.name)
            info = PluginInfo(ep.name, GROUP, _dist(ep), ep.value, cls.version, cls.pretty_name)
        except Exception as exc:  # a broken third-party plugin must not break unrelated commands
            info = PluginInfo(ep.name, GROUP, _dist(ep), ep.value, error=f"{type(exc).__name__}: {exc}")
        if ep.name in seen and seen[ep.name].target != ep.value:
            first = seen[ep.name]
            if info.distribution == BUILTIN_DISTRIBUTION:  # report the plugin, not the built-in
                infos[infos.index(first)] = PluginInfo(first.name, GROUP, first.distribution, first.target,
                                                       error="duplicate name, shadowed by the built-in codec")
                seen[ep.name] = info
            else:
                why = ("shadowed by the built-in codec" if first.distribution == BUILTIN_DISTRIBUTION
                       else f"also provided by {first.distribution}")
                info = PluginInfo(ep.name, GROUP, info.distribution, ep.value, error=f"duplicate name, {why}")
        seen.setdefault(ep.name, info)
        infos.append(info)
    for name, cls in _REGISTERED.items():
        infos.append(PluginInfo(name, GROUP, "<registered>", f"{cls.__module__}:{cls.__qualname__}", cls.version))
    return infos


def available_codecs() -> list[str]:
    """Names of the codecs that load cleanly."""
    return sorted({i.name for i in discover_codecs() if i.error is None})


def get_codec(name: str) -> Codec:
    """An instance of the codec called ``name``.

    Raises:
        CodecNotFoundError: no such codec (with a did-you-mean).
        PluginError: the codec exists but failed to load or is a duplicate.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]()
    matches = [ep for ep in _entry_points(GROUP) if ep.name == name]
    if not matches:
        raise CodecNotFoundError(name, available_codecs())
    if len({ep.value for ep in matches}) > 1:
        builtin = [ep for ep in matches if _dist(ep) == BUILTIN_DISTRIBUTION]
        if not builtin:
            dists = " and ".join(sorted(_dist(ep) for ep in matches))
            raise PluginError(f"Codec '{name}' is provided by both {dists}; uninstall one of them.")
        # a built-in name is never taken over by a plugin: artifacts everywhere rely on what it means
        logger.warning("codec %r from %s is shadowed by the built-in one", name,
                       ", ".join(_dist(ep) for ep in matches if ep not in builtin))
        matches = builtin
    try:
        return _validate(matches[0].load(), name)()
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"Codec plugin '{name}' from {_dist(matches[0])} failed to load ({type(exc).__name__}: {exc}); "
            "reinstall or update it."
        ) from exc


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Register a codec class at run time (tests, notebooks); usable as a decorator."""
    _REGISTERED[_validate(cls, getattr(cls, "name", "?")).name] = cls
    return cls


def unregister_codec(name: str) -> None:
    _REGISTERED.pop(name, None)
