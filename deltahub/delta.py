"""Delta extraction: line up a fine-tuned checkpoint with its base and compute Δ = θ_ft − θ_base.

Names are aligned across model wrappers: a fine-tuned ``BertForSequenceClassification`` saves
``bert.embeddings...`` where the base ``BertModel`` has ``embeddings...`` (the ``base_model_prefix``).
Tensors only in the fine-tuned model (a new head) or with a new shape (a resized vocabulary) are stored
whole as replacements; tensors only in the base are kept as they are; unchanged tensors are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from deltahub.checkpoint import Checkpoint
from deltahub.codecs import DeltaSource
from deltahub.errors import NothingMatchedError


@dataclass(frozen=True)
class Pair:
    name: str  # fine-tuned name
    base_name: str | None
    op: str  # "add" (same shape in base) or "replace" (new, or shape changed)


@dataclass
class Plan:
    pairs: list[Pair]
    prefix: dict[str, str]  # {"strip": p}: ft name = p + base name; {"add": p}: base name = p + ft name
    only_in_base: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return sum(p.op == "add" for p in self.pairs)

    @property
    def new(self) -> int:
        return sum(p.base_name is None for p in self.pairs)

    @property
    def replaced(self) -> int:
        return sum(p.op == "replace" and p.base_name is not None for p in self.pairs)


def _candidates(keys: list[str]) -> set[str]:
    return {k.split(".", 1)[0] + "." for k in keys if "." in k}


def align(base: Checkpoint, ft: Checkpoint) -> Plan:
    """Match fine-tuned names to base names, trying no prefix, then each wrapper prefix either way.

    Raises:
        NothingMatchedError: no tensor name matches under any prefix.
    """
    base_keys, ft_keys = set(base.keys()), ft.keys()
    options: list[tuple[dict[str, str], dict[str, str]]] = [({}, {k: k for k in ft_keys if k in base_keys})]
    for p in sorted(_candidates(ft_keys)):  # ft wraps the base: "bert.x" -> "x"
        options.append(({"strip": p}, {k: k[len(p):] for k in ft_keys if k.startswith(p) and k[len(p):] in base_keys}))
    for p in sorted(_candidates(list(base_keys))):  # base wraps the ft: "x" -> "model.x"
        options.append(({"add": p}, {k: p + k for k in ft_keys if p + k in base_keys}))
    prefix, mapping = max(options, key=lambda o: len(o[1]))  # first wins ties: identity preferred
    if not mapping:
        raise NothingMatchedError(
            f"No tensor of the fine-tuned checkpoint ({len(ft_keys)} tensors) matches the base "
            f"({len(base_keys)} tensors), even across wrapper prefixes. Check that --base is the model it was tuned from."
        )
    pairs = []
    for k in ft_keys:
        b = mapping.get(k)
        if b is None and ft.alias_of(k) is not None:
            continue  # a tied copy (GPT-2's lm_head of wte) the base file lacks: its delta is its twin's
        same = b is not None and base.info(b)[1] == ft.info(k)[1]
        pairs.append(Pair(k, b, "add" if same else "replace"))
    used = set(mapping.values())
    return Plan(pairs, prefix, sorted(base_keys - used))


def exact_delta(ft_t: torch.Tensor, base_t: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """(θ_ft − θ_base, exact) in fp32 where that round-trips exactly, else fp64; (None, True) if unchanged.

    ``exact`` says whether base + Δ rounds back to θ_ft bit for bit. For bf16/fp16 weights the fp32
    difference is exact; for fp32 weights a few elements usually need fp64 (when θ crosses zero,
    Sterbenz's lemma no longer holds); fp64 is exact unless the two values are more than 2**29 apart in
    scale, which a lossless codec then handles by storing the tensor whole.
    """
    if torch.equal(ft_t, base_t):
        return None, True
    b = base_t.to(torch.float64)
    d64 = ft_t.to(torch.float64) - b
    d32 = d64.float()
    if torch.equal((b + d32.double()).to(ft_t.dtype), ft_t):
        return d32, True
    return d64, torch.equal((b + d64).to(ft_t.dtype), ft_t)


class CheckpointDelta(DeltaSource):
    """The ``add`` deltas of a plan, computed one tensor at a time on each iteration."""

    def __init__(self, base: Checkpoint, ft: Checkpoint, plan: Plan):
        self.base, self.ft, self.plan = base, ft, plan

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for p in self.plan.pairs:
            if p.op != "add" or not self.ft.info(p.name)[0].is_floating_point:
                continue
            d, _ = exact_delta(self.ft.get(p.name), self.base.get(p.base_name))
            if d is not None:
                yield p.name, d.float()
