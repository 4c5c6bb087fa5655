"""One version of one expert in a pool: its bound changes and its packed residents.

A version is immutable: its id is the artifact id plus the base fingerprint, and ``replace`` makes a new
one. Residents are built from the artifact on the pool's device when first needed and dropped on eviction
(the artifact stays on disk, so a later request rebuilds them). The on-the-fly forms (Δᵀ for ``Conv1D``,
biases as dense rows, merged small tensors for modules that are run again) are built beside them on the
first ``route`` and counted in the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from deltahub.artifact import Artifact
from deltahub.kernels import Dense, apply_, to_dense
from deltahub.kernels.rows import transpose
from deltahub.serving.binding import Change


def _bytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, torch.nn.Module):  # an attached adapter (its shared tensors counted once per module)
        return sum(_bytes(t) for t in {id(t): t for t in (*x.parameters(), *x.buffers())}.values())
    return int(x.nbytes()) if x is not None else 0


@dataclass(eq=False)
class Version:
    """An expert as the pool holds it (see the module docstring)."""

    name: str
    id: str
    artifact: Artifact
    changes: list[Change]
    device: torch.device
    leases: int = 0
    size: int = 0  # the most bytes it has held (residents and on-the-fly forms): what a reload needs
    retired: bool = False  # replaced or removed: dropped when its last lease ends
    last_used: float = field(default_factory=time.monotonic)
    residents: dict[str, Any] | None = None  # slot name -> layout (add) or the new tensor (replace)
    extras: dict[tuple[str, str], Any] = field(default_factory=dict)  # (slot, use) -> on-the-fly form
    attached: bool = False  # a nonlinear adapter (Compacter): on-the-fly mode only

    @property
    def loaded(self) -> bool:
        return self.residents is not None

    @property
    def nbytes(self) -> int:
        """Bytes held now: residents plus on-the-fly forms."""
        if self.residents is None:
            return 0
        return sum(_bytes(r) for r in self.residents.values()) + sum(_bytes(e) for e in self.extras.values())

    def load(self) -> int:
        """Build the residents (if dropped) and return their bytes.

        Raises:
            IntegrityError: a payload does not decode.
        """
        if self.residents is None:
            res: dict[str, Any] = {}
            for ch in self.changes:
                if ch.op == "add":  # attach: a nonlinear kind's module, served on the fly only
                    res[ch.slot.name] = self.artifact.term_resident(ch.term, device=self.device, attach=True)
                else:
                    new = self.artifact.decode_tensor(ch.term.entry)
                    res[ch.slot.name] = new.to(device=self.device, dtype=ch.slot.tensor.dtype)
            self.residents = res
            self.attached = any(isinstance(r, torch.nn.Module) for r in res.values())
        self.last_used = time.monotonic()
        return self.nbytes

    def drop(self) -> int:
        """Free the residents and on-the-fly forms; returns the bytes freed."""
        freed = self.nbytes
        self.residents, self.extras = None, {}
        return freed

    def touches(self, slot_name: str) -> bool:
        return any(ch.slot.name == slot_name for ch in self.changes)

    # --------------------------------------------------------------------------------- merged mode
    def write(self, w: torch.Tensor, slot_name: str, w0: torch.Tensor, alpha: float) -> None:
        """W ← round(W₀ + α·Δ) (or the replacement) in one pass, from the clean copy ``w0``."""
        ch = next(c for c in self.changes if c.slot.name == slot_name)
        r = self.residents[slot_name]
        if ch.op == "replace":
            w.copy_(r)
        else:
            apply_(w, r, alpha=alpha, source=w0)

    # ------------------------------------------------------------------------------ on-the-fly mode
    def onfly(self, slot_name: str, use: str) -> Any:
        """The form a hook of ``use`` needs for this slot (None when this expert leaves it alone)."""
        if self.residents is None or slot_name not in self.residents:
            return None
        key = (slot_name, use)
        if key not in self.extras:
            self.extras[key] = self._make(slot_name, use)
        return self.extras[key] if self.extras[key] is not None else self.residents[slot_name]

    def _make(self, slot_name: str, use: str) -> Any:
        """None means: the resident itself serves. Routes run on the base, so the live tensor is W₀."""
        ch = next(c for c in self.changes if c.slot.name == slot_name)
        r = self.residents[slot_name]
        w0 = ch.slot.tensor
        if isinstance(r, torch.nn.Module):
            return None  # attached: the module itself serves, on the module's output
        if use == "other":
            if ch.op == "replace":
                return None
            return apply_(w0.clone(), r, alpha=1.0)
        if ch.op == "replace":  # exact in fp64: round(W₀ + (W_new − W₀)) == W_new for fp32/half W
            delta = Dense(r.to(torch.float64) - w0.to(torch.float64))
        else:
            delta = r
        if use == "conv1d":
            return transpose(delta)
        if use == "bias":
            return to_dense(delta)
        return delta if delta is not r else None
