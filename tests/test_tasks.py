"""Task heads, every layer's hidden states and attention probabilities, loading and saving them: against
transformers' GPT-Neo classes on random weights, in float32."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import neo_jax
from tests.conftest import SMALL, backend_compiles

TOL = 1e-4  # relative to the largest magnitude of the reference output
CLASSES = {
    "causal-lm": transformers.GPTNeoForCausalLM,
    "feature-extraction": transformers.GPTNeoModel,
    "sequence-classification": transformers.GPTNeoForSequenceClassification,
    "token-classification": transformers.GPTNeoForTokenClassification,
    "question-answering": transformers.GPTNeoForQuestionAnswering,
}
PAD = 3  # the classifiers' pad_token_id
TASK = dict(num_labels=5, pad_token_id=PAD)


def make_task_model(task: str, seed: int = 0, **overrides):
    """transformers' class for ``task`` with every parameter random (biases and LayerNorms included)."""
    config = transformers.GPTNeoConfig(**{**SMALL, **TASK, **overrides})
    torch.manual_seed(seed)
    model = CLASSES[task](config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.05)
    return model


def padded_batch(seed: int = 0):
    """Three rows of 40 tokens (past the window of 16): right-padded, left-padded, full; padding is PAD."""
    ids = np.random.default_rng(seed).integers(4, SMALL["vocab_size"], (3, 40))
    mask = np.ones_like(ids)
    mask[0, 29:] = 0  # right padding, as tokenizers pad by default
    mask[1, :7] = 0  # left padding
    return np.where(mask == 1, ids, PAD), mask


def reference(model, ids, mask):
    with torch.no_grad():
        return model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True, output_attentions=True
        )


