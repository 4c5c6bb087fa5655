"""ExpertPool on small models: merged swaps bit-exact, routed rows equal merged models, budget, leases, races.

Real models (all-MiniLM-L6-v2, a GPT-2 decoder with ``generate``, PEFT LoRA experts) are in
test_pool_models.py; this file holds the pool's own contract on a tiny net that runs in seconds.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch

import deltahub
from deltahub import ExpertPool
from deltahub.errors import (
    BaseMismatchError,
    BudgetError,
    ExpertExistsError,
    ExpertNotFoundError,
    ModeError,
    UnservableExpertError,
)

CODECS = {"dense": {}, "compeft": {"density": 0.3}, "dare": {"p": 0.7, "seed": 3}, "bitdelta": {}}
# Linear rows are x·W₀ᵀ + x·Δᵀ in fp32 against x·(W₀+Δ)ᵀ: equal up to rounding of the two sums
ROW_TOL = {"rtol": 1e-5, "atol": 1e-5}


class Tiny(torch.nn.Module):
    """Embedding → Linear → LayerNorm → GELU → Linear: every on-the-fly path of the pool."""

    def __init__(self, vocab: int = 50, dim: int = 24, out: int = 5):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc1 = torch.nn.Linear(dim, 2 * dim)
        self.norm = torch.nn.LayerNorm(2 * dim)
        self.fc2 = torch.nn.Linear(2 * dim, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.fc1(self.emb(ids)))
        return self.fc2(torch.nn.functional.gelu(h)).mean(dim=1)


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def finetune(base: torch.nn.Module, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The base's state dict with every tensor moved (as a full fine-tune does)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}


def expert(tmp_path: Path, base: torch.nn.Module, codec: str, seed: int, *, scale: float = 0.05,
           **params) -> deltahub.Artifact:
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    return deltahub.compress(finetune(base, seed, scale), base=sd, codec=codec, out=tmp_path / f"{codec}-{seed}",
                             name=f"{codec}-{seed}", **(params or CODECS[codec]))


def merged(art: deltahub.Artifact, alpha: float = 1.0) -> torch.nn.Module:
    """The reference: deltahub.apply on a fresh copy of the base (``tiny(0)``, never the pool's live model)."""
    m = tiny()
    deltahub.apply(art, m, alpha=alpha)
    return m.eval()


def snapshot(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().clone().contiguous().view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


IDS = torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(9))


@pytest.fixture
def setup(tmp_path: Path):
    base = tiny()
    arts = {c: expert(tmp_path, base, c, seed) for seed, c in enumerate(CODECS, start=1)}
    return base, arts


def test_routed_rows_equal_each_experts_merged_model(setup) -> None:
    base, arts = setup
    pool = ExpertPool(base)
    for c, a in arts.items():
        pool.add(c, a)
    names = ["dense", None, "compeft", "dare", "bitdelta", "dense"]
    want = torch.stack([(base if n is None else merged(arts[n]))(IDS[i:i + 1])[0]
                        for i, n in enumerate(names)])
    before = snapshot(base)
    with torch.no_grad(), pool.route(names) as served:
        got = base(IDS)
    assert served == [None if n is None else pool.stats()["experts"][n]["id"] for n in names]
    torch.testing.assert_close(got, want, **ROW_TOL)
    assert snapshot(base) == before  # on-the-fly mode leaves the base untouched
    with torch.no_grad():
        assert torch.equal(base(IDS), tiny()(IDS))  # and the hooks are idle outside route


def test_routed_embedding_rows_are_bit_exact(setup) -> None:
    base, arts = setup
    pool = ExpertPool(base)
    for c, a in arts.items():
        pool.add(c, a)
    names = list(CODECS) + [None, "dare"]
    for i, n in enumerate(names):
        ref = base if n is None else merged(arts[n])
        with torch.no_grad(), pool.route([n]):
            got = base.emb(IDS[i:i + 1])
        assert torch.equal(got, ref.emb(IDS[i:i + 1]))


def test_activate_matches_apply_and_restores_the_base_bit_for_bit(setup) -> None:
    base, arts = setup
    before = snapshot(base)
    pool = ExpertPool(base)
    for c, a in arts.items():
        pool.add(c, a)
    for c, a in arts.items():
        pool.activate(c, alpha=0.5)
        assert pool.active == c
        assert snapshot(base) == snapshot(merged(a, alpha=0.5))
    pool.activate(None)
    assert pool.active is None and snapshot(base) == before


def test_thousand_random_swaps_then_base_is_bit_exact(setup, tmp_path: Path) -> None:
    base, arts = setup
    before = snapshot(base)
    pool = ExpertPool(base)
    for c, a in arts.items():
        pool.add(c, a)
    pool.add("dense-small", expert(tmp_path, base, "dense", 11, scale=1e-4))  # deltas below W's ulp in places
    rng = random.Random(0)
    choices = [*pool.names, None]
    for _ in range(1000):
        pool.activate(rng.choice(choices), alpha=rng.choice([1.0, 0.5, -1.0, 3.0, rng.uniform(-2, 2)]))
    pool.activate(None)
    assert snapshot(base) == before


def test_add_refuses_an_expert_for_another_base(tmp_path: Path) -> None:
    other = tiny(seed=7)
    art = expert(tmp_path, other, "dense", 1)
    base = tiny()
    pool = ExpertPool(base)
    with pytest.raises(BaseMismatchError) as e:
        pool.add("x", art)
    assert str(e.value) == ("This model does not match expert 'dense-1': only 2 of its 7 touched tensors match (first "
                            "mismatch: 'emb.weight'). Load the base it was made from (see `deltahub inspect`); "
                            "nothing was added.")
    assert len(pool) == 0 and pool.used_bytes == 0


def test_bf16_model_is_recognised(setup) -> None:
    _, arts = setup
    half = tiny().to(torch.bfloat16)
    pool = ExpertPool(half)
    pool.add("compeft", arts["compeft"])
    with torch.no_grad():
        pool.activate("compeft")
        ref = merged(arts["compeft"]).to(torch.bfloat16)
        for k, v in half.state_dict().items():
            torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-2, atol=1e-2)
        pool.activate(None)
    assert snapshot(half) == snapshot(tiny().to(torch.bfloat16))


