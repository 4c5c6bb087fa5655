"""Serve deltahub experts on vLLM: a LoRA resolver registered as a ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in each process it starts; the resolver it registers answers requests that
name an adapter vLLM has not loaded (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``, OpenAI server only):

1. the name is resolved in the registry ``DELTAHUB_VLLM_REGISTRY`` (any deltahub registry URL:
   ``s3://bucket/prefix``, ``file:///path``, ``hf://org``; default the local registry), pulled and verified;
2. the expert's base fingerprint is checked against the weights vLLM serves (``--model``, a folder or a
   Hub repo in the local cache): an expert made for another base is refused, where vLLM alone would serve
   it silently (the touched tensors are hashed once; the hashes are cached by file, size and mtime);
3. the expert is exported as a PEFT folder into ``DELTAHUB_VLLM_CACHE/<artifact id>`` (atomically; reused
   by the next request and by other processes): LoRA experts exactly, full-delta experts by truncated SVD
   at rank ``DELTAHUB_VLLM_MAX_LORA_RANK`` (default 16; set it to vLLM's ``--max-lora-rank``, the largest rank
   vLLM will load, so the export keeps the most of Δ that vLLM can hold). The rank and the relative error
   of the export are logged and written in the folder's ``deltahub_export.json``.

Unknown names, registry failures and refused experts return None (vLLM answers 404) with the reason
logged; the server never crashes on a bad expert. Nothing here imports vllm except :func:`register` and
:class:`DeltahubResolver`; :func:`resolve_folder` is the plain-Python core.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from deltahub.constants import locks_enabled, vllm_settings
from deltahub.errors import ArtifactNotFoundError, BaseMismatchError, DeltaHubError

logger = logging.getLogger("vllm.deltahub")  # under vLLM's logger: its handlers and format, kept by its dictConfig
RESOLVER_NAME = "deltahub"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
_verified: dict[tuple[str, str], str | None] = {}  # (base folder, artifact id) -> None (ok) or the refusal
_lock = threading.Lock()


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver once per process."""
    from vllm.lora.resolver import LoRAResolverRegistry

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, _resolver_class()())


def _resolver_class() -> type:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class DeltahubResolver(LoRAResolver):
        """Resolves adapter names from a deltahub registry (see the module docstring)."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            import asyncio

            folder = await asyncio.to_thread(resolve_folder, base_model_name, lora_name)
            if folder is None:
                return None
            return LoRARequest(lora_name=lora_name, lora_int_id=lora_id(folder.name), lora_path=str(folder))

    return DeltahubResolver


def lora_id(artifact_id: str) -> int:
    """A stable positive id for vLLM (the OpenAI server replaces it with its own counter)."""
    return int(artifact_id.removeprefix("sha256:")[:7], 16) + 1


def resolve_folder(base_model_name: str, lora_name: str) -> Path | None:
    """The PEFT folder vLLM should load for ``lora_name`` on ``base_model_name``, or None (reason logged)."""
    try:
        url, cache, max_rank = vllm_settings()
        art = _pull(url, lora_name)
        if art is None:
            return None
        refusal = _check_base(base_model_name, art)
        if refusal is not None:
            logger.warning("deltahub: refusing %r for base %r: %s", lora_name, base_model_name, refusal)
            return None
        return _export(art, cache, max_rank, lora_name)
    except DeltaHubError as exc:
        logger.warning("deltahub: cannot serve %r: %s", lora_name, exc)
    except ValueError as exc:  # a bad setting (vllm_settings)
        logger.warning("deltahub: cannot serve %r: %s", lora_name, exc)
    except Exception:  # the server must survive any expert; the traceback goes to the log
        logger.exception("deltahub: unexpected failure resolving %r", lora_name)
    return None


def _pull(url: str | None, lora_name: str) -> Any:
    from deltahub.registry import Registry

    try:
        return Registry(url).resolve(lora_name)
    except ArtifactNotFoundError:
        logger.info("deltahub: no expert %r in %s", lora_name, url or "the local registry")
        return None


def _check_base(base_model_name: str, art: Any) -> str | None:
    """None when vLLM's weights are the expert's base, else the reason (cached per folder and artifact)."""
    folder = _model_folder(base_model_name)
    key = (str(folder), art.id)
    with _lock:
        if key in _verified:
            return _verified[key]
    from deltahub.checkpoint import Checkpoint
    from deltahub.fingerprint import verify_base

    try:
        verify_base(Checkpoint.open(folder), art.manifest.base.tensors, artifact=f"expert {art.name!r}")
        verdict = None
    except BaseMismatchError as exc:
        verdict = str(exc)
    with _lock:
        _verified[key] = verdict
    return verdict


def _model_folder(base_model_name: str) -> Path:
    """vLLM's ``--model``: a local folder, or a Hub repo id already in the local Hugging Face cache."""
    path = Path(base_model_name).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(base_model_name, local_files_only=True, allow_patterns=["*.safetensors",
                                                                                               "*.json"]))
    except (LocalEntryNotFoundError, ValueError) as exc:
        from deltahub.errors import BaseNotFoundError

        raise BaseNotFoundError(f"vLLM serves {base_model_name!r}, which is no local folder or cached Hub repo, so "
                                f"its weights cannot be checked ({exc}); start vLLM with --model FOLDER.") from None


def _export(art: Any, cache: Path, max_rank: int, lora_name: str) -> Path | None:
    from deltahub.exporting import export

    if art.manifest.kind == "lora":
        ranks = art.manifest.stats.get("ranks") or []
        if ranks and max(ranks) > max_rank:
            logger.warning("deltahub: expert %r has LoRA rank %d > %d (%s); start vLLM with --max-lora-rank %d and set "
                           "%s to it", lora_name, max(ranks), max_rank, "DELTAHUB_VLLM_MAX_LORA_RANK",
                           next(r for r in VLLM_RANKS if r >= max(ranks)), "DELTAHUB_VLLM_MAX_LORA_RANK")
            return None
    elif art.manifest.kind != "delta":
        logger.warning("deltahub: expert %r is a %s adapter, which has no PEFT LoRA form", lora_name, art.manifest.kind)
        return None
    folder = cache / art.id.removeprefix("sha256:")
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{folder.name}.lock"):
        if (folder / "adapter_config.json").is_file():
            return folder  # written whole by an earlier request (staging renames a complete folder)
        report = export(art, folder, format="peft", rank=max_rank)
    how = "exact LoRA factors" if report.rank is None else f"truncated SVD at rank {report.rank}"
    logger.info("deltahub: exported %r (%s) to %s: %s, relative error %.4f", lora_name, art.id[:19], folder, how,
                report.rel_error)
    return folder


def _file_lock(path: Path) -> Any:
    import contextlib

    if not locks_enabled():
        return contextlib.nullcontext()
    from filelock import FileLock

    from deltahub.constants import LOCK_TIMEOUT_S

    return FileLock(str(path), timeout=LOCK_TIMEOUT_S)
