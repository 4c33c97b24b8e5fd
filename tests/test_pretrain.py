"""Pretraining from scratch: GPT-Neo's own init (every tensor's std, attention logits near 1 at init), a tiny
model that learns the English fixture with a tokenizer of its own, exact resume after SIGTERM on prepared data,
and two processes that read disjoint rows of the same global batches."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import neo_jax
from neo_jax import attention as attention_impls
from neo_jax import data, prepare
from neo_jax.config import GPTNeoConfig
from neo_jax.finetune import FinetuneConfig, finetune
from neo_jax.model import gpt_neo_stds, init_model
from tests.conftest import SMALL
from tests.test_distributed import run_two_processes
from tests.test_finetune import launch, metrics, wait_for

ROOT = Path(__file__).parents[1]
ENGLISH = sorted((ROOT / "tests" / "fixtures" / "english").glob("*.txt"))
TINY = SMALL | dict(  # the tests' small GPT-Neo, byte-level, with one layer period
    vocab_size=257,
    num_layers=2,
    attention_types=[[["global", "local"], 1]],
    window_size=32,
    max_position_embeddings=128,
)


def test_gpt_neo_init_draws_every_tensor_with_its_own_std_on_125m():
    config = GPTNeoConfig.preset("125M")
    stds = gpt_neo_stds(config)
    assert stds["q_proj"] == pytest.approx(0.00451, abs=1e-5) and stds["c_proj"] == pytest.approx(0.00577, abs=1e-5)
    model = init_model(config, seed=0)
    seen = set()
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(param.get_value())
        if path[-1] in ("kernel", "embedding"):
            name = next(n for n in path if n in stds)
            seen.add(name)
            assert abs(value.mean()) < 0.05 * stds[name], path
            assert value.std() == pytest.approx(stds[name], rel=0.03), (path, value.std(), stds[name])
            assert np.abs(value).max() > 4.5 * stds[name], path  # plain normals have tails: not truncated
        elif path[-1] == "bias":
            assert not value.any(), path
        else:  # LayerNorm
            assert (value == (1.0 if path[-1] == "scale" else 0.0)).all(), path
    assert seen == set(stds)
    hf = np.asarray(init_model(config, seed=0, init="hf").periods[0].attn.q_proj.kernel[...])
    assert hf.std() == pytest.approx(0.02, rel=0.03)
    with pytest.raises(ValueError, match="init must be one of"):
        init_model(config, init="xavier")


def attention_logit_stds(model, ids) -> np.ndarray:
    """The std of every layer's attention logits ``q @ k^T`` over the positions each query may see."""

    def attention(layer, kind, q, k, v, stds):
        logits = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        t = q.shape[2]
        query, key = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        visible = (key <= query) & ((kind == "global") | (key > query - model.config.window_size))
        visible = jnp.broadcast_to(visible, logits.shape)
        mean = jnp.sum(jnp.where(visible, logits, 0)) / visible.sum()
        std = jnp.sqrt(jnp.sum(jnp.where(visible, (logits - mean) ** 2, 0)) / visible.sum())
        out = attention_impls.self_attention(q, k, v, kind, model.config.window_size, None, "dense")
        return out, stds.at[layer].set(std)

    positions = jnp.arange(ids.shape[1])[None]
    _, stds = nnx.jit(lambda m, x: m.transform(x, positions, attention, jnp.zeros(m.config.num_layers)))(model, ids)
    return np.asarray(stds)


@pytest.mark.slow
def test_attention_logits_start_near_unit_std_with_gpt_neo_init_and_far_above_with_hf():
    """On real text. Each size at its width with 2 layers (the first layers' logits do not depend on depth).
    GPT-Neo does not scale its logits: transformers' N(0, 0.02) init starts them at std ~2.5 (125M) and ~10
    (1.3B, 2.7B); GPT-Neo's own folds the scale into q and starts them near 1."""
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(ROOT / "tests" / "fixtures" / "gpt2-tokenizer")
    ids = jnp.asarray([tokenizer(ENGLISH[0].read_text())["input_ids"][:512]])
    for size, hf_least in (("125M", 2.0), ("1.3B", 6.0), ("2.7B", 6.0)):
        config = dataclasses.replace(
            GPTNeoConfig.preset(size), num_layers=2, attention_types=((("global", "local"), 1),)
        )
        ours = attention_logit_stds(init_model(config, seed=1), ids)
        theirs = attention_logit_stds(init_model(config, seed=1, init="hf"), ids)
        assert ((ours >= 0.5) & (ours <= 2.0)).all(), (size, ours)
        assert (theirs > hf_least).all(), (size, theirs)


def english_paragraphs(directory: Path) -> Path:
    """The fixture as one JSONL document per paragraph (37 of them), so that validation holds whole ones."""
    paragraphs = [p.strip() for f in ENGLISH for p in f.read_text().split("\n\n") if p.strip()]
    path = directory / "english.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return path


def train_bpe(directory: Path) -> Path:
    """A byte-level BPE tokenizer of the fixture (id 0 is <|endoftext|>, then the 256 bytes: no room for merges,
    so the 9,600 characters make 8,700 training tokens; 320 tokens made 5,200, which the tiny model overfits), as
    a transformers tokenizer directory: what someone pretraining on their own corpus brings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=257, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([f.read_text() for f in ENGLISH], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(the prepared fixture, every 8th paragraph held out; the tiny model's config.json)."""
    root = tmp_path_factory.mktemp("pretrain")
    tokenizer = train_bpe(root / "tokenizer")
    out = prepare.prepare(
        [str(english_paragraphs(root))], root / "data", tokenizer, num_proc=1, validation_fraction=0.125, progress=False
    )
    (root / "tiny.json").write_text(json.dumps(TINY))
    return out, root / "tiny.json"