def test_pinned_errors(setup) -> None:
    base, arts = setup
    pool = ExpertPool(base)
    pool.add("dense", arts["dense"])
    with pytest.raises(ExpertExistsError, match=r"^The pool already holds an expert named 'dense'; use "
                                                r"pool.replace\('dense', source\) for a new version, or another "
                                                r"name.$"):
        pool.add("dense", arts["compeft"])
    with pytest.raises(ExpertNotFoundError, match=r"^No expert 'nope' in this pool \(it holds dense\); add it "
                                                  r"with pool.add\(name, source\).$"):
        pool.activate("nope")
    with pytest.raises(ExpertNotFoundError), pool.route(["dense", "nope"]):
        pass
    pool.activate("dense")
    with pytest.raises(ModeError, match=r"^'dense' is merged into the weights \(merged mode\); call "
                                        r"pool.activate\(None\) before routing batches.$"), pool.route(["dense"]):
        pass
    pool.activate(None)
    with pool.route(["dense", None, "dense"]):
        with pytest.raises(ModeError, match="^This thread is already inside pool.route; nest no routes"), \
                pool.route([None]):
            pass
        with pytest.raises(ModeError, match=r"^module 'emb' ran on a batch of 4 rows while 3 names are routed; "
                                            r"pass one name per batch row to pool.route.$"):
            base(IDS[:4])
    small = ExpertPool(tiny(), budget_bytes=1000)
    with pytest.raises(BudgetError, match=r"^Expert 'big' needs [\d,]+ bytes resident; the pool's budget is "
                                          r"1,000. Raise budget_bytes or store the expert with a smaller codec.$"):
        small.add("big", arts["dense"])
    assert len(small) == 0


def test_structure_changes_are_refused_with_nothing_added(tmp_path: Path) -> None:
    base = tiny()
    wide = Tiny(out=7)
    ft = {k: v.clone() for k, v in base.state_dict().items()}
    ft["fc2.weight"], ft["fc2.bias"] = wide.fc2.weight.detach().clone(), wide.fc2.bias.detach().clone()
    ft["fc1.weight"] += 0.1
    art = deltahub.compress(ft, base=base.state_dict(), codec="dense", out=tmp_path / "wide", name="wide")
    pool = ExpertPool(base)
    with pytest.raises(UnservableExpertError, match=r"^Expert 'wide' changes the model's structure at 'fc2\."):
        pool.add("wide", art)
    assert len(pool) == 0 and not pool._hooks.handles


