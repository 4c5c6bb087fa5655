"""Environment variables and file names, read in one place."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "DELTAHUB_HOME"  # the local registry and caches; default ~/.cache/deltahub
ENV_LOAD_PLUGINS = "DELTAHUB_LOAD_PLUGINS"  # "" = built-in plugins only (the test suite sets it)
ENV_NO_PROGRESS = "DELTAHUB_NO_PROGRESS"  # "1" hides progress bars even on a terminal
ENV_KERNEL_BACKEND = "DELTAHUB_KERNEL_BACKEND"  # auto (default) | torch | compiled | triton
ENV_NO_LOCKS = "DELTAHUB_NO_LOCKS"  # "1": skip file locks (they save duplicate work; correctness never needs them)
ENV_VLLM_REGISTRY = "DELTAHUB_VLLM_REGISTRY"  # registry URL the vLLM resolver pulls from; default the local one
ENV_VLLM_CACHE = "DELTAHUB_VLLM_CACHE"  # PEFT folders exported for vLLM; default DELTAHUB_HOME/vllm-loras
ENV_VLLM_MAX_RANK = "DELTAHUB_VLLM_MAX_LORA_RANK"  # vLLM's --max-lora-rank (default 16): SVD rank of full deltas
LOCK_TIMEOUT_S = 600.0  # how long a registry operation waits for another process's file lock

PAYLOAD_NAME = "payload.safetensors"
CARD_NAME = "README.md"
CONFIG_NAME = "model_config.json"  # the fine-tuned model's config.json, so `apply` writes a loadable folder


def home() -> Path:
    """The deltahub home folder (read on every call so tests can point it elsewhere)."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".cache" / "deltahub").expanduser()


def progress_disabled() -> bool | None:
    """tqdm's ``disable``: None lets tqdm hide bars when stderr is not a terminal."""
    return True if os.environ.get(ENV_NO_PROGRESS) == "1" else None


def locks_enabled() -> bool:
    """False when DELTAHUB_NO_LOCKS is 1/true/yes."""
    return os.environ.get(ENV_NO_LOCKS, "") not in ("1", "true", "yes")


def vllm_settings() -> tuple[str | None, Path, int]:
    """(registry URL or None for the local registry, export cache folder, max LoRA rank) for the vLLM resolver.

    Raises:
        ValueError: DELTAHUB_VLLM_MAX_LORA_RANK is not a whole number >= 1.
    """
    raw = os.environ.get(ENV_VLLM_MAX_RANK, "16")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"{ENV_VLLM_MAX_RANK}={raw!r} is not a rank; set it to vLLM's --max-lora-rank (e.g. 16).")
    cache = Path(os.environ.get(ENV_VLLM_CACHE) or home() / "vllm-loras").expanduser()
    return os.environ.get(ENV_VLLM_REGISTRY) or None, cache, int(raw)
