"""R4: a delta is refused on every base it was not made from, before anything is written or changed.

Each wrong base is a variant of the right one (one tensor nudged, renamed, reshaped, re-cast, another seed,
the fine-tune itself, ...), tried through every way a user applies an expert: a model file with ``-o``, a
state dict, an ``nn.Module`` in place, and the ExpertPool. Casts the fingerprint records (bf16, fp16) and
extra untouched tensors must pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltahub
from deltahub.errors import BaseMismatchError, CheckpointError
from deltahub.serving import ExpertPool
from deltahub.testing import pico_pair

Variant = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _nudge(name: str, where: int = 0, by: float = 1e-3) -> Variant:
    def go(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = sd[name].clone()
        t.view(-1)[where] += by
        return {**sd, name: t}
    return go


def _lsb(name: str) -> Variant:
    def go(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = sd[name].clone()
        t.view(-1).view(torch.int32)[7] ^= 1  # one mantissa bit: ~1e-7 relative
        return {**sd, name: t}
    return go


def _rename(name: str) -> Variant:
    return lambda sd: {("renamed." + k if k == name else k): v for k, v in sd.items()}


def _drop(name: str) -> Variant:
    return lambda sd: {k: v for k, v in sd.items() if k != name}


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], name: str | None = None) -> Variant:
    return lambda sd: {k: (fn(v) if name in (None, k) else v) for k, v in sd.items()}


def _seed(seed: int) -> Variant:
    def go(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}
    return go


WRONG: dict[str, Variant] = {
    "layer.0.weight nudged by 1e-3": _nudge("layer.0.weight"),
    "layer.0.weight last element nudged": _nudge("layer.0.weight", where=-1),
    "layer.0.bias nudged": _nudge("layer.0.bias"),
    "layer.1.weight nudged": _nudge("layer.1.weight"),
    "norm.weight nudged": _nudge("norm.weight"),
    "one mantissa bit of layer.0.weight": _lsb("layer.0.weight"),
    "one mantissa bit of layer.1.weight": _lsb("layer.1.weight"),
    "layer.0.weight renamed": _rename("layer.0.weight"),
    "layer.1.weight missing": _drop("layer.1.weight"),
    "layer.0.weight transposed": _apply(lambda t: t.t().contiguous(), "layer.0.weight"),
    "layer.0.weight negated": _apply(lambda t: -t, "layer.0.weight"),
    "layer.0.weight rows swapped": _apply(lambda t: t.flip(0).contiguous(), "layer.0.weight"),
    "every tensor scaled by 1.0001": _apply(lambda t: t * 1.0001),
    "norm.weight NaN": _apply(lambda t: torch.full_like(t, float("nan")), "norm.weight"),
    "another seed, same architecture": _seed(1),
    "another seed, bf16": lambda sd: _apply(lambda t: t.to(torch.bfloat16))(_seed(2)(sd)),
    "cast to float64 (not a recorded cast)": _apply(lambda t: t.double()),
    "bf16 cast, then one tensor nudged": lambda sd: _nudge("layer.1.weight", by=0.5)(
        _apply(lambda t: t.to(torch.bfloat16))(sd)),
    "all zeros": _apply(torch.zeros_like),
    "another model (shapes differ)": lambda sd: {"layer.0.weight": torch.randn(32, 40), "head.weight": torch.randn(2, 32)},
}

RIGHT: dict[str, Variant] = {
    "the base itself": lambda sd: sd,
    "bf16 cast of the base": _apply(lambda t: t.to(torch.bfloat16)),
    "fp16 cast of the base": _apply(lambda t: t.to(torch.float16)),
    "the base plus untouched extra tensors": lambda sd: {**sd, "extra.weight": torch.randn(3, 3)},
}


class Pico(torch.nn.Module):
    """A module whose state dict has the pico base's names (and nothing required beyond them)."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        self.layer = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
        self.norm = torch.nn.Module()
        for name, t in sd.items():
            *path, leaf = name.split(".")
            mod: torch.nn.Module = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part) if not part.isdigit() else mod[int(part)]
            mod.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wrong-base")
    base, ft = pico_pair(tmp / "models")
    arts = {c: deltahub.compress(str(ft), base=str(base), codec=c, out=tmp / c, **p)
            for c, p in (("dense", {}), ("compeft", {"density": 0.5}), ("bitdelta", {}))}
    return {"base": load_file(str(base)), "ft": load_file(str(ft)), "arts": arts, "tmp": tmp}


def _write(tmp: Path, sd: dict[str, torch.Tensor]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"))
    return tmp / "model.safetensors"


def _cases():
    cases = [(name, "dense") for name in WRONG] + [("the fine-tune itself", "dense")]
    cases += [(name, codec) for name in list(WRONG)[:4] for codec in ("compeft", "bitdelta")]
    return cases


@pytest.mark.parametrize("variant,codec", _cases())
def test_a_wrong_base_is_refused_everywhere_and_nothing_changes(world, tmp_path, variant, codec):
    art = world["arts"][codec]
    sd = world["ft"] if variant == "the fine-tune itself" else WRONG[variant](world["base"])
    path = _write(tmp_path / "base", sd)
    out = tmp_path / "merged"
    with pytest.raises(BaseMismatchError, match="does not match"):
        deltahub.apply(art, str(path), out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no output, no temp folder beside it
    snapshot = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(BaseMismatchError):
        deltahub.apply(art, sd)
    assert all(torch.equal(sd[k], snapshot[k]) or (sd[k].isnan() == snapshot[k].isnan()).all() for k in sd)
    if {"layer.0.weight", "norm.weight"} <= set(sd):  # a module can be built from it
        model = Pico(sd)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises((BaseMismatchError, CheckpointError)):
            deltahub.apply(art, model)
        with pytest.raises(BaseMismatchError):
            ExpertPool(model).add("x", art)
        after = model.state_dict()
        assert all(torch.equal(after[k], before[k]) or after[k].isnan().all() for k in before)


@pytest.mark.parametrize("variant", list(RIGHT))
def test_the_right_base_and_its_recorded_casts_pass(world, tmp_path, variant):
    art = world["arts"]["dense"]
    sd = RIGHT[variant](world["base"])
    merged = deltahub.apply(art, sd)
    for k, t in world["ft"].items():
        half = sd[k].dtype != torch.float32  # merged in fp32, cast once: within one ulp of the half type
        assert merged[k].dtype == sd[k].dtype
        torch.testing.assert_close(merged[k].float(), t, rtol=1e-2 if half else 1e-6, atol=1e-2 if half else 1e-6)