def close(ours, theirs) -> float:
    """The largest difference relative to the reference's largest magnitude."""
    theirs = theirs.detach().float().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    return float(np.abs(np.asarray(ours, np.float32) - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """task -> (transformers model, its save_pretrained directory)."""
    out = {}
    for task in CLASSES:
        model = make_task_model(task)
        directory = tmp_path_factory.mktemp(task)
        model.save_pretrained(directory)
        out[task] = model, directory
    return out


def task_outputs(task, out):
    """The task's own output fields, as named in transformers' output class."""
    fields = {"question-answering": ("start_logits", "end_logits"), "feature-extraction": ("last_hidden_state",)}
    return [getattr(out, name) for name in fields.get(task, ("logits",))]


@pytest.mark.parametrize("task", CLASSES)
def test_heads_hidden_states_and_attentions_match_transformers(saved, task):
    hf, directory = saved[task]
    ours = neo_jax.from_pretrained(directory, progress=False)
    assert ours.config.task == task
    ids, mask = padded_batch()
    theirs = reference(hf, ids, mask)
    out = ours(ids, mask, output_hidden_states=True, output_attentions=True)
    for mine, expected in zip(task_outputs(task, out), task_outputs(task, theirs), strict=True):
        assert mine.shape == tuple(expected.shape)
        assert close(mine, expected) <= TOL
    assert len(out.hidden_states) == SMALL["num_layers"] + 1 == len(theirs.hidden_states)
    assert max(close(a, b) for a, b in zip(out.hidden_states, theirs.hidden_states, strict=True)) <= TOL
    assert len(out.attentions) == SMALL["num_layers"]
    for mine, expected in zip(out.attentions, theirs.attentions, strict=True):
        assert mine.shape == (3, SMALL["num_heads"], 40, 40)
        assert np.abs(np.asarray(mine) - expected.numpy()).max() <= 1e-5  # probabilities: absolute
    plain = ours(ids, mask)  # without the extras: the task's output alone
    expected = task_outputs(task, theirs)
    plain = list(plain) if task == "question-answering" else [plain]
    assert max(close(a, b) for a, b in zip(plain, expected, strict=True)) <= TOL


def test_every_layer_under_jit_and_with_blockwise_attention(saved):
    """A jitted call returns the same output object; a model built for blockwise attention (never [T, T])
    still returns the dense probabilities, and its hidden states equal the dense model's."""
    hf, directory = saved["token-classification"]
    ids, mask = padded_batch(1)
    theirs = reference(hf, ids, mask)
    ours = neo_jax.from_pretrained(directory, attention="blockwise", progress=False)
    call = nnx.jit(lambda m, i, k: m(i, k, output_hidden_states=True, output_attentions=True))
    out = call(ours, jnp.asarray(ids), jnp.asarray(mask))
    assert close(out.logits, theirs.logits) <= TOL
    assert max(close(a, b) for a, b in zip(out.hidden_states, theirs.hidden_states, strict=True)) <= TOL
    assert max(np.abs(np.asarray(a) - b.numpy()).max() for a, b in zip(out.attentions, theirs.attentions)) <= 1e-5


def test_sequence_classifier_pools_as_transformers_and_refuses_a_batch_without_a_pad_id(tmp_path):
    hf = make_task_model("sequence-classification", pad_token_id=None)
    hf.save_pretrained(tmp_path / "nopad")
    ours = neo_jax.from_pretrained(tmp_path / "nopad", progress=False)
    ids = np.random.default_rng(2).integers(4, SMALL["vocab_size"], (2, 9))
    with torch.no_grad():
        single = hf(torch.tensor(ids[:1])).logits.numpy()
    assert close(ours(ids[:1]), single) <= TOL  # one row: the last token
    with pytest.raises(ValueError, match="Cannot handle batch sizes > 1 if no padding token is defined"):
        ours(ids)
    with torch.no_grad(), pytest.raises(ValueError, match="Cannot handle batch sizes > 1"):
        hf(torch.tensor(ids))


def test_classifiers_of_one_shape_share_their_compiled_program(saved, tmp_path):
    """Label names are not architecture: classifiers of one shape (other weights, other label names) run the
    first one's program, and each keeps its own names and outputs."""
    call = nnx.jit(lambda m, ids: m(ids))
    ids = jnp.asarray(padded_batch()[0])
    first = neo_jax.from_pretrained(saved["sequence-classification"][1], progress=False)
    call(first, ids).block_until_ready()
    hf = make_task_model("sequence-classification", seed=1)
    hf.config.id2label = dict(enumerate(["a", "b", "c", "d", "e"]))
    hf.config.label2id = {label: i for i, label in hf.config.id2label.items()}
    hf.save_pretrained(tmp_path / "named")
    second = neo_jax.from_pretrained(tmp_path / "named", progress=False)
    with backend_compiles() as compiles:
        logits = call(second, ids)
    assert compiles == []
    with torch.no_grad():
        assert close(logits, hf(torch.tensor(np.asarray(ids))).logits) <= TOL
    assert second.config.labels == ("a", "b", "c", "d", "e") and first.config.labels[0] == "LABEL_0"
    neo_jax.save_pretrained(second, tmp_path / "saved", progress=False)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["id2label"]["4"] == "e"


def test_another_tasks_checkpoint_gets_a_new_head_with_a_notice(saved, caplog):
    hf, directory = saved["causal-lm"]
    with caplog.at_level(logging.WARNING, logger="neo_jax"):
        ours = neo_jax.from_pretrained(directory, task="question-answering", progress=False)
    assert ours.config.task == "question-answering"
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "['qa_outputs.weight', 'qa_outputs.bias']" in notices[0]
    assert "\n" not in notices[0]
    start, end = ours(padded_batch()[0])
    assert start.shape == end.shape == (3, 40)
    ids, mask = padded_batch()  # the trunk is the checkpoint's
    hidden = ours.hidden_states(ids, mask)
    with torch.no_grad():
        expected = hf.transformer(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    assert close(hidden, expected) <= TOL
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neo_jax"):
        lm = neo_jax.from_pretrained(saved["sequence-classification"][1], task="causal-lm", progress=False)
    assert lm.head is None and "not used" in caplog.records[0].getMessage() and "score.weight" in caplog.text
    classifier = neo_jax.from_pretrained(directory, task="token-classification", num_labels=7, progress=False)
    assert classifier(ids).shape == (3, 40, 7) and classifier.config.labels[-1] == "LABEL_6"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(task="summarization"), "unknown task 'summarization'; choose one of causal-lm, feature-extraction"),
        (dict(num_labels=3), "num_labels=3 disagrees with the checkpoint's sequence-classification head, which has 5"),
        (dict(task="question-answering", num_labels=3), "num_labels is for sequence-classification and token"),
        (dict(num_labels=0), "num_labels must be >= 1"),
        (dict(num_labels=2.5), "num_labels must be an integer"),
    ],
)
def test_bad_task_arguments_are_one_line_errors(saved, kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as error:
        neo_jax.from_pretrained(saved["sequence-classification"][1], progress=False, **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("task", ["feature-extraction", "sequence-classification", "question-answering"])
def test_saved_heads_load_in_transformers_and_back(saved, task, tmp_path):
    hf, directory = saved[task]
    ours = neo_jax.from_pretrained(directory, progress=False)
    out = neo_jax.save_pretrained(ours, tmp_path / "hf", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [CLASSES[task].__name__]
    assert written["pad_token_id"] == PAD
    auto = {
        "feature-extraction": transformers.AutoModel,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "question-answering": transformers.AutoModelForQuestionAnswering,
    }[task]
    again = auto.from_pretrained(out).eval()
    assert type(again) is CLASSES[task] and again.config.num_labels == hf.config.num_labels
    ids, mask = padded_batch(3)
    for mine, expected in zip(
        task_outputs(task, reference(again, ids, mask)), task_outputs(task, reference(hf, ids, mask))
    ):
        assert torch.equal(mine, expected)  # the same weights, bit for bit
    orbax = neo_jax.save_pretrained(ours, tmp_path / "orbax", format="orbax", progress=False)
    back = neo_jax.from_pretrained(orbax, progress=False)
    assert back.config == ours.config and back.config.labels == ours.config.labels
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(ours)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_labels_are_saved_and_read(tmp_path):
    hf = make_task_model("token-classification", num_labels=3)
    hf.config.id2label = {0: "O", 1: "B-PER", 2: "I-PER"}
    hf.config.label2id = {"O": 0, "B-PER": 1, "I-PER": 2}
    hf.save_pretrained(tmp_path / "ner")
    ours = neo_jax.from_pretrained(tmp_path / "ner", progress=False)
    assert ours.config.labels == ("O", "B-PER", "I-PER")
    neo_jax.save_pretrained(ours, tmp_path / "out", progress=False)
    again = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out")
    assert again.config.id2label == {0: "O", 1: "B-PER", 2: "I-PER"}


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_classifier_in_lower_precision_weights(saved, weights):
    """bf16 and int8 weights keep the head (int8 leaves it in float: it is tiny) and stay near float32."""
    hf, directory = saved["sequence-classification"]
    ours = neo_jax.from_pretrained(directory, weights=weights, progress=False)
    ids, mask = padded_batch()
    theirs = reference(hf, ids, mask).logits
    assert ours.head is not None and ours.head.scale is None
    assert close(ours(ids, mask), theirs) <= 0.05
