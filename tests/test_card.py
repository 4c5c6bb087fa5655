"""Model cards (DESIGN §2.7): rendered from a manifest, checked locally (never ``ModelCard.validate``)."""

from __future__ import annotations

import pytest

pytest.importorskip("huggingface_hub")

import yaml  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402

import deltahub  # noqa: E402
from deltahub.card import check_card, hub_base, is_hub_repo_id, render_card  # noqa: E402
from deltahub.testing import pico_pair  # noqa: E402


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    base, ft = pico_pair(root / "pair")
    return {c: deltahub.compress(ft, base=base, codec=c, out=root / c, name="my-expert") for c in ("dense", "compeft")}


def with_base(manifest, location, **stats):
    base = manifest.base.model_copy(update={"location": location})
    return manifest.model_copy(update={"base": base, "stats": {**manifest.stats, **stats}})


@pytest.fixture(autouse=True)
def no_hub_calls(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("ModelCard.validate calls the Hub; check cards with check_card")

    monkeypatch.setattr(ModelCard, "validate", refuse)


@pytest.mark.parametrize("codec", ["dense", "compeft"])
def test_card_of_compress_output(arts, codec):
    art = arts[codec]
    text = (art.folder / "README.md").read_text()
    assert check_card(text) == []
    assert text == render_card(art.manifest)  # compress writes the same card `deltahub card` prints
    data = ModelCard(text).data.to_dict()
    assert data["library_name"] == "deltahub" and data["tags"][:2] == ["deltahub", codec]
    assert "base_model" not in data and "base_model_relation" not in data  # a local base file is never claimed
    assert data["deltahub"]["codec"] == codec and data["deltahub"]["base_fingerprint"] == art.manifest.base.fingerprint
    assert "deltahub pull" not in text and "deltahub apply ./my-expert --base BASE_MODEL_DIR -o merged/" in text
    assert 'deltahub.load("my-expert")' in text


def test_card_figures_paper_and_commands(arts):
    m = arts["compeft"].manifest
    s = m.stats
    text = render_card(with_base(m, {"type": "hub", "repo": "org/base-model", "revision": "v1.0"},
                                 fidelity={"accuracy": 0.9125, "agreement": {"top1": 0.97}}), repo_id="team/expert")
    assert check_card(text) == []
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["base_model"] == "org/base-model" and data["base_model_relation"] == "finetune"
    assert data["deltahub"]["fidelity"] == {"accuracy": 0.9125, "agreement.top1": 0.97}
    assert data["deltahub"]["repo"] == "team/expert"
    for shown in ("[ComPEFT (sparse ternary)](https://arxiv.org/abs/2311.13171)", "| tensors per codec | `compeft` ×2 (",
                  f"| bits per parameter | {s['bits_per_param']:.4g} |",
                  f"| ratio vs dense fp16 delta | {s['ratio_vs_fp16']:.4g}× |",
                  f"| relative reconstruction error | {s['rel_error']:.4g} |",
                  "| fidelity | accuracy: 0.9125, agreement.top1: 0.97 |", f"`{m.base.fingerprint}`",
                  "deltahub pull hf://team/expert\n", "hf download org/base-model --revision v1.0 --local-dir BASE_MODEL_DIR",
                  "deltahub apply my-expert --base BASE_MODEL_DIR -o merged/", 'Registry().pull("hf://team/expert")',
                  'deltahub.apply(art, "BASE_MODEL_DIR", out="merged/")'):
        assert shown in card.text, shown
    assert "| fidelity |" not in render_card(m)  # only when measured


def test_card_of_auto_names_the_chosen_codecs(arts, tmp_path):
    from deltahub.card import codecs_used

    base, ft = pico_pair(tmp_path / "pair")
    art = deltahub.compress(ft, base=base, codec="auto", out=tmp_path / "auto", max_error=0.3)
    used = codecs_used(art.manifest)
    assert "auto" not in used and sum(used.values()) == len(art.manifest.tensors)
    text = render_card(art.manifest)
    assert check_card(text) == []
    tags = ModelCard(text).data.to_dict()["tags"]
    assert tags[:2] == ["deltahub", "auto"] and set(used) - {"dense"} <= set(tags)
    assert all(f"`{name}` ×{n}" in text for name, n in used.items())


def test_base_model_only_for_hub_locations(arts):
    m = arts["dense"].manifest
    for location in ({"type": "path", "path": "/models/org/base"}, {"type": "path", "repo": "org/base"},
                     {"type": "hub", "repo": "../../etc"}, {"type": "hub", "repo": "https://hf.co/org/base"}, {}):
        assert hub_base(with_base(m, location)) is None
        assert "base_model" not in ModelCard(render_card(with_base(m, location))).data.to_dict()
    assert hub_base(with_base(m, {"type": "hub", "repo": "org/base"})) == "org/base"
    assert is_hub_repo_id("meta-llama/Llama-3.1-8B") and not is_hub_repo_id("./base") and not is_hub_repo_id("base")


def test_names_are_not_template_code(arts):
    m = arts["dense"].manifest.model_copy(update={"name": "x{{ 7*7 }}{% raw %}"})
    text = render_card(m)
    assert "# x{{ 7*7 }}{% raw %}" in text and check_card(text) == []


def test_non_finite_figures_still_round_trip(arts):
    m = arts["compeft"].manifest
    m = m.model_copy(update={"stats": {**m.stats, "rel_error": float("nan"), "ratio_vs_fp16": float("inf"),
                                       "fidelity": 0.5}})
    text = render_card(m)
    assert check_card(text) == []
    meta = ModelCard(text).data.to_dict()["deltahub"]
    assert meta["rel_error"] is None and meta["ratio_vs_fp16"] is None and meta["fidelity"] == {"value": 0.5}
    assert "| relative reconstruction error | n/a |" in text


def test_round_trip_check(arts, monkeypatch):
    from huggingface_hub import ModelCardData

    good = render_card(arts["dense"].manifest)
    orig = ModelCardData.to_yaml
    monkeypatch.setattr(ModelCardData, "to_yaml", lambda self, *a, **k: orig(self, *a, **k).replace("task-delta", "x"))
    assert check_card(good) == ["the YAML metadata changes when written and read again (ModelCardData -> to_yaml -> parse)"]


def test_check_card_finds_problems(arts):
    good = render_card(arts["compeft"].manifest)
    meta, body = good.split("\n---\n", 1)
    data = yaml.safe_load(meta.removeprefix("---\n"))

    def card(**changes):
        d = {**data, **changes}
        d = {k: v for k, v in d.items() if v is not None}
        return "---\n" + yaml.safe_dump(d, sort_keys=False) + "---\n" + body

    assert check_card(good) == []
    assert check_card("# no metadata\n") == ["the card has no YAML metadata block (it must start with '---')"]
    assert check_card("---\n- a list\n---\nbody")[0].startswith("the card does not parse with huggingface_hub.ModelCard")
    assert check_card("---\na: [\n---\nbody")[0].startswith("the card does not parse with huggingface_hub.ModelCard")
    assert check_card(card(library_name="transformers")) == ["library_name is 'transformers', expected 'deltahub'"]
    assert check_card(card(library_name=None)) == ["required metadata key 'library_name' is missing"]
    assert check_card(card(tags=["compeft"])) == ["tags must be a list that includes 'deltahub'"]
    assert check_card(card(tags=["deltahub"])) == ["tags must include the codec 'compeft'"]
    assert check_card(card(base_model="./local/base", base_model_relation="finetune")) == [
        "base_model './local/base' is not a Hub repo id (org/name); leave it out for local bases"]
    assert check_card(card(base_model="org/base", base_model_relation="delta")) == [
        "base_model_relation must be one of adapter, merge, quantized, finetune"]
    assert check_card(card(base_model_relation="finetune")) == ["base_model_relation is set without base_model"]
    no_fp = {k: v for k, v in data["deltahub"].items() if k != "base_fingerprint"}
    assert check_card(card(deltahub=no_fp)) == ["required metadata key 'deltahub.base_fingerprint' is missing"]
    assert check_card(card(deltahub={**data["deltahub"], "id": "abc"})) == ["deltahub.id must be a sha256 hex digest"]
    # YAML that ModelCard reads differently from the block as written (it drops null values)
    assert check_card(good.replace("library_name: deltahub", "library_name: deltahub\nlicense: null", 1)) == [
        "the YAML block of the card differs from what ModelCard parsed"]


def test_builtin_paper_table_matches_the_codecs():
    """Cards name built-in codecs from a table (no plugin import on push); it must say what the classes say."""
    from deltahub.card import PAPERS
    from deltahub.codecs import get_codec
    from deltahub.discovery import BUILTIN_DISTRIBUTION, entry_points

    builtins = {ep.name for ep in entry_points("deltahub.codecs") if ep.dist and ep.dist.name == BUILTIN_DISTRIBUTION}
    assert builtins <= set(PAPERS)
    for name in builtins:
        cls = get_codec(name)
        assert PAPERS[name] == (cls.pretty_name, getattr(cls, "reference_url", None)), name
