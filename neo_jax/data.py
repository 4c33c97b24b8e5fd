"""Training data: text files or JSONL -> tokens -> documents joined with EOS and packed into ``seq_len``
blocks -> deterministic, resumable batches.

The batch of training step ``k`` depends only on the blocks, the seed and ``k`` (each epoch is its own
seeded permutation), so a resumed run continues on exactly the batch it would have seen.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths or globs (sorted within each glob); a pattern matching nothing is an error."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        matches = [Path(m) for m in matches if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(f"no data file matches {pattern!r}")
        files.extend(matches)
    return files


def read_documents(patterns: Sequence[str], text_field: str = "text") -> Iterator[str]:
    """Documents, in order: each line's ``text_field`` of ``.jsonl`` files, each other file whole."""
    for path in expand_paths(patterns):
        if path.suffix == ".jsonl":
            with path.open() as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{number} is not valid JSON ({e})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"{path}:{number} has no string field {text_field!r}")  # noqa: TRY004
                    yield record[text_field]
        else:
            yield path.read_text()


def pack(documents: Iterable[Sequence[int]], seq_len: int, eos: int) -> np.ndarray:
    """Join documents, each followed by ``eos``, and cut the stream into ``[n, seq_len]`` blocks (the
    tail shorter than a block is dropped)."""
    stream = [token for doc in documents for token in (*doc, eos)]
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)


class PackedData:
    """Blocks split into training and held-out validation sets, served as batches by step number."""

    def __init__(self, blocks: np.ndarray, *, batch_size: int, seed: int = 0, validation_fraction: float = 0.0):
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        order = np.random.default_rng([seed, 0]).permutation(len(blocks))
        held_out = round(len(blocks) * validation_fraction)
        self.validation = blocks[np.sort(order[:held_out])]
        self.train = blocks[np.sort(order[held_out:])]
        if len(self.train) < batch_size:
            raise ValueError(
                f"the data makes {len(self.train)} training blocks of {blocks.shape[1]} tokens, fewer than one "
                f"batch of {batch_size}: add text, or lower --batch-size or --seq-len"
            )
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(self.train) // batch_size

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
) -> PackedData:
    """Read, tokenize with ``tokenizer`` (a Hugging Face tokenizer), pack and split."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents with")
    documents = (tokenizer(text)["input_ids"] for text in read_documents(patterns, text_field))
    blocks = pack(documents, seq_len, eos)
    if len(blocks) == 0:
        raise ValueError(f"the data in {list(patterns)} is shorter than one block of {seq_len} tokens")
    return PackedData(blocks, batch_size=batch_size, seed=seed, validation_fraction=validation_fraction)
