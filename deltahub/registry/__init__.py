"""Registries: the embedded local default, object stores through fsspec, and a hook for the Hub.

``Registry()`` is the local registry under ``DELTAHUB_HOME``; ``Registry("s3://bucket/prefix")`` (or
``file://``, ``memory://``, any fsspec URL) a shared one with the same layout; ``hf://`` URLs go to
``deltahub.registry.hf:HubRemote`` (see :class:`Remote`). Layout and guarantees: ``store.py``.
"""

from __future__ import annotations

from deltahub.registry.api import Registry
from deltahub.registry.refs import GcReport, RefInfo
from deltahub.registry.remote import REMOTES, ObjectStoreRemote, Remote, open_remote, split_ref

__all__ = ["REMOTES", "GcReport", "ObjectStoreRemote", "RefInfo", "Registry", "Remote", "open_remote", "split_ref"]
