"""Labelled examples for training a task head (``neo-jax train --task ...``): JSONL read and checked, labels mapped
to ids, tokenized once, batched as a pure function of (seed, step), and scored.

- sequence-classification: ``{"text": "...", "label": 1}`` (or a string label; a float one for a one-output
  regression head);
- token-classification: ``{"tokens": ["words", ...], "tags": ["B-PER", ...]}``, one tag per word; each word's
  first sub-token is labelled and the others are left out of the loss (-100), as transformers' examples do.

String labels become ids in sorted order (the names go to the model's ``id2label``); a checkpoint that already
has the task's head keeps its own ids and names, and labels it does not know are refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from neo_jax.shapes import bucket

IGNORED = -100  # a token without a label (transformers' ignore index)
FIELDS = {"sequence-classification": ("text", "label"), "token-classification": ("tokens", "tags")}


def read_examples(paths, task: str, text_field: str | None, label_field: str | None) -> tuple[list, list, str, str]:
    """(inputs, labels, text field, label field) of every line of the JSONL ``paths``, checked: one line error
    names the file, the line and what is wrong."""
    text_field = text_field or FIELDS[task][0]
    label_field = label_field or FIELDS[task][1]
    inputs, labels = [], []
    for path in paths:
        path = Path(path)
        if path.suffix not in (".jsonl", ".json"):
            raise ValueError(f"{path}: --task {task} reads JSONL files (one JSON object per line), not {path.suffix!r}")
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where} is not JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record or label_field not in record:
                    raise ValueError(
                        f"{where} has no {text_field!r} and {label_field!r} fields: name them with --text-field and "
                        "--label-field"
                    )
                inputs.append(_checked_input(record[text_field], task, where, text_field))
                labels.append(record[label_field])
                if task == "token-classification" and (
                    not isinstance(labels[-1], list) or len(labels[-1]) != len(inputs[-1])
                ):
                    raise ValueError(f"{where}: {label_field!r} must be a list of one tag per word in {text_field!r}")
    if len(inputs) < 2:
        raise ValueError(f"{', '.join(map(str, paths))} holds {len(inputs)} example(s); a classifier needs more")
    return inputs, labels, text_field, label_field


def _checked_input(value, task: str, where: str, field: str):
    if task == "sequence-classification":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: {field!r} must be non-empty text")
    elif not isinstance(value, list) or not value or not all(isinstance(w, str) and w for w in value):
        raise ValueError(f"{where}: {field!r} must be a non-empty list of words")
    return value


def label_ids(labels: list, names: tuple[str, ...] | None, num_labels: int | None) -> tuple[list, tuple[str, ...]]:
    """Labels (one per example, or a list per example) as ids, with the label names by id.

    ``names``: the names of a head the checkpoint already has (its labels must be among them or, as integers,
    below their count); else None, and string labels are named in sorted order, integer ones ``LABEL_i`` up to
    ``num_labels`` (default: the largest + 1). A one-output head (``num_labels`` 1) is a regression: float labels.
    """
    flat = [value for label in labels for value in (label if isinstance(label, list) else [label])]
    kinds = {"bool" if isinstance(v, bool) else "str" if isinstance(v, str) else type(v).__name__ for v in flat}
    count = len(names) if names is not None else num_labels
    if count == 1:
        if kinds - {"int", "float"}:
            raise ValueError(f"a regression head (num_labels 1) takes numbers as labels, got {_shown(flat, kinds)}")
        return [float(v) if not isinstance(v, list) else [float(x) for x in v] for v in labels], names or ("LABEL_0",)
    if len(kinds) != 1 or kinds - {"int", "str"}:
        raise ValueError(f"labels must be all integers or all strings, got {_shown(flat, kinds)}")
    if kinds == {"str"}:
        if names is None:
            names = tuple(sorted(set(flat)))
            if num_labels is not None and num_labels != len(names):
                raise ValueError(f"num_labels is {num_labels} but the data has {len(names)} labels: {list(names)}")
        unknown = sorted(set(flat) - set(names))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among the model's labels {list(names)}")
        index = {name: i for i, name in enumerate(names)}
    else:
        count = count or max(flat) + 1
        bad = [v for v in flat if not 0 <= v < count]
        if bad:
            raise ValueError(f"label {bad[0]} is out of range: this head has {count} labels, 0..{count - 1}")
        names = names or tuple(f"LABEL_{i}" for i in range(count))
        index = {i: i for i in range(count)}
    return [[index[v] for v in label] if isinstance(label, list) else index[label] for label in labels], names


def _shown(values, kinds) -> str:
    return f"{', '.join(sorted(kinds))} values such as {values[0]!r}"


class LabelledData:
    """Tokenized examples split into training and validation, and their batches: the batch at step k is a pure
    function of (seed, k), so a resumed run sees exactly the batches it would have."""

    def __init__(
        self, inputs, labels, tokenizer, task: str, *, seq_len: int, pad_id: int, seed: int, validation: float
    ):
        self.task, self.seq_len, self.pad_id, self.seed = task, seq_len, pad_id, seed
        self.rows, self.targets = [], []
        self.truncated = 0
        for text, label in zip(inputs, labels, strict=True):
            ids, target = self._tokenize(tokenizer, text, label)
            self.truncated += len(ids) > seq_len
            self.rows.append(ids[:seq_len])
            self.targets.append(target[:seq_len] if isinstance(target, list) else target)
        order = np.random.default_rng(seed).permutation(len(self.rows))
        held = min(len(order) - 1, max(1, round(validation * len(order)))) if validation > 0 else 0
        self.validation, self.train = sorted(order[:held].tolist()), sorted(order[held:].tolist())

    def _tokenize(self, tokenizer, text, label):
        if self.task == "sequence-classification":
            return tokenizer(text)["input_ids"], label
        encoded = tokenizer(text, is_split_into_words=True)
        seen, target = set(), []
        for word in encoded.word_ids():
            target.append(IGNORED if word is None or word in seen else label[word])
            seen.add(word)
        return encoded["input_ids"], target

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.rows, self.targets, self.seq_len, self.seed]).encode())
        return digest.hexdigest()[:16]

    def batch(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, attention_mask, labels) of examples ``indices``, padded on the right to a length bucket."""
        width = min(self.seq_len, bucket(max(len(self.rows[i]) for i in indices)))
        ids = np.full((len(indices), width), self.pad_id, np.int32)
        mask = np.zeros((len(indices), width), np.int32)
        regression = isinstance(self.targets[indices[0]], float)
        if self.task == "sequence-classification":
            labels = np.array([self.targets[i] for i in indices], np.float32 if regression else np.int32)
        else:
            labels = np.full((len(indices), width), IGNORED, np.int32)
        for row, i in enumerate(indices):
            n = len(self.rows[i])
            ids[row, :n], mask[row, :n] = self.rows[i], 1
            if self.task == "token-classification":
                labels[row, :n] = self.targets[i]
        return ids, mask, labels

    def step_indices(self, step: int, batch_size: int) -> list[int]:
        """The training examples of step ``step`` (from 1): epochs of seeded permutations, read in order."""
        out = []
        for position in range((step - 1) * batch_size, step * batch_size):
            epoch, offset = divmod(position, len(self.train))
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
            out.append(self.train[permutation[offset]])
        return out


def scores(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Cross entropy, accuracy and macro-F1 (over the labels in the truth or the predictions, as scikit-learn's
    ``f1_score(average="macro")``) of ``logits`` [n, labels] against ``labels`` [n] (-100: left out); for one
    output (regression), the mean squared error."""
    keep = labels != IGNORED
    logits, labels = logits[keep], labels[keep]
    if logits.shape[-1] == 1:
        return {"eval_loss": float(np.mean((logits[:, 0] - labels) ** 2))}
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    labels = labels.astype(np.int64)
    predicted = logits.argmax(-1)
    f1 = []
    for label in np.union1d(labels, predicted):
        tp = np.sum((predicted == label) & (labels == label))
        fp, fn = np.sum((predicted == label) & (labels != label)), np.sum((predicted != label) & (labels == label))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return {
        "eval_loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "eval_accuracy": float(np.mean(predicted == labels)),
        "eval_macro_f1": float(np.mean(f1)),
    }
