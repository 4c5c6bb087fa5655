"""Plugin discovery through entry points, shared by codecs (``deltahub.codecs``) and adapter kinds
(``deltahub.adapters``), the way simonw/llm and fsspec find theirs.

Built-ins register through the same groups as third-party plugins. A broken or duplicate plugin is
reported by name when listed and raised only when asked for by name, so it never breaks unrelated
commands; a built-in name is never taken over by a plugin (artifacts everywhere rely on what it means).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from deltahub.errors import PluginError

logger = logging.getLogger(__name__)

BUILTIN_DISTRIBUTION = "deltahub"


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


@dataclass(frozen=True)
class PluginKind:
    """A plugin group: its entry-point group, the class plugins subclass, and the word for them in messages."""

    group: str
    base: type
    label: str  # "Codec", "Adapter kind"
    base_name: str  # "deltahub.Codec"
    registered: dict[str, Any]  # runtime registrations (tests, notebooks) win over entry points


@functools.lru_cache(maxsize=8)
def _installed_entry_points(group: str) -> tuple[metadata.EntryPoint, ...]:
    # scanning every distribution's metadata costs ~3 ms; `auto` and `apply` look codecs up thousands of
    # times, so scan once per process (call `refresh_plugins()` after installing a plugin at run time)
    return tuple(metadata.entry_points(group=group))


def refresh_plugins() -> None:
    """Forget the cached plugin list (after ``pip install`` of a plugin in a running process)."""
    _installed_entry_points.cache_clear()


def entry_points(group: str) -> list[metadata.EntryPoint]:
    eps = list(_installed_entry_points(group))
    # DELTAHUB_LOAD_PLUGINS="" keeps the test suite to built-ins, as llm's LLM_LOAD_PLUGINS does.
    only = os.environ.get("DELTAHUB_LOAD_PLUGINS")
    if only is not None:
        allowed = {n.strip() for n in only.split(",") if n.strip()}
        eps = [ep for ep in eps if _dist(ep) == BUILTIN_DISTRIBUTION or _dist(ep) in allowed]
    return eps


def _dist(ep: metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


def validate(kind: PluginKind, cls: Any, name: str) -> Any:
    """``cls`` if it is a proper plugin class called ``name``.

    Raises:
        PluginError: not a subclass of the kind's base, or a wrong ``name`` / ``version``.
    """
    if not (isinstance(cls, type) and issubclass(cls, kind.base)):
        raise PluginError(f"{kind.label} plugin '{name}' does not subclass {kind.base_name}; report it to its author.")
    if getattr(cls, "name", None) != name or not isinstance(getattr(cls, "version", None), int):
        raise PluginError(
            f"{kind.label} plugin '{name}' must set name = '{name}' and an integer version; report it to its author."
        )
    return cls


def discover(kind: PluginKind) -> list[PluginInfo]:
    """Every entry point of the group (built-in and third-party), with load errors reported, not raised."""
    seen: dict[str, PluginInfo] = {}
    infos: list[PluginInfo] = []
    builtin_word = f"built-in {kind.label.lower()}"
    for ep in entry_points(kind.group):
        try:
            cls = validate(kind, ep.load(), ep.name)
            info = PluginInfo(ep.name, kind.group, _dist(ep), ep.value, cls.version, cls.pretty_name)
        except Exception as exc:  # noqa: BLE001  (a broken third-party plugin must not break unrelated commands)
            info = PluginInfo(ep.name, kind.group, _dist(ep), ep.value, error=f"{type(exc).__name__}: {exc}")
        if ep.name in seen and seen[ep.name].target != ep.value:
            first = seen[ep.name]
            if info.distribution == BUILTIN_DISTRIBUTION:  # report the plugin, not the built-in
                infos[infos.index(first)] = PluginInfo(first.name, kind.group, first.distribution, first.target,
                                                       error=f"duplicate name, shadowed by the {builtin_word}")
                seen[ep.name] = info
            else:
                why = (f"shadowed by the {builtin_word}" if first.distribution == BUILTIN_DISTRIBUTION
                       else f"also provided by {first.distribution}")
                info = PluginInfo(ep.name, kind.group, info.distribution, ep.value, error=f"duplicate name, {why}")
        seen.setdefault(ep.name, info)
        infos.append(info)
    for name, cls in kind.registered.items():
        infos.append(PluginInfo(name, kind.group, "<registered>", f"{cls.__module__}:{cls.__qualname__}", cls.version,
                                getattr(cls, "pretty_name", "")))
    return infos


def load(kind: PluginKind, name: str, not_found: Callable[[], Exception]) -> Any:
    """An instance of the plugin called ``name``.

    Raises:
        the error ``not_found()`` builds: no such plugin.
        PluginError: it exists but failed to load or is a duplicate.
    """
    if name in kind.registered:
        return kind.registered[name]()
    matches = [ep for ep in entry_points(kind.group) if ep.name == name]
    if not matches:
        raise not_found()
    if len({ep.value for ep in matches}) > 1:
        builtin = [ep for ep in matches if _dist(ep) == BUILTIN_DISTRIBUTION]
        if not builtin:
            dists = " and ".join(sorted(_dist(ep) for ep in matches))
            raise PluginError(f"{kind.label} '{name}' is provided by both {dists}; uninstall one of them.")
        logger.warning("%s %r from %s is shadowed by the built-in one", kind.label.lower(), name,
                       ", ".join(_dist(ep) for ep in matches if ep not in builtin))
        matches = builtin
    try:
        return validate(kind, matches[0].load(), name)()
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"{kind.label} plugin '{name}' from {_dist(matches[0])} failed to load ({type(exc).__name__}: {exc}); "
            "reinstall or update it."
        ) from exc
