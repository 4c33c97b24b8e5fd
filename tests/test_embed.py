"""Sentence embeddings (``neo_jax.embed``, ``neo-jax embed``) against sentence-transformers' own ``encode``, on a
random-weight GPT-Neo saved in SGPT's layout by sentence-transformers itself, in float32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import neo_jax
from neo_jax import embed
from neo_jax.cli import main
from neo_jax.source import config_of
from tests.conftest import GPT2_VOCAB, TOKENIZER_DIR, make_hf_model

TOL = 1e-4  # relative to the reference's largest magnitude
TEXTS = [
    "Hello world",
    "A much longer sentence about cats and dogs, which goes on for a while",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 12,  # past max_seq_length (48): cut
    "Ünïcödé and emoji 🎉 survive the byte-level tokenizer",
]


def save_sgpt(directory: Path, pooling: str = "weightedmean", normalize: bool = False) -> Path:
    """A 2-layer GPT-Neo with GPT-2's vocabulary as sentence-transformers saves SGPT: ``GPTNeoModel`` weights,
    ``modules.json``, ``sentence_bert_config.json`` and ``1_Pooling/config.json``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    base = directory.with_name(directory.name + "-base")
    hf = make_hf_model(**GPT2_VOCAB)
    hf.transformer.save_pretrained(base)
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR)
    tokenizer.pad_token = tokenizer.eos_token  # SGPT's: GPT-2's tokenizer has none
    tokenizer.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=48)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    SentenceTransformer(modules=modules + ([Normalize()] if normalize else []), device="cpu").save(str(directory))
    return directory


@pytest.fixture(scope="module")
def sgpt(tmp_path_factory) -> Path:
    return save_sgpt(tmp_path_factory.mktemp("sgpt") / "sgpt")


def reference(directory: Path, texts, pooling: str | None = None, batch_size: int = 2) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(directory), device="cpu")
    if pooling is not None:
        model[1].pooling_mode = {"last": "lasttoken"}.get(pooling, pooling)
    return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True)


def close(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def test_recipe_comes_from_the_sentence_transformers_layout(sgpt, tmp_path):
    config = config_of(sgpt)
    assert embed.recipe_of(sgpt, config) == embed.Recipe("weightedmean", False, 48)
    plain = tmp_path / "plain"
    make_hf_model().save_pretrained(plain)
    assert embed.recipe_of(plain, config_of(plain)) == embed.Recipe("mean", False, 256)
    # sentence-transformers' older Pooling config (SGPT's as published): one boolean per mode
    old = tmp_path / "old"
    (old / "1_Pooling").mkdir(parents=True)
    (old / "modules.json").write_text((sgpt / "modules.json").read_text())
    (old / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 300, "do_lower_case": False}))
    legacy = {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": False}
    (old / "1_Pooling" / "config.json").write_text(json.dumps(legacy | {"pooling_mode_lasttoken": True}))
    assert embed.recipe_of(old, config) == embed.Recipe("last", False, 256)  # 300 is past the model's positions
    (old / "1_Pooling" / "config.json").write_text(json.dumps(legacy | {"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="pooling cls is not one neo_jax computes"):
        embed.recipe_of(old, config)


@pytest.mark.parametrize("pooling", ["weightedmean", "mean", "last"])
def test_encode_equals_sentence_transformers(sgpt, pooling):
    """Batches of mixed lengths (padded on the right, to different widths), a text cut at max_seq_length."""
    ours = neo_jax.encode(str(sgpt), TEXTS, pooling=pooling, batch_size=2)
    theirs = reference(sgpt, TEXTS, pooling)
    assert ours.shape == (len(TEXTS), 64) and ours.dtype == np.float32
    assert close(ours, theirs) < TOL


def test_encode_normalizes_layers_and_one_string(sgpt, tmp_path):
    normalized_dir = save_sgpt(tmp_path / "normalized", pooling="mean", normalize=True)
    assert embed.recipe_of(normalized_dir, config_of(normalized_dir)).normalize
    ours = neo_jax.encode(str(normalized_dir), TEXTS)
    assert close(ours, reference(normalized_dir, TEXTS)) < TOL
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)
    # an earlier layer's states, cross-checked with transformers' hidden_states and a mean in NumPy
    model = neo_jax.from_pretrained(sgpt, progress=False)
    hf = transformers.GPTNeoModel.from_pretrained(sgpt).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(sgpt)
    ids = tokenizer(TEXTS[1])["input_ids"]
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for layer in (0, 1, -1):
        ours = neo_jax.encode(model, TEXTS[1], pooling="mean", layer=layer)
        assert ours.shape == (64,)
        assert close(ours, states[layer][0].mean(0).numpy()) < TOL


def test_embed_command_writes_rows_in_corpus_order_and_resumes(sgpt, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "through", "fields", "of", "green", "grass"]
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 70)))) for _ in range(45)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out.npy"
    command = ["embed", "--model", str(sgpt), "--data", str(corpus), "--output", str(out), "--batch-size", "4"]
    monkeypatch.setattr(embed, "WINDOW", 16)
    real_run, calls = embed.Embedder.run, []

    def interrupted(self, token_lists):  # Ctrl-C in the second window's second batch
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_run(self, token_lists)

    monkeypatch.setattr(embed.Embedder, "run", interrupted)
    assert main(command) == 130
    assert not out.exists() and (tmp_path / ".out.npy.embed-state.json").is_file()
    assert json.loads((tmp_path / ".out.npy.embed-state.json").read_text())["done"] == 16
    monkeypatch.setattr(embed.Embedder, "run", real_run)
    capsys.readouterr()
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "continuing out.npy: 16 of 45 documents were embedded" in captured.err
    summary = json.loads(captured.out)
    assert summary["documents"] == 45 and summary["pooling"] == "weightedmean" and summary["truncated"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out.npy"]  # nothing else left
    rows = np.load(out, mmap_mode="r")
    assert rows.dtype == np.float32 and rows.shape == (45, 64)
    assert close(rows, reference(sgpt, texts, batch_size=32)) < TOL
    # a finished output is not written over without --overwrite; with it, once more from the start
    assert main(command) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*command, "--overwrite", "--pooling", "last", "--normalize"]) == 0
    again = np.load(out)
    assert (
        close(again, reference(sgpt, texts, "last") / np.linalg.norm(reference(sgpt, texts, "last"), axis=1)[:, None])
        < TOL
    )


def test_embed_command_refuses_bad_input_in_one_line(sgpt, tmp_path, capsys):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("one document")
    (tmp_path / "taken.npy").write_bytes(b"x")
    base = ["embed", "--model", str(sgpt), "--data", str(corpus)]
    cases = [
        (["--output", str(tmp_path / "out.txt")], "must name a .npy file"),
        (["--output", str(tmp_path / "taken.npy")], "already exists; pass --overwrite"),
        (["--output", str(tmp_path / "no" / "out.npy")], "does not exist: create it first"),
        (["--output", str(tmp_path / "o.npy"), "--layer", "3"], "--layer must be in [-3, 3)"),
        (["--output", str(tmp_path / "o.npy"), "--max-length", "257"], "more than the model's 256 positions"),
        (["--output", str(tmp_path / "o.npy"), "--max-length", "0"], "--max-length must be"),
        (["--output", str(tmp_path / "o.npy"), "--batch-size", "0"], "--batch-size must be"),
        (["--output", str(tmp_path / "o.npy"), "--data", str(tmp_path / "missing.txt")], "no data file matches"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.txt", "taken.npy"]
    assert (tmp_path / "taken.npy").read_bytes() == b"x"
