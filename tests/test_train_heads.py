"""``neo-jax train --task sequence-classification|token-classification``: a classifier learns a small synthetic
task far above chance, resumes exactly, converts to transformers' class, and trains as LoRA adapters that PEFT
loads with equal logits; bad input is one line and exit 2 with nothing written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import neo_jax
import neo_jax.hf
from neo_jax import cli
from tests.test_finetune import metrics

GOOD, BAD = ["great", "wonderful", "lovely", "excellent"], ["awful", "terrible", "boring", "horrible"]
FILLER = ["the", "movie", "was", "really", "quite", "a", "film", "and", "the", "actors", "were"]
NAMES = ["Anna", "Bob", "Carl", "Dora", "Emil", "Fred"]
SETTINGS = dict(steps=40, batch_size=16, seq_len=32, lr=1e-3, warmup=4, validation_fraction=0.2, dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A sentiment task (one word decides the label) and a names task (two capitalised names among filler)."""
    rng, directory = random.Random(0), tmp_path_factory.mktemp("labelled")
    with (directory / "sentiment.jsonl").open("w") as f:
        for _ in range(200):
            label = rng.choice(["positive", "negative"])
            words = rng.sample(FILLER, 5) + [rng.choice(GOOD if label == "positive" else BAD)] + rng.sample(FILLER, 3)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    with (directory / "names.jsonl").open("w") as f:
        for _ in range(200):
            words, at = rng.sample(FILLER, 6), rng.randrange(6)
            words[at:at] = rng.sample(NAMES, 2)
            tags = ["O"] * len(words)
            tags[at], tags[at + 1] = "B-PER", "I-PER"
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    return {"sequence-classification": directory / "sentiment.jsonl", "token-classification": directory / "names.jsonl"}


def train_args(model: Path, data: Path, output: Path, task: str, **overrides) -> list[str]:
    out = ["train", "--task", task, "--model", str(model), "--data", str(data), "--output", str(output)]
    for key, value in (SETTINGS | overrides).items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


