"""``ExpertPool``: one base model in memory, many packed experts beside it, swapped or mixed per request.

Two modes, one at a time (DESIGN §2.8):

- merged: ``activate(name)`` writes W ← round(W₀ + α·Δ) into each touched weight in one pass from a clean
  copy W₀ (kept in the budget), so ``activate(None)`` restores the base bit for bit after any number of swaps;
- on-the-fly: ``with pool.route(names): model(batch)`` leaves the base untouched and adds each row's expert
  term in forward hooks (:mod:`deltahub.serving.routing`), any mix of codecs and LoRA experts per batch.

The rules of research/reliability.md §3.5: an expert is an immutable version (artifact id + base
fingerprint) and its name is an alias resolved once per request; a request holds a lease until it ends;
eviction (LRU, under ``budget_bytes``) only takes experts with no lease; ``replace`` makes a new version
and drains the old; ``activate`` waits until leased requests finish. One lock guards the pool's state;
forward passes run outside it, so threads serve concurrently.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from deltahub.artifact import Artifact
from deltahub.errors import BudgetError, ExpertExistsError, ExpertNotFoundError, ModeError
from deltahub.fingerprint import _sha
from deltahub.serving import routing
from deltahub.serving.binding import ModelIndex, Slot, bind
from deltahub.serving.expert import Version


class ExpertPool:
    """Serve many experts on one model (see the module docstring).

    Args:
        model: a transformers model or any ``nn.Module``, already on its device and dtype (bf16/fp16 bases
            are recognised by their cast fingerprints).
        budget_bytes: the most bytes that packed residents and clean copies may hold (None: no limit).
        device: where residents live (default: the device of the model's first parameter).
        wait_s: how long ``route`` waits for leased experts to free budget before :class:`BudgetError`.
    """

    def __init__(self, model: torch.nn.Module, *, budget_bytes: int | None = None, device: Any = None,
                 wait_s: float = 60.0):
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None, got {budget_bytes}")
        self.model = model
        first = next(iter(model.parameters()), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None
                                                                        else torch.device("cpu"))
        self.budget_bytes = budget_bytes
        self.wait_s = wait_s
        self._index = ModelIndex(model)
        self._hooks = routing.Hooks(model)
        self._cond = threading.Condition(threading.RLock())
        self._names: dict[str, Version] = {}
        self._versions: list[Version] = []  # every live version, retired ones with leases included
        self._hashes: dict[str, str] = {}  # slot -> sha256 of its clean tensor
        self._clean: dict[str, torch.Tensor] = {}  # slot -> W₀
        self._modified: set[str] = set()  # slots whose live tensor is not W₀ now
        self._active: tuple[Version, float] | None = None
        self._merged_leases = 0
        self._route_leases = 0

    def __repr__(self) -> str:
        return (f"ExpertPool({len(self._names)} experts, active={self.active!r}, "
                f"{self.used_bytes:,} of {self.budget_bytes or 'unlimited'} bytes)")

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    @property
    def names(self) -> list[str]:
        """The expert names, in the order they were added."""
        return list(self._names)

    @property
    def active(self) -> str | None:
        """The expert merged into the weights now (None: the base)."""
        with self._cond:
            return None if self._active is None else self._active[0].name

    @property
    def used_bytes(self) -> int:
        """Bytes held by residents, their on-the-fly forms and the clean copies."""
        with self._cond:
            return sum(v.nbytes for v in self._versions) + sum(_nb(t) for t in self._clean.values())

    # ------------------------------------------------------------------------------------- experts
    def add(self, name: str, source: Any) -> str:
        """Bind an expert to the model and load its packed residents; returns its version id.

        Args:
            name: the name requests use (an alias of the version).
            source: an :class:`~deltahub.Artifact`, an artifact folder, or a registry ref (``name[:tag]``,
                an id, ``s3://…``, ``hf://org/repo[@rev]``, ``file://…``).

        Raises:
            ExpertExistsError: ``name`` is taken (use :meth:`replace`).
            BaseMismatchError: the expert was made from other weights than the model's; nothing is loaded.
            UnservableExpertError: it adds or reshapes a tensor the model has no place for.
            BudgetError: its residents alone exceed ``budget_bytes``.
            ArtifactNotFoundError, IntegrityError, RemoteError: the source cannot be read.
        """
        with self._cond:
            self._free_name(name)
        version = self._prepare(name, source)
        with self._cond:
            self._free_name(name)
            self._admit(version)
            self._names[name] = version
        return version.id

    def replace(self, name: str, source: Any) -> str:
        """Point ``name`` at a new version; requests already running finish on the old one, which then goes.

        An active (merged) old version is swapped for the new one once its leases end.

        Raises:
            ExpertNotFoundError: no expert ``name``; and as :meth:`add`.
        """
        self._get(name)
        version = self._prepare(name, source)
        with self._cond:
            old = self._get(name)
            self._admit(version)
            self._names[name] = version
            old.retired = True
            if self._active is not None and self._active[0] is old:
                self._cond.wait_for(lambda: self._merged_leases == 0)
                if self._active is not None and self._active[0] is old:
                    self._switch(version, self._active[1])
            self._reap(old)
        return version.id

    def remove(self, name: str) -> None:
        """Forget ``name``; requests running on it finish first (an active expert is un-merged after them).

        Raises:
            ExpertNotFoundError: no expert ``name``.
        """
        with self._cond:
            version = self._get(name)
            del self._names[name]
            version.retired = True
            if self._active is not None and self._active[0] is version:
                self._cond.wait_for(lambda: self._merged_leases == 0)
                self._switch(None, 1.0)
            self._reap(version)
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        """Budget, bytes in use, the active expert and, per expert, its version id, bytes and leases."""
        with self._cond:
            return {"budget_bytes": self.budget_bytes, "used_bytes": self.used_bytes, "active": self.active,
                    "clean_copy_bytes": sum(_nb(t) for t in self._clean.values()),
                    "experts": {n: {"id": v.id, "loaded": v.loaded, "bytes": v.nbytes, "leases": v.leases,
                                    "tensors": len(v.changes)} for n, v in self._names.items()}}

    def close(self) -> None:
        """Restore the base (after running requests), remove the hooks and free every resident."""
        with self._cond:
            self._cond.wait_for(lambda: self._merged_leases == 0 and self._route_leases == 0)
            self._switch(None, 1.0)
            self._hooks.remove()
            for v in self._versions:
                self._drop(v)
            self._versions, self._names, self._clean = [], {}, {}

    # ---------------------------------------------------------------------------------- merged mode
    def activate(self, name: str | None, *, alpha: float = 1.0) -> None:
        """Merge expert ``name`` into the weights (None: restore the base, bit for bit).

        Waits until every request holding a lease (``route`` or ``using``) has finished.

        Raises:
            ExpertNotFoundError: no expert ``name``.
            BudgetError: its residents and the clean copies of its weights do not fit in the budget.
        """
        with self._cond:
            target = None if name is None else self._get(name)
            self._cond.wait_for(lambda: self._merged_leases == 0 and self._route_leases == 0)
            self._switch(target, float(alpha))

    @contextmanager
    def using(self, name: str | None, *, alpha: float = 1.0) -> Iterator[str | None]:
        """Run a request on expert ``name`` merged into the weights, holding a lease while it runs.

        Requests for the expert already active share it; another expert waits until they finish. Yields the
        version id that serves the block (None for the base).

        Raises:
            ExpertNotFoundError, BudgetError: as :meth:`activate`.
        """
        with self._cond:
            target = None if name is None else self._get(name)
            state = None if target is None else (target, float(alpha))
            self._cond.wait_for(lambda: self._route_leases == 0 and (self._merged_leases == 0 or
                                                                     _same(self._active, state)))
            if not _same(self._active, state):
                self._switch(target, float(alpha))
            self._merged_leases += 1
            if target is not None:
                target.leases += 1
        try:
            yield None if target is None else target.id
        finally:
            with self._cond:
                self._merged_leases -= 1
                if target is not None:
                    self._release(target)
                self._cond.notify_all()

    # ------------------------------------------------------------------------------ on-the-fly mode
    @contextmanager
    def route(self, names: Sequence[str | None]) -> Iterator[list[str | None]]:
        """Within the block, batch row i of every forward pass in this thread uses expert ``names[i]``.

        ``None`` rows get the base. Yields the version id that serves each row (None for the base): names are
        resolved once, here, so a concurrent ``replace`` changes the next request, not this one. Works around ``model.generate``: rows expanded for beams or
        ``num_return_sequences`` keep their expert. The model must be in the base state (no active expert).

        Raises:
            ModeError: an expert is active (merged mode); call ``activate(None)`` first.
            ExpertNotFoundError: a name the pool does not hold.
            BudgetError: the named experts do not fit in the budget together (or not within ``wait_s``).
        """
        names = list(names)
        with self._cond:
            resolved = {n: self._get(n) for n in names if n is not None}  # aliases resolved once, here
            versions = list(dict.fromkeys(resolved.values()))
            if self._active is not None or self._merged_leases:
                who = self.active or "an expert"
                raise ModeError(f"{who!r} is merged into the weights (merged mode); call pool.activate(None) "
                                "before routing batches.")
            self._lease_for_route(versions)
        pos = {id(v): i for i, v in enumerate(versions)}
        index = torch.tensor([-1 if n is None else pos[id(resolved[n])] for n in names], dtype=torch.long,
                             device=self.device)
        routing.enter(routing.RouteContext(versions, index))
        try:
            yield [None if n is None else resolved[n].id for n in names]
        finally:
            routing.leave()
            with self._cond:
                self._route_leases -= 1
                for v in versions:
                    self._release(v)
                self._cond.notify_all()

    # ------------------------------------------------------------------------------------ internals
    def _lease_for_route(self, versions: list[Version]) -> None:
        need = sum(v.size for v in versions)
        if self.budget_bytes is not None and need > self.budget_bytes:
            raise BudgetError(f"These {len(versions)} experts need {need:,} bytes resident together; the pool's "
                              f"budget is {self.budget_bytes:,}. Route fewer experts per batch or raise budget_bytes.")
        deadline = time.monotonic() + self.wait_s
        keep = set(versions)
        while not self._room(sum(v.size for v in versions if not v.loaded), keep):
            left = deadline - time.monotonic()
            if left <= 0 or not self._cond.wait(timeout=left):
                raise BudgetError(f"No room for {len(versions)} experts within {self.wait_s:g} s: experts in use "
                                  "hold the budget. Raise budget_bytes or route fewer experts at once.")
        for v in versions:
            v.leases += 1
            v.load()
            for ch in v.changes:
                for _path, _attr, use in ch.slot.uses:
                    v.onfly(ch.slot.name, use)
            v.size = max(v.size, v.nbytes)
        self._route_leases += 1

    def _prepare(self, name: str, source: Any) -> Version:
        if not isinstance(name, str) or not name:
            raise ValueError(f"an expert name must be a non-empty string, got {name!r}")
        art = _open(source)
        with self._cond:
            changes = bind(art, self._index, self._clean_sha)
            self._hooks.cover(changes)
        version = Version(name, f"{art.id}@{art.manifest.base.fingerprint[:16]}", art, changes, self.device)
        version.size = version.load()
        if self.budget_bytes is not None and version.size > self.budget_bytes:
            version.drop()
            raise BudgetError(f"Expert {name!r} needs {version.size:,} bytes resident; the pool's budget is "
                              f"{self.budget_bytes:,}. Raise budget_bytes or store the expert with a smaller codec.")
        return version

    def _admit(self, version: Version) -> None:
        self._versions.append(version)
        if not self._room(0, {version}):
            self._drop(version)  # registered, loaded again on first use

    def _room(self, need: int, keep: set[Version]) -> bool:
        """Evict idle experts (least recently used first), then spare clean copies, until ``need`` fits."""
        if self.budget_bytes is None:
            return True
        active = None if self._active is None else self._active[0]
        while self.used_bytes + need > self.budget_bytes:
            idle = [v for v in self._versions if v.loaded and v.leases == 0 and v not in keep and v is not active]
            if idle:
                self._drop(min(idle, key=lambda v: v.last_used))
                continue
            spare = [s for s in self._clean if s not in self._modified]
            if not spare:
                return False
            del self._clean[spare[0]]
        return True

    def _switch(self, target: Version | None, alpha: float) -> None:
        """W ← W₀ + α·Δ_target on its slots, W ← W₀ on the slots the previous expert left changed."""
        if target is not None and target.attached:
            from deltahub.errors import NotMergeableError

            raise NotMergeableError(f"Expert {target.name!r} is a {target.artifact.manifest.kind} adapter, which has "
                                    "no weight delta to merge: serve it on the fly (pool.route), not pool.activate.")
        new = {ch.slot.name: ch.slot for ch in target.changes} if target is not None else {}
        if target is not None:
            target.leases += 1  # not evicted while its copies are made
            try:
                missing = sum(_nb(s.tensor) for n, s in new.items() if n not in self._clean)
                if not self._room(missing + (0 if target.loaded else target.size), {target}):
                    raise BudgetError(f"Activating {target.name!r} needs {missing:,} bytes of clean copies beside "
                                      "its residents, over the budget; raise budget_bytes.")
                target.load()
                for n, s in new.items():
                    if n not in self._clean:  # s is unmodified here (slots without a copy are never written)
                        self._clean[n] = s.tensor.clone()
            finally:
                target.leases -= 1
        with torch.no_grad():
            for n in self._modified | set(new):
                live = new[n].tensor if n in new else self._index.slots[n].tensor
                if n in new:
                    target.write(live, n, self._clean[n], alpha)
                else:
                    live.copy_(self._clean[n])
        self._modified = set(new)
        self._active = None if target is None else (target, alpha)

    def _clean_sha(self, slot: Slot) -> str:
        if slot.name not in self._hashes:
            t = self._clean[slot.name] if slot.name in self._modified else slot.tensor
            self._hashes[slot.name] = _sha(t)
        return self._hashes[slot.name]

    def _get(self, name: str) -> Version:
        try:
            return self._names[name]
        except (KeyError, TypeError):
            held = ", ".join(sorted(self._names)) or "nothing"
            raise ExpertNotFoundError(f"No expert {name!r} in this pool (it holds {held}); add it with "
                                      "pool.add(name, source).") from None

    def _free_name(self, name: str) -> None:
        if name in self._names:
            raise ExpertExistsError(f"The pool already holds an expert named {name!r}; use pool.replace({name!r}, "
                                    "source) for a new version, or another name.")

    def _drop(self, version: Version) -> None:
        version.drop()
        self._hooks.batches.clear()  # prepared LoRA batches hold residents: let them go too

    def _release(self, version: Version) -> None:
        version.leases -= 1
        version.last_used = time.monotonic()
        self._reap(version)

    def _reap(self, version: Version) -> None:
        if version.retired and version.leases == 0 and version in self._versions:
            self._drop(version)
            self._versions.remove(version)


def _same(state: tuple[Version, float] | None, other: tuple[Version, float] | None) -> bool:
    if state is None or other is None:
        return state is other
    return state[0] is other[0] and state[1] == other[1]


def _nb(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _open(source: Any) -> Artifact:
    if isinstance(source, Artifact):
        return source
    ref = os.fspath(source)
    if "://" not in ref and Path(ref).exists():
        return Artifact.load(ref)
    from deltahub.registry import Registry

    return Registry().resolve(ref)
