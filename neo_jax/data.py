"""Training data: text files, JSONL or Hugging Face datasets -> tokens -> documents joined with EOS and
packed into ``seq_len`` blocks -> deterministic, resumable batches.

Sources (any mix, in order):

- a text file or glob: each file is one document;
- a ``.jsonl`` file or glob: each line's text field is one document;
- a directory written by ``datasets.Dataset.save_to_disk``: each row's text field;
- ``hf:NAME`` or ``hf:NAME:CONFIG``: ``datasets.load_dataset`` on a hub dataset (streamed, so nothing but
  the text is kept) or a local dataset directory, the split given by ``split``.

The batch of training step ``k`` depends only on the blocks, the seed and ``k`` (each epoch is its own
seeded permutation), so a resumed run continues on exactly the batch it would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

HUB_PREFIX = "hf:"
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in SAVED_DATASET_FILES)


def expand_paths(patterns: Sequence[str]) -> list[Path | str]:
    """The sources named by ``patterns``: files of paths or globs (sorted within each glob), saved-dataset
    directories, and ``hf:`` names as they are. A pattern matching nothing is an error, raised before any
    data is read."""
    sources = []
    for pattern in patterns:
        if pattern.startswith(HUB_PREFIX):
            if not pattern[len(HUB_PREFIX) :]:
                raise ValueError(f"{pattern!r} names no dataset: write hf:NAME or hf:NAME:CONFIG")
            sources.append(pattern)
            continue
        matches = [Path(m) for m in sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))]
        datasets = [m for m in matches if is_saved_dataset(m)]
        files = [m for m in matches if m.is_file()]
        if not datasets and not files:
            hint = " (a directory: pass a glob of its files, e.g. DIR/*.txt)" if Path(pattern).is_dir() else ""
            raise FileNotFoundError(f"no data file matches {pattern!r}{hint}")
        sources.extend(datasets + files)
    return sources


def _dataset_texts(source: Path | str, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {source} needs Hugging Face datasets: pip install 'neo_jax[train]'") from None
    if isinstance(source, Path):
        dataset = datasets.load_from_disk(str(source))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source} has splits {sorted(dataset)}, not {split!r}: choose one with --split")
            dataset = dataset[split]
    else:
        name, _, config = source[len(HUB_PREFIX) :].partition(":")
        dataset = datasets.load_dataset(name, config or None, split=split, streaming=True)
    for number, row in enumerate(dataset):
        if not isinstance(row.get(text_field), str):
            columns = sorted(row)
            raise ValueError(f"{source} row {number} has no string column {text_field!r} (it has {columns})")
        yield row[text_field]


def read_documents(patterns: Sequence[str], text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Documents, in order: each line's ``text_field`` of ``.jsonl`` files, each row's ``text_field`` of
    Hugging Face datasets (their ``split``), each other file whole."""
    for path in expand_paths(patterns):
        if isinstance(path, str) or path.is_dir():
            yield from _dataset_texts(path, split, text_field)
        elif path.suffix == ".jsonl":
            with path.open() as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{number} is not valid JSON ({e})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"{path}:{number} has no string field {text_field!r}")
                    yield record[text_field]
        else:
            yield path.read_text()


def tokenized_documents(
    patterns: Sequence[str], tokenizer, text_field: str = "text", split: str = "train"
) -> Iterator[list[int]]:
    """The token ids of each document of ``patterns`` (``read_documents``), encoded a thousand at a time:
    fast tokenizers encode a list in parallel."""
    texts = read_documents(patterns, text_field, split)
    for chunk in iter(lambda: list(itertools.islice(texts, 1000)), []):
        yield from tokenizer(chunk, verbose=False)["input_ids"]


def pack(documents: Iterable[Sequence[int]], seq_len: int, eos: int) -> np.ndarray:
    """Join documents, each followed by ``eos``, and cut the stream into ``[n, seq_len]`` blocks (the
    tail shorter than a block is dropped)."""
    pieces = [piece for doc in documents for piece in (np.asarray(doc, np.int32), np.int32([eos]))]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


class PackedData:
    """Blocks split into training and held-out validation sets, served as batches by step number."""

    def __init__(self, blocks: np.ndarray, *, batch_size: int, seed: int = 0, validation_fraction: float = 0.0):
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        order = np.random.default_rng([seed, 0]).permutation(len(blocks))
        held_out = max(1, round(len(blocks) * validation_fraction)) if validation_fraction else 0
        if held_out and len(blocks) - held_out < batch_size:
            warnings.warn(
                f"{len(blocks)} blocks are too few to hold {held_out} out for validation and still fill a batch "
                f"of {batch_size}: training on all of them, without evaluation",
                stacklevel=2,
            )
            held_out = 0
        self.validation = blocks[np.sort(order[:held_out])]
        self.train = blocks[np.sort(order[held_out:])]
        if len(self.train) < batch_size:
            raise ValueError(
                f"the data makes {len(self.train)} training blocks of {blocks.shape[1]} tokens, fewer than one "
                f"batch of {batch_size}: add text, or lower --batch-size or --seq-len"
            )
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(self.train) // batch_size

    def fingerprint(self) -> str:
        """A short hash of the blocks and the seed: a resumed run checks it sees the same data."""
        digest = hashlib.sha256(f"{self.seed},{self.batch_size},{self.train.shape}".encode())
        digest.update(self.train.tobytes())
        digest.update(self.validation.tobytes())
        return digest.hexdigest()[:16]

    def batch(self, step: int) -> np.ndarray:
        """The ``[batch_size, seq_len]`` batch of training step ``step`` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.train))
        return self.train[order[index * self.batch_size : (index + 1) * self.batch_size]]

    def batches(self, start_step: int = 0) -> Iterator[np.ndarray]:
        """Batches from ``start_step`` on, for ever (resume by passing the step to continue from)."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def validation_batches(self) -> Iterator[np.ndarray]:
        """The held-out blocks in batches (the last one may be smaller)."""
        for start in range(0, len(self.validation), self.batch_size):
            yield self.validation[start : start + self.batch_size]


def load(
    patterns: Sequence[str],
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    validation_fraction: float = 0.0,
    text_field: str = "text",
    split: str = "train",
) -> PackedData:
    """Read, tokenize with ``tokenizer`` (a Hugging Face tokenizer), pack and split."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents with")
    blocks = pack(tokenized_documents(patterns, tokenizer, text_field, split), seq_len, eos)
    if len(blocks) == 0:
        raise ValueError(f"the data in {list(patterns)} holds fewer than {seq_len} tokens: not one block of --seq-len")
    return PackedData(blocks, batch_size=batch_size, seed=seed, validation_fraction=validation_fraction)