def test_budget_evicts_least_recently_used_and_reloads(setup) -> None:
    base, arts = setup
    probe = ExpertPool(tiny())
    probe.add("c", arts["compeft"])
    one = probe.stats()["experts"]["c"]["bytes"]
    with torch.no_grad(), probe.route(["c"]):
        probe.model(IDS[:1])
    routed = probe.stats()["experts"]["c"]["bytes"]  # residents + on-the-fly forms
    pool = ExpertPool(base, budget_bytes=int(2.5 * routed))
    names = ["a", "b", "c"]
    for n in names:
        pool.add(n, arts["compeft"])
    for n in names:
        with torch.no_grad(), pool.route([n]):
            base(IDS[:1])
    loaded = {n: e["loaded"] for n, e in pool.stats()["experts"].items()}
    assert loaded == {"a": False, "b": True, "c": True}  # a was used least recently
    assert pool.used_bytes <= pool.budget_bytes and one <= routed
    want = merged(arts["compeft"])(IDS[:1])
    with torch.no_grad(), pool.route(["a"]):
        got = base(IDS[:1])
    torch.testing.assert_close(got, want, **ROW_TOL)
    assert pool.stats()["experts"]["a"]["loaded"] and not pool.stats()["experts"]["b"]["loaded"]
    with pytest.raises(BudgetError, match=r"^These 3 experts need [\d,]+ bytes resident together; the pool's "
                                          r"budget is [\d,]+. Route fewer experts per batch or raise budget_bytes.$"), \
            pool.route(names):
        pass


def test_activate_waits_for_running_requests(setup) -> None:
    base, arts = setup
    pool = ExpertPool(base)
    pool.add("dense", arts["dense"])
    pool.add("dare", arts["dare"])
    inside, release, order = threading.Event(), threading.Event(), []

    def request() -> None:
        with pool.using("dense"):
            inside.set()
            release.wait(10)
            order.append(("request done", pool.active))

    t = threading.Thread(target=request)
    t.start()
    inside.wait(10)
    swapper = threading.Thread(target=lambda: (pool.activate("dare"), order.append(("swapped", pool.active))))
    swapper.start()
    time.sleep(0.2)
    assert order == [] and pool.active == "dense"  # the swap waits for the lease
    release.set()
    t.join(10)
    swapper.join(10)
    assert order == [("request done", "dense"), ("swapped", "dare")]


def test_replace_while_a_route_runs_finishes_on_the_old_version(setup, tmp_path: Path) -> None:
    base, arts = setup
    pool = ExpertPool(base)
    old_id = pool.add("x", arts["dense"])
    want_old = merged(arts["dense"])(IDS[:2])
    want_new = merged(arts["bitdelta"])(IDS[:2])
    with torch.no_grad(), pool.route(["x", "x"]) as served:
        new_id = pool.replace("x", arts["bitdelta"])
        got = base(IDS[:2])
        assert len(pool._versions) == 2  # the old one drains
    assert served == [old_id, old_id] and new_id != old_id
    torch.testing.assert_close(got, want_old, **ROW_TOL)
    assert len(pool._versions) == 1 and pool.stats()["experts"]["x"]["id"] == new_id
    with torch.no_grad(), pool.route(["x", None]):
        got = base(IDS[:2])
    torch.testing.assert_close(got[0], want_new[0], **ROW_TOL)
    pool.remove("x")
    assert len(pool) == 0 and pool.used_bytes == 0


def test_remove_of_the_active_expert_restores_the_base(setup) -> None:
    base, arts = setup
    before = snapshot(base)
    pool = ExpertPool(base)
    pool.add("c", arts["compeft"])
    pool.activate("c")
    assert snapshot(base) != before
    pool.remove("c")
    assert pool.active is None and snapshot(base) == before
    pool.close()
    assert snapshot(base) == before


RACE_REQUESTS = int(os.environ.get("DELTAHUB_RACE_REQUESTS", "2000"))  # 10000 for RELIABILITY.md's R12 row


