"""Read model checkpoints one tensor at a time, whatever their shape on disk.

A checkpoint is a ``.safetensors`` file, a model folder (``model.safetensors`` or shards listed by
``model.safetensors.index.json``), an in-memory state dict, or an ``nn.Module``. Files are opened with
``safe_open`` so a 14 GB model never sits in memory at once; pickle (``.bin``/``.pt``) is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from deltahub.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """A read-only, name-addressed view of a model's tensors."""

    def __init__(self, files: dict[str, Path] | None = None, tensors: Mapping[str, torch.Tensor] | None = None,
                 folder: Path | None = None, path: Path | None = None):
        self._files = files or {}  # tensor name -> safetensors file
        self._tensors = dict(tensors) if tensors is not None else None
        self.folder = folder  # the model folder (config, tokenizer), if any
        self.path = path  # what the user gave
        self._handles: dict[Path, Any] = {}

    # ------------------------------------------------------------------------------------------ open
    @classmethod
    def open(cls, src: Any) -> Checkpoint:
        """Open ``src``: a path (file or folder), a state dict, an ``nn.Module`` or a Checkpoint.

        Raises:
            CheckpointError: the path does not exist or holds no safetensors weights.
        """
        if isinstance(src, Checkpoint):
            return src
        if isinstance(src, torch.nn.Module):
            return cls(tensors={k: v.detach() for k, v in src.state_dict().items()})
        if isinstance(src, Mapping):
            return cls(tensors=src)
        path = Path(src)
        if not path.exists():
            raise CheckpointError(f"No checkpoint at {path}: give a .safetensors file or a model folder.")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(
                    f"{path.name} is not a .safetensors file; deltahub never loads pickle. "
                    "Convert it with `model.save_pretrained(dir, safe_serialization=True)`."
                )
            return cls(files=_keys_of(path), path=path)
        return cls._open_folder(path)

    @classmethod
    def _open_folder(cls, folder: Path) -> Checkpoint:
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map).") from None
            files: dict[str, Path] = {}
            for shard in sorted(set(weight_map.values())):
                if "/" in shard or "\\" in shard or shard.startswith("."):
                    raise CheckpointError(f"{index} names an unsafe shard path {shard!r}.")
                files.update(_keys_of(folder / shard))
            return cls(files=files, folder=folder, path=folder)
        if (folder / SINGLE_NAME).is_file():
            return cls(files=_keys_of(folder / SINGLE_NAME), folder=folder, path=folder)
        shards = sorted(folder.glob("*.safetensors"))
        if len(shards) == 1:
            return cls(files=_keys_of(shards[0]), folder=folder, path=folder)
        raise CheckpointError(f"{folder} holds no model.safetensors (or its index): save the model with safetensors.")

    # ------------------------------------------------------------------------------------------ read
    def keys(self) -> list[str]:
        return list(self._tensors) if self._tensors is not None else list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in (self._tensors if self._tensors is not None else self._files)

    def __len__(self) -> int:
        return len(self.keys())

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape without reading the data."""
        if self._tensors is not None:
            t = self._tensors[name]
            return t.dtype, tuple(t.shape)
        sl = self._handle(self._files[name]).get_slice(name)
        return _DTYPES[sl.get_dtype()], tuple(sl.get_shape())

    def get(self, name: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name]
        try:
            return self._handle(self._files[name]).get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"Cannot read {name!r} from {self._files[name]}: {exc}") from None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get(name)

    def alias_of(self, name: str) -> str | None:
        """The earlier name of the same in-memory tensor (tied weights in a module's state dict), or None."""
        if self._tensors is None:
            return None  # safetensors files hold no shared tensors (save_pretrained drops the tied copy)
        t = self._tensors[name]
        if t.device.type == "meta":
            return None
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        for other in self._tensors:
            if other == name:
                return None
            o = self._tensors[other]
            if o.device.type != "meta" and (o.untyped_storage().data_ptr(), o.storage_offset(), tuple(o.shape),
                                            o.stride()) == key:
                return other
        return None

    def file_of(self, name: str) -> Path | None:
        return self._files.get(name)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._files.values()))

    def config(self) -> dict[str, Any] | None:
        if self.folder is not None and (self.folder / "config.json").is_file():
            try:
                return json.loads((self.folder / "config.json").read_text())
            except ValueError:
                return None
        return None

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _keys_of(path: Path) -> dict[str, Path]:
    if not path.is_file():
        raise CheckpointError(f"Missing checkpoint file {path}; the model folder is incomplete.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: path for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-save or re-download it.") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name)