@pytest.fixture(scope="module")
def sentiment_run(gpt2_model_dir, data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("sentiment") / "run"
    assert cli.main(train_args(gpt2_model_dir, data["sequence-classification"], output, "sequence-classification")) == 0
    return output


def test_a_classifier_learns_reports_its_scores_and_converts(sentiment_run, tmp_path):
    last = metrics(sentiment_run)[-1]
    assert last["eval_accuracy"] >= 0.9 and last["eval_macro_f1"] >= 0.9  # chance is 0.5
    config = json.loads((sentiment_run / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["pad_token_id"] == 50256
    assert json.loads((sentiment_run / "tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"
    assert cli.main(["convert", str(sentiment_run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")  # its pad token saved with it
    batch = tokenizer(["the movie was great", "the actors were awful and a boring film"], padding=True)
    with torch.no_grad():
        theirs = hf(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    ours = neo_jax.from_pretrained(sentiment_run, progress=False)
    assert np.abs(np.asarray(ours(batch["input_ids"], batch["attention_mask"])) - theirs).max() <= 1e-5
    assert theirs.argmax(-1).tolist() == [1, 0] and hf.config.id2label[1] == "positive"
    classify = neo_jax.pipeline("text-classification", model=sentiment_run)
    assert classify("the film was really quite lovely and the actors")[0]["label"] == "positive"


def test_a_resumed_classifier_run_equals_a_straight_one(gpt2_model_dir, data, tmp_path):
    """A run of 12 steps, then the same command with 24, equals a run of 24 (a constant learning rate, so that
    the schedule does not depend on the number of steps)."""
    constant = dict(steps=24, lr=1e-3, final_lr=1e-3, warmup=0, eval_every=6)
    args = lambda output: train_args(
        gpt2_model_dir, data["sequence-classification"], output, "sequence-classification", **constant
    )
    assert cli.main(args(tmp_path / "straight")) == 0
    assert cli.main([*args(tmp_path / "resumed"), "--steps", "12"]) == 0
    assert cli.main(args(tmp_path / "resumed")) == 0  # on to step 24 from the checkpoint at 12
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 25))
    for mine, expected in zip(resumed, straight, strict=True):
        assert mine.keys() == expected.keys()
        for key in {"loss", "grad_norm", "eval_loss", "eval_accuracy"} & set(expected):
            assert mine[key] == pytest.approx(expected[key], rel=1e-5), (mine["step"], key)
        assert mine["tokens_seen"] == expected["tokens_seen"]


def test_a_token_classifier_labels_each_words_first_piece(gpt2_model_dir, data, tmp_path, monkeypatch):
    output = tmp_path / "ner"
    loads, load = [], neo_jax.hf.load_tokenizer
    monkeypatch.setattr(
        neo_jax.hf, "load_tokenizer", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs)
    )
    assert cli.main(train_args(gpt2_model_dir, data["token-classification"], output, "token-classification")) == 0
    monkeypatch.undo()
    assert loads == [(gpt2_model_dir,)]  # the examples, the padding id and the saved tokenizer's (it was eight)
    saved = json.loads((output / "tokenizer_config.json").read_text())  # as transformers' run_ner saves it
    assert saved["pad_token"] == "<|endoftext|>" and saved["add_prefix_space"] is True
    last = metrics(output)[-1]
    assert last["eval_macro_f1"] >= 0.8  # "O" alone would score about 0.3
    ner = neo_jax.pipeline("token-classification", model=output)
    found = ner("the film was quite Dora Emil and the actors were", aggregation_strategy="simple")
    assert [e["entity_group"] for e in found] == ["PER"] and "Dora" in found[0]["word"]


def test_lora_classifier_saves_a_peft_adapter_that_peft_loads(gpt2_model_dir, data, tmp_path):
    import peft

    output = tmp_path / "lora"
    args = train_args(gpt2_model_dir, data["sequence-classification"], output, "sequence-classification")
    assert cli.main([*args, "--lora-rank", "4", "--lr", "3e-3", "--steps", "60"]) == 0
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    ours = neo_jax.from_pretrained(output, progress=False)  # the base, the adapters and the trained head
    assert ours.config.labels == ("negative", "positive")
    reference = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        output / "adapter", num_labels=2, pad_token_id=50256
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    batch = tokenizer(["a great film", "the actors were terrible and the movie boring"], padding=True)
    with torch.no_grad():
        theirs = reference(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    mine = np.asarray(ours(batch["input_ids"], batch["attention_mask"]))
    assert np.abs(mine - theirs).max() <= 1e-5 and metrics(output)[-1]["eval_accuracy"] >= 0.9


def write(path: Path, lines) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_bad_labelled_input_is_one_line_exit_2_and_writes_nothing(
    gpt2_model_dir, data, sentiment_run, tmp_path, capsys
):
    sentiment = data["sequence-classification"]
    cases = [
        (["--task", "summarization"], sentiment, "invalid choice: 'summarization'"),
        ([], write(tmp_path / "nolabel.jsonl", [{"text": "a b"}] * 4), "has no 'text' and 'label' fields"),
        (["--label-field", "stars"], sentiment, "has no 'text' and 'stars' fields"),
        (
            ["--num-labels", "3"],
            write(tmp_path / "range.jsonl", [{"text": "a", "label": i} for i in (0, 1, 3)]),
            "out of range",
        ),
        (["--num-labels", "1"], sentiment, "a regression head (num_labels 1) takes numbers as labels"),
        (["--num-labels", "3"], sentiment, "num_labels is 3 but the data has 2 labels"),
        (
            [],
            write(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "x"}]),
            "all integers or all strings",
        ),
        ([], write(tmp_path / "empty_text.jsonl", [{"text": "", "label": 1}] * 3), "'text' must be non-empty text"),
    ]
    for extra, file, message in cases:
        output = tmp_path / "run"
        args = train_args(gpt2_model_dir, file, output, "sequence-classification")
        try:
            code = cli.main(args + extra)
        except SystemExit as exit:  # argparse's own refusal
            code = exit.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err.splitlines()[-1], (extra, err)  # argparse's usage comes before it
        assert not output.exists(), extra
    # a checkpoint's own head: num_labels must agree, and labels it does not know are refused
    wrong = train_args(sentiment_run, sentiment, tmp_path / "again", "sequence-classification", num_labels=3)
    assert cli.main(wrong) == 2 and "disagrees with" in capsys.readouterr().err
    unknown = write(tmp_path / "unknown.jsonl", [{"text": "a b", "label": "neutral"}] * 4)
    assert cli.main(train_args(sentiment_run, unknown, tmp_path / "again", "sequence-classification")) == 2
    assert "not among the model's labels ['negative', 'positive']" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