SETTINGS = dict(seq_len=64, batch_size=16, lr=3e-3, final_lr=3e-4, warmup=10, weight_decay=0.1, adam_b2=0.95)


def test_a_tiny_gpt_neo_pretrained_from_scratch_learns_english(prepared, tmp_path):
    directory, config = prepared
    output = tmp_path / "run"
    run = FinetuneConfig.load(
        None,
        model=str(config),
        data=[str(directory)],
        output=str(output),
        steps=150,
        eval_every=50,
        save_every=50,
        dtype="float32",
        export_hf=str(tmp_path / "exported"),
        **SETTINGS,
    )
    result = finetune(run, progress=False)
    assert result["stopped"] == "done"
    tokens = data.TokenData(directory)
    counts = np.bincount(tokens.train.read(0, tokens.train.tokens), minlength=257)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    records = metrics(output)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[0] > evals[-1], evals
    # held-out paragraphs, whole: measured 2.59 nats against a unigram entropy of 3.01 (uniform: 5.55)
    assert evals[-1] < unigram_entropy - 0.3, (evals, unigram_entropy)
    assert records[-1]["tokens_seen"] == 150 * 16 * 64
    assert all(0 < r["mfu"] < 1.5 for r in records)
    assert np.median([r["data_wait_s"] / r["seconds"] for r in records[5:]]) < 0.05

    # the run directory is a model source like any other: tokenizer files from the prepared data
    model = neo_jax.from_pretrained(output, progress=False)
    text = neo_jax.TextGenerator(model, tokenizer=transformers.AutoTokenizer.from_pretrained(output))
    assert isinstance(text("We hold these truths", max_new_tokens=8)[0], str)
    assert neo_jax.cli.main(["convert", str(output), str(tmp_path / "hf"), "--to", "hf"]) == 0
    exported = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "hf").eval()
    for directory in (tmp_path / "hf", tmp_path / "exported"):  # both carry the prepared data's tokenizer
        assert (
            transformers.AutoTokenizer.from_pretrained(directory)("We hold")["input_ids"]
            == text.tokenizer("We hold")["input_ids"]
        )
    ids = np.random.default_rng(0).integers(0, 257, (2, 40))
    with torch.no_grad():
        expected = exported(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4, rtol=1e-4)


def flags(config: Path, directory: Path, output: Path) -> list[str]:
    settings = SETTINGS | dict(steps=12, save_every=3, eval_every=4, dtype="float32")
    return ["train", "--model", str(config), "--data", str(directory), "--output", str(output)] + [
        x for key, value in settings.items() for x in (f"--{key.replace('_', '-')}", str(value))
    ]


def test_sigterm_on_prepared_data_resumes_exactly(prepared, tmp_path):
    directory, config = prepared
    straight = tmp_path / "straight"
    assert neo_jax.cli.main(flags(config, directory, straight)) == 0

    output = tmp_path / "run"
    process = launch(flags(config, directory, output))
    assert wait_for(lambda: (output / "metrics.jsonl").exists() and len(metrics(output)) >= 4, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0 and json.loads(out.splitlines()[-1])["stopped"] == "sigterm", err[-3000:]
    out, err = launch(flags(config, directory, output)).communicate(timeout=300)
    assert json.loads(out.splitlines()[-1])["stopped"] == "done", err[-3000:]
    assert "resuming from step" in err

    records, reference = metrics(output), metrics(straight)
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "grad_norm", "lr", "tokens_seen"):
        np.testing.assert_allclose([r[key] for r in records], [r[key] for r in reference], rtol=1e-6, err_msg=key)
    evals = lambda rs: [(r["step"], r["eval_loss"]) for r in rs if "eval_loss" in r]
    np.testing.assert_allclose(evals(records), evals(reference), rtol=1e-6)
    ours = nnx.to_pure_dict(nnx.state(neo_jax.from_pretrained(output, progress=False), nnx.Param))
    theirs = nnx.to_pure_dict(nnx.state(neo_jax.from_pretrained(straight, progress=False), nnx.Param))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_two_processes_read_disjoint_rows_of_one_process_batches(prepared, tmp_path):
    directory, _ = prepared
    run_two_processes(ROOT / "tests" / "multidevice" / "data_worker.py", directory, tmp_path)
    batches = data.Batches(data.TokenData(directory), seq_len=16, batch_size=8, seed=1)
    read = [json.loads((tmp_path / f"rows-{i}.json").read_text()) for i in range(2)]
    for step in (3, 4, 5):
        mine, theirs = ({tuple(r) for r in rows[str(step)]} for rows in read)
        assert mine and theirs and not mine & theirs, (mine, theirs)  # each reads its own rows only
        covered = sorted(i for a, b in mine | theirs for i in range(a, b))
        assert covered == list(range(8))
        np.testing.assert_array_equal(np.load(tmp_path / f"batch-{step}.npy"), batches.batch(step))


def test_the_pretraining_config_carries_gpt_neo_s_optimizer_and_finds_its_model_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the model config is found beside the YAML, wherever the run starts
    run = FinetuneConfig.load(ROOT / "configs" / "pretrain-125M.yaml", data=["DATA"], output="out")
    assert run.model == str(ROOT / "configs" / "gpt-neo-125M.json")
    assert GPTNeoConfig.from_json_file(run.model) == GPTNeoConfig.preset("125M")
    optimizer = run.optimizer()
    assert (optimizer.b1, optimizer.b2, optimizer.eps, optimizer.weight_decay) == (0.9, 0.95, 1e-8, 0.1)
    assert optimizer.warmup_steps == 3000 and run.seq_len == 2048 and run.topology in ("v4-8", "v5e-8")