@pytest.mark.parametrize("requests", [0, pytest.param(RACE_REQUESTS, marks=pytest.mark.slow)])
def test_race_rows_always_match_the_version_that_served_them(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             requests: int) -> None:
    """Threads serve mixed batches while experts are replaced and evicted; the slow variant is reliability R12."""
    from deltahub.serving.expert import Version

    drops, drop = [0], Version.drop
    monkeypatch.setattr(Version, "drop", lambda self: (drops.__setitem__(0, drops[0] + 1), drop(self))[1])
    base, arts = setup
    alt = {c: expert(tmp_path, base, c, 20 + i) for i, c in enumerate(CODECS)}
    every = [*arts.values(), *alt.values()]
    want = {a.id: merged(a)(IDS) for a in every}
    want[None] = tiny()(IDS)
    probe = ExpertPool(tiny())
    probe.add("p", arts["dense"])
    pool = ExpertPool(base, budget_bytes=3 * probe.stats()["experts"]["p"]["bytes"], wait_s=30)
    for c, a in arts.items():
        pool.add(c, a)
    stop, errors, checked, refused = threading.Event(), [], [0], [0]

    def serve(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            names = [rng.choice([*CODECS, None]) for _ in range(IDS.shape[0])]
            try:
                with torch.no_grad(), pool.route(names) as served:
                    out = base(IDS)
            except BudgetError:
                refused[0] += 1
                continue  # three versions of four experts cannot always fit at once: a typed refusal
            for i, vid in enumerate(served):
                ref = want[None if vid is None else vid.split("@")[0]][i]
                if not torch.allclose(out[i], ref, **ROW_TOL):
                    errors.append((names[i], vid))
            checked[0] += 1

    def churn() -> None:
        rng = random.Random(99)
        k = 0
        while k < 30 or checked[0] + refused[0] < requests:  # at least 30 replaces, and the requests asked for
            c = rng.choice(list(CODECS))
            pool.replace(c, (alt if k % 2 == 0 else arts)[c])
            k += 1

    workers = [threading.Thread(target=serve, args=(s,)) for s in range(3)]
    for w in workers:
        w.start()
    churn()
    stop.set()
    for w in workers:
        w.join(30)
    print(f"R12: {checked[0]} batches checked, {refused[0]} refused (BudgetError), {len(errors)} wrong rows, "
          f"{drops[0]} versions dropped")  # the RELIABILITY.md row (run with -s)
    assert checked[0] + refused[0] >= requests
    assert errors == [] and checked[0] > 10 and refused[0] < checked[0], (errors[:3], checked, refused)
    assert drops[0] > 30, (drops, checked, refused)  # evictions and drained versions happened under the requests
    assert all(v.leases == 0 for v in pool._versions) and len(pool._versions) == len(CODECS)
    assert pool.used_bytes <= pool.budget_bytes


def test_tied_weights_get_the_delta_once(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    ft = {k: v.clone() for k, v in base.state_dict().items()}
    ft["transformer.wte.weight"] += 0.25
    ft["lm_head.weight"] = ft["transformer.wte.weight"]
    art = deltahub.compress(ft, base=base.state_dict(), codec="dense", out=tmp_path / "tied", name="tied")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.load_state_dict(base.state_dict())
    deltahub.apply(art, model)
    torch.testing.assert_close(model.transformer.wte.weight, ft["transformer.wte.weight"], rtol=0, atol=1e-6)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    pool = ExpertPool(base)
    pool.add("tied", art)
    pool.activate("tied")
    torch.testing.assert_close(base.transformer.wte.weight, ft["transformer.wte.weight"], rtol=0, atol=1e-6)


def test_compress_of_a_tied_module_stores_the_tied_copy_once(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    ft = transformers.GPT2LMHeadModel(cfg).eval()
    ft.save_pretrained(str(tmp_path / "base"))  # writes wte only: lm_head is tied to it
    with torch.no_grad():
        ft.transformer.wte.weight.add_(0.1)
    art = deltahub.compress(ft, base=tmp_path / "base", codec="dense", out=tmp_path / "art")
    assert [e.name for e in art.manifest.tensors] == ["transformer.wte.weight"]
    model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base")).eval()
    deltahub.apply(art, model)
    assert torch.equal(model.lm_head.weight, ft.lm_head.weight)
