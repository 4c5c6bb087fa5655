"""Binding an expert to a live model: which parameter each term changes, and proof that it is the base.

Names are hints, hashes are proof (DESIGN §2.2). An artifact names tensors as its base checkpoint did
(``embeddings.word_embeddings.weight`` for a bare ``BertModel``); the model in a pool may wrap that base
(``bert.embeddings.word_embeddings.weight`` in ``BertForSequenceClassification``) or be the bare base of a
wrapped fine-tune. One prefix shift, chosen by the recorded fingerprint names, maps every name; then the
sha256 of each touched tensor of the clean model must match the record (or its bf16/fp16 cast).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deltahub.artifact import Artifact, Term
from deltahub.checkpoint import dtype_name
from deltahub.errors import BaseMismatchError, UnservableExpertError
from deltahub.fingerprint import _matches
from deltahub.manifest import BaseTensor

#: how an on-the-fly forward hook serves a changed tensor, by the module that owns it
USES = ("linear", "conv1d", "embedding", "bias", "other")


@dataclass(frozen=True)
class Slot:
    """One tensor of the model (tied names share one slot) and the modules that read it."""

    name: str  # the first name it has in ``model.state_dict()``
    tensor: torch.Tensor  # the live storage (``param.data``)
    uses: tuple[tuple[str, str, str], ...]  # (module path, attribute, use) per owner


@dataclass(frozen=True)
class Change:
    """One term of an expert bound to a slot: ``add`` (a delta) or ``replace`` (a whole tensor, same shape)."""

    slot: Slot
    term: Term
    op: str


def _use(module: torch.nn.Module, attr: str) -> str:
    conv1d = type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers' GPT-2 layer
    if attr == "weight" and isinstance(module, torch.nn.Linear):
        return "linear"
    if attr == "weight" and conv1d:
        return "conv1d"
    if attr == "weight" and isinstance(module, torch.nn.Embedding) and module.max_norm is None:
        return "embedding"
    if attr == "bias" and (isinstance(module, torch.nn.Linear) or conv1d):
        return "bias"
    return "other"


class ModelIndex:
    """Every parameter and buffer of a model by name, tied names folded into one :class:`Slot`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        owners: dict[tuple[int, int, tuple[int, ...]], list[tuple[str, str, str, torch.Tensor]]] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            for attr, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is None:
                    continue
                key = (t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t), t.storage_offset(),
                       tuple(t.shape))
                owners.setdefault(key, []).append((path, attr, _use(module, attr), t))
        self.slots: dict[str, Slot] = {}  # every name (aliases included) -> its slot
        for entries in owners.values():
            names = [f"{p}.{a}" if p else a for p, a, _, _ in entries]
            uses = tuple(dict.fromkeys((p, a, u) for p, a, u, _ in entries))
            slot = Slot(names[0], entries[0][3].data, uses)
            for n in names:
                self.slots[n] = slot

    def shift(self, names: list[str]) -> Callable[[str], str]:
        """The one prefix change (add ``p.`` or strip ``p.``) that maps most of ``names`` to model names."""
        votes: Counter[tuple[str, str]] = Counter()
        model_names = list(self.slots)
        for n in names:
            if n in self.slots:
                votes[("", "")] += 1
                continue
            for m in model_names:
                if m.endswith("." + n):
                    votes[("add", m[: -len(n)])] += 1
                elif n.endswith("." + m):
                    votes[("strip", n[: -len(m)])] += 1
        if not votes:
            return lambda n: n
        how, p = votes.most_common(1)[0][0]
        if how == "add":
            return lambda n: p + n
        if how == "strip":
            return lambda n: n.removeprefix(p)
        return lambda n: n


def verify(art: Artifact, index: ModelIndex, shift: Callable[[str], str], clean_sha: Callable[[Slot], str]) -> None:
    """Check the model's clean tensors against the artifact's base fingerprint.

    Raises:
        BaseMismatchError: a touched tensor is missing, reshaped or differs (names how many matched).
    """
    recorded = art.manifest.base.tensors
    bad = []
    for r in recorded:
        slot = index.slots.get(shift(r.name))
        given = None if slot is None else BaseTensor(name=r.name, dtype=dtype_name(slot.tensor.dtype),
                                                     shape=list(slot.tensor.shape), sha256=clean_sha(slot))
        if given is None or not _matches(r, given):
            bad.append(r.name)
    if bad:
        good = len(recorded) - len(bad)
        what = "none" if good == 0 else f"only {good}"
        raise BaseMismatchError(
            f"This model does not match expert {art.name!r}: {what} of its {len(recorded)} touched tensors match "
            f"(first mismatch: {bad[0]!r}). Load the base it was made from (see `deltahub inspect`); nothing was added."
        )


def bind(art: Artifact, index: ModelIndex, clean_sha: Callable[[Slot], str]) -> list[Change]:
    """The expert's terms on the model's slots, after :func:`verify`; tied tensors get one change.

    A term on a tensor the base lacks (a new classification head) binds by its fine-tuned name to a model
    tensor of the same shape, as a replacement: the head of a pool's model is not part of the base.

    Raises:
        BaseMismatchError: see :func:`verify`.
        UnservableExpertError: a term adds or reshapes a tensor the model has no place for.
    """
    shift = index.shift([r.name for r in art.manifest.base.tensors])
    verify(art, index, shift, clean_sha)
    changes: dict[str, Change] = {}
    for term in art.terms():
        slot = _slot_of(index, shift, term)
        if slot is None or tuple(slot.tensor.shape) != tuple(term.shape):
            where = "the model has no tensor of that name" if slot is None else \
                f"the model's is {list(slot.tensor.shape)}, the expert's {list(term.shape)}"
            raise UnservableExpertError(
                f"Expert {art.name!r} changes the model's structure at {term.name!r} ({where}); a pool serves "
                "experts in place. Apply it to a state dict with deltahub.apply and load that model instead."
            )
        op = "replace" if term.op == "replace" or term.base_name is None else "add"
        changes.setdefault(slot.name, Change(slot, term, op))  # a tied tensor is changed once
    return list(changes.values())


def _slot_of(index: ModelIndex, shift: Callable[[str], str], term: Term) -> Slot | None:
    if term.base_name is not None:
        return index.slots.get(shift(term.base_name))
    for n in (term.name, shift(term.name)):
        if n in index.slots:
            return index.slots[n]
    hits = {s.name: s for m, s in index.slots.items() if m.endswith("." + term.name)}
    return next(iter(hits.values())) if len(hits) == 1 else None


def describe_uses(changes: list[Change]) -> dict[str, Any]:
    """How many changes each on-the-fly path serves (for ``ExpertPool.stats``)."""
    return dict(Counter(u for c in changes for _, _, u in c.slot.uses))
