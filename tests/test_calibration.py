"""Calibration activations (deltahub.calibration) and the codecs that use them, end to end on a tiny BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltahub.calibration import Calibration, read_texts
from deltahub.errors import CodecConfigError

WORDS = "the a movie was good bad great terrible i liked it not very".split()


def test_read_texts_accepts_strings_and_objects(tmp_path: Path) -> None:
    f = tmp_path / "cal.jsonl"
    f.write_text('{"text": "one"}\n\n"two"\n{"text": "three", "label": 1}\n"four"\n')
    assert read_texts(f) == ["one", "two", "three", "four"]
    assert read_texts(f, max_texts=2) == ["one", "two"]
    for bad, msg in (("not json\n", "not JSON"), ('{"label": 1}\n', "no text"), ("\n\n", "no texts")):
        f.write_text(bad)
        with pytest.raises(CodecConfigError, match=msg):
            read_texts(f)
    with pytest.raises(CodecConfigError, match="does not exist"):
        read_texts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("tokens", [5, 50])  # fewer rows than features (rows kept) and more (Gram kept)
def test_inner_is_the_output_inner_product(tokens: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 16, generator=g)
    a, b = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    cal = Calibration()
    cal.add("enc.lin", x[: tokens // 2])
    cal.add("enc.lin", x[tokens // 2:].reshape(1, -1, 16))  # leading dims are flattened
    want = float(((x.double() @ a.double().T) * (x.double() @ b.double().T)).sum())
    assert cal.inner("enc.lin.weight", a, b) == pytest.approx(want, rel=1e-10)
    assert cal.inner("model.enc.lin.weight", a, b) == pytest.approx(want, rel=1e-10)  # prefix differs
    assert cal.inner("enc.lin.bias", a, b) is None and cal.inner("other.weight", a, b) is None
    assert cal.inner("enc.lin.weight", a[:, :8], b[:, :8]) is None  # not this layer's in_features
    t = Calibration({"c": x}, transposed={"c"})  # Conv1D: weight stored (in, out)
    assert t.inner("c.weight", a.T, b.T) == pytest.approx(want, rel=1e-10)
    assert cal.tokens("enc.lin") == tokens and cal.modules == ["enc.lin"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny_bert")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = transformers.BertTokenizer(str(root / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    for folder in ("base", "ft"):
        if folder == "ft":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(root / folder)
        tok.save_pretrained(root / folder)
    (root / "cal.jsonl").write_text('{"text": "the movie was good"}\n"i liked it"\n{"text": "not very great"}\n')
    return root


@pytest.fixture(scope="module")
def tiny_cal(tiny_bert: Path) -> Calibration:
    return Calibration.from_jsonl(tiny_bert / "cal.jsonl", tiny_bert / "ft")


@pytest.mark.slow
def test_from_jsonl_records_every_linear_input(tiny_bert: Path, tiny_cal: Calibration) -> None:
    cal = tiny_cal
    assert len(cal) == 13  # 2 layers × 6 linears + pooler
    assert cal.tokens("encoder.layer.0.attention.self.query") == 16  # 6 + 5 + 5 tokens, no padding rows
    w = torch.ones(64, 32)
    assert cal.inner("encoder.layer.0.intermediate.dense.weight", w, w) > 0
    assert cal.inner("encoder.layer.0.output.dense.weight", torch.ones(32, 64), torch.ones(32, 64)) > 0
    with pytest.raises(CodecConfigError, match="model as a folder"):
        Calibration.from_jsonl(tiny_bert / "cal.jsonl", tiny_bert / "ft" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("codec,params,key", [("darex", {"p": 0.9, "q": "auto"}, "q"),
                                              ("bitdelta", {"distill": True}, "scales")])
def test_compress_with_calibration(tiny_bert: Path, tiny_cal: Calibration, tmp_path: Path, codec: str,
                                   params: dict, key: str) -> None:
    import deltahub

    art = deltahub.compress(tiny_bert / "ft", base=tiny_bert / "base", codec=codec, out=tmp_path / "art",
                            calibration=tiny_cal, **params)
    stats = art.manifest.fit_stats
    assert stats["layers"] == 13 and key in stats
    if codec == "darex":
        assert 0.1 <= stats["q"] <= 1 and stats["objective"] <= stats["objective_dare"]
    else:
        assert stats["output_error_distilled"] <= stats["output_error_mean_abs"]
        assert not any("embed" in name for name in stats["scales"])
    merged = deltahub.apply(deltahub.load(tmp_path / "art"), tiny_bert / "base", out=tmp_path / "merged")
    assert merged.exists()


@pytest.mark.slow
def test_cli_compress_darex_with_calibration_file(tiny_bert: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deltahub.cli import cli

    args = ["compress", str(tiny_bert / "ft"), "--base", str(tiny_bert / "base"), "--codec", "darex", "-p", "p=0.9"]
    res = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a"), "--calibration", str(tiny_bert / "cal.jsonl")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "b")])
    assert res.exit_code == 1 and "--calibration FILE" in res.output
