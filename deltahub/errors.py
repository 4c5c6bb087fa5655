"""One error hierarchy for deltahub.

Every error a user can cause is a :class:`DeltaHubError`. Its message is one line that says what went
wrong and what to do next; the CLI prints it as ``Error: <message>`` and exits 1, without a traceback.
Each class also derives from the closest built-in exception so ``except ValueError`` keeps working.
Messages are pinned by ``tests/test_errors.py``.
"""

from __future__ import annotations

import difflib


class DeltaHubError(Exception):
    """Base class of every error deltahub raises on purpose."""


class CodecNotFoundError(DeltaHubError, LookupError):
    """An unknown codec name was asked for."""

    def __init__(self, name: str, available: list[str]):
        self.codec = name
        hint = difflib.get_close_matches(name, available, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        super().__init__(
            f"Unknown codec '{name}'. Installed: {', '.join(sorted(available)) or 'none'}.{suggestion}"
        )


class AdapterNotFoundError(DeltaHubError, LookupError):
    """An unknown adapter kind was asked for."""

    def __init__(self, name: str, available: list[str]):
        self.kind = name
        hint = difflib.get_close_matches(name, available, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        super().__init__(
            f"Unknown adapter kind '{name}'. Installed: {', '.join(sorted(available)) or 'none'}.{suggestion}"
        )


class UnsupportedAdapterError(DeltaHubError, ValueError):
    """An adapter folder uses a method or option deltahub does not support yet (nothing is written)."""


class PluginError(DeltaHubError, ImportError):
    """A plugin failed to load or is invalid (raised only when that plugin is asked for by name)."""


class CodecVersionError(DeltaHubError, ValueError):
    """A payload was written by a newer version of its codec than the one installed."""


class CodecConfigError(DeltaHubError, ValueError):
    """A codec option (``-p KEY=VALUE``) is unknown or has a bad value."""


class LayoutError(DeltaHubError, ValueError):
    """A resident layout is inconsistent (lengths, shapes, dtypes, indices): a codec bug or a corrupt payload."""


class KernelError(DeltaHubError, RuntimeError):
    """A kernel backend cannot run here (asked for explicitly, but unavailable for these tensors)."""


class FormatVersionError(DeltaHubError, ValueError):
    """The artifact was written with a newer format than this deltahub reads."""

    def __init__(self, found: int, supported: int):
        self.found, self.supported = found, supported
        super().__init__(
            f"This artifact uses format_version {found}; this deltahub reads up to {supported}. "
            "Upgrade with `pip install -U deltahub`."
        )


class ManifestError(DeltaHubError, ValueError):
    """``deltahub.json`` is missing, not JSON, or does not match the schema."""


class IntegrityError(DeltaHubError, OSError):
    """A file's size or sha256 does not match what the manifest declares (truncated or corrupted)."""


class OutputExistsError(DeltaHubError, FileExistsError):
    """The output folder exists and holds something deltahub will not overwrite."""


class UnsafePathError(DeltaHubError, ValueError):
    """A file name from an artifact or a remote would escape its folder."""


class ArtifactNotFoundError(DeltaHubError, FileNotFoundError):
    """No artifact at a path, or no such name/tag in a registry."""


class CheckpointError(DeltaHubError, ValueError):
    """A model checkpoint cannot be read (missing files, not safetensors, bad index)."""


class NothingMatchedError(DeltaHubError, ValueError):
    """The fine-tuned checkpoint shares no tensor with the base: it is not a fine-tune of it."""


class BaseMismatchError(DeltaHubError, ValueError):
    """The base given is not the one the delta was made from."""


class BaseNotFoundError(DeltaHubError, FileNotFoundError):
    """The delta's base was not given and is not registered."""


class RegistryError(DeltaHubError, OSError):
    """A registry operation failed (bad URL, unreachable store, inconsistent refs)."""


class RemoteError(RegistryError):
    """A remote (Hub, object store) refused or failed a request after retries."""


class AuthError(RemoteError, PermissionError):
    """The remote refused our credentials."""


class LockTimeoutError(RegistryError, TimeoutError):
    """Another process held a registry file lock past the wait limit."""


class ExpertNotFoundError(DeltaHubError, LookupError):
    """An ExpertPool was asked for an expert name it does not hold."""


class ExpertExistsError(DeltaHubError, ValueError):
    """An ExpertPool already holds an expert of this name (``replace`` swaps it for a new version)."""


class BudgetError(DeltaHubError, RuntimeError):
    """An expert (or a batch's experts) cannot fit in the ExpertPool's memory budget."""


class ModeError(DeltaHubError, RuntimeError):
    """Merged mode (``activate``) and on-the-fly mode (``route``) were mixed; the pool runs one at a time."""


class MergeError(DeltaHubError, ValueError):
    """A merge that cannot be made as asked (method, options, weights, or its inputs)."""


class NotMergeableError(DeltaHubError, ValueError):
    """An adapter with a nonlinearity (Compacter) cannot become a weight delta: attach it to the model instead."""


class UnservableExpertError(DeltaHubError, ValueError):
    """An expert changes the model's structure (a new or reshaped tensor), which a pool cannot serve in place."""
